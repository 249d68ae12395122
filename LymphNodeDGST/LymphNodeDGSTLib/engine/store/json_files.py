"""One reader for the JSON files the store keeps and reads back (state.json, version.json,
case.json, a results folder's plans.json and dataset.json).

Every unreadable, malformed or mistyped file becomes one UserInputError that names the file, says
what is wrong with it and how to repair it, so that no caller meets a half-understood dict.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from LymphNodeDGSTLib.errors import UserInputError


@dataclass(frozen=True)
class Expect:
    """What one optional field must hold when present: a test and its words for the message."""

    test: Callable[[Any], bool]
    description: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


POSITIVE_INT = Expect(lambda v: _is_int(v) and v >= 1, "a whole number >= 1")
OPTIONAL_POSITIVE_INT = Expect(lambda v: v is None or (_is_int(v) and v >= 1),
                               "a whole number >= 1 or null")
POSITIVE_INT_LIST = Expect(lambda v: isinstance(v, list) and all(_is_int(x) and x >= 1 for x in v),
                           "a list of whole numbers >= 1")
NUMBER = Expect(_is_number, "a finite number")
OPTIONAL_NUMBER = Expect(lambda v: v is None or _is_int(v) or isinstance(v, float),
                         "a number or null")  # NaN allowed: a metric may be undefined
NUMBER_LIST = Expect(lambda v: isinstance(v, list) and all(_is_number(x) for x in v),
                     "a list of numbers")
TEXT = Expect(lambda v: isinstance(v, str), "a text string")
TEXT_LIST = Expect(lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                   "a list of text strings")
OPTIONAL_TEXT = Expect(lambda v: v is None or isinstance(v, str), "a text string or null")
BOOLEAN = Expect(lambda v: isinstance(v, bool), "true or false")
OBJECT = Expect(lambda v: isinstance(v, dict), "a JSON object")
OPTIONAL_OBJECT = Expect(lambda v: v is None or isinstance(v, dict), "a JSON object or null")


def read_json_object(path: str | os.PathLike, repair: str,
                     fields: Mapping[str, Expect] | None = None,
                     error: type[UserInputError] = UserInputError) -> dict:
    """The JSON object stored in `path`, its `fields` (where present) of the expected types.

    `repair` ends every message: what the user can do about this file. `error` is the
    UserInputError subclass to raise (e.g. ModelValidationError for a results folder).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing; {repair}") from None
    except OSError as failure:
        raise error(f"{path} cannot be read ({failure.strerror or failure}); {repair}") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not valid JSON (not UTF-8 text); {repair}") from None
    except json.JSONDecodeError as failure:
        raise error(f"{path} is not valid JSON ({failure.msg} at line {failure.lineno} column "
                    f"{failure.colno}); {repair}") from None
    except RecursionError:
        raise error(f"{path} is not valid JSON (nested too deeply); {repair}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, not {_json_type(data)}; {repair}")
    return check_fields(data, path, fields or {}, repair, error)


def check_fields(data: dict, path: str | os.PathLike, fields: Mapping[str, Expect], repair: str,
                 error: type[UserInputError] = UserInputError) -> dict:
    """`data` (an object read from `path`, or one nested in it) if each present field is as
    expected; else one error naming the file, the field and the repair."""
    for key, expect in fields.items():
        if key in data and not expect.test(data[key]):
            raise error(f"{path}: '{key}' must be {expect.description}, not {_shown(data[key])}; "
                        f"{repair}")
    return data


def _json_type(value: Any) -> str:
    names = {list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."

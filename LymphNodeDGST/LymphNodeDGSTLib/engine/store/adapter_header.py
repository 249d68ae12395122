"""The checks of a site adapter's header, before anything in it is used.

The fold and configuration become folder names, the record becomes the new version's version.json
and the layout decides how tensors are rebuilt: every field is checked for its type and range
first, so that a crafted or damaged header is refused with one message instead of writing outside
the home, publishing a version.json the store cannot read back, or a traceback.
"""

from __future__ import annotations

import re
from typing import Any

from LymphNodeDGSTLib.engine.store.names import (is_configuration_name, is_fold_name, is_model_name,
                                                 is_version_number)

SHA256 = re.compile(r"[0-9a-f]{64}")
WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
INDEX_DTYPES = {"gaps": "uint16", "indices": "int64"}
MAX_DIMENSIONS = 8
# The record's fields that travel with an adapter, and what each may hold.
RECORD_FIELDS = {
    "method": lambda v: isinstance(v, str) and 0 < len(v) <= 64,
    "gamma": lambda v: v is None or (_is_int(v) and v >= 1),
    "iterations": lambda v: v is None or (_is_int(v) and v >= 0),
    "metrics": lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(k, str) and (m is None or isinstance(m, (bool, int, float))) for k, m in v.items())),  # NaN: not measured
    "created": lambda v: isinstance(v, str) and len(v) <= 64,
    "device": lambda v: isinstance(v, str) and len(v) <= 64,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def header_problem(header: Any) -> str | None:
    """What is wrong with an adapter's header, in a few words; None when it can be used."""
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    parent, result = header.get("parent"), header.get("result")
    if not isinstance(parent, dict) or not isinstance(result, dict):
        return "'parent' and 'result' must be objects"
    checks = (
        ("parent.name", parent.get("name"), is_model_name),
        ("parent.version", parent.get("version"), is_version_number),
        ("parent.fold", parent.get("fold"), is_fold_name),
        ("parent.weights_sha256", parent.get("weights_sha256"), _is_sha256),
        ("result.name", result.get("name"), is_model_name),
        ("result.version", result.get("version"), is_version_number),
        ("result.fold", result.get("fold"), is_fold_name),
        ("result.configuration", result.get("configuration"), is_configuration_name),
        ("result.trainer_name", result.get("trainer_name", "nnUNetTrainer"), is_configuration_name),
        ("result.weights_sha256", result.get("weights_sha256"), _is_sha256),
        ("result.mirroring_axes", result.get("mirroring_axes"), _is_mirroring_axes),
    )
    for field, value, test in checks:
        if not test(value):
            return f"{field} is {_shown(value)}"
    for name in ("plans", "dataset_json", "tensors", "aliases"):
        if not isinstance(header.get(name), dict):
            return f"'{name}' must be an object"
    for key, spec in header["tensors"].items():
        if not _is_layout(spec):
            return f"the layout of tensor {_shown(key)} is {_shown(spec)}"
    for alias, owner in header["aliases"].items():
        if not isinstance(owner, str) or owner not in header["tensors"] or alias in header["tensors"]:
            return f"alias {_shown(alias)} names {_shown(owner)}, which is not one of the adapter's tensors"
    record = header.get("record", {})
    if not isinstance(record, dict):
        return "'record' must be an object"
    for field, test in RECORD_FIELDS.items():
        if field in record and not test(record[field]):
            return f"record.{field} is {_shown(record[field])}"
    return None


def stored_tensor_problem(header: dict, tensors: dict) -> str | None:
    """What is wrong with the stored tensors' types (indices that are not whole numbers, values
    of another type than the layout's); None when they can be used."""
    layout = header["tensors"]
    for name, tensor in tensors.items():
        key, _, kind = name.rpartition(":")
        dtype = str(tensor.dtype).removeprefix("torch.")
        expected = INDEX_DTYPES.get(kind) or (layout[key]["dtype"] if key in layout else None)
        if expected is not None and dtype != expected:
            return f"tensor '{name}' is stored as {dtype}, not {expected}"
    return None


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and SHA256.fullmatch(value) is not None


def _is_mirroring_axes(value: Any) -> bool:
    return value is None or (isinstance(value, list) and len(value) <= 3 and len(set(map(str, value))) == len(value)
                             and all(_is_int(a) and 0 <= a <= 2 for a in value))


def _is_layout(spec: Any) -> bool:
    return (isinstance(spec, dict) and spec.get("dtype") in WEIGHT_DTYPES
            and isinstance(spec.get("shape"), list) and len(spec["shape"]) <= MAX_DIMENSIONS
            and all(_is_int(n) and 0 <= n < 2**31 for n in spec["shape"]))


def _shown(value: Any) -> str:
    text = repr(value).encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= 40 else text[:37] + "..."

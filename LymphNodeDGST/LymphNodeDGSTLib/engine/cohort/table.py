"""The cohort CSV: one row per case of a batch, and the merge of the parts' CSVs.

Columns: case, status (segmented | resumed | failed), nodes, total_volume_mm3,
largest_short_axis_mm, model_version, seconds, input, image_sha256, message. A failed case keeps
its row (status failed, the reason in message) so a merged cohort shows every input once.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

from LymphNodeDGSTLib.atomic import write_text_atomic
from LymphNodeDGSTLib.engine.cohort.parts import MAX_PARTS
from LymphNodeDGSTLib.engine.images.itk_names import shown
from LymphNodeDGSTLib.errors import UserInputError

COHORT_FILE = "cohort.csv"
PART_FILE_PATTERN = re.compile(r"^cohort\.part-([0-9]{1,9})-of-([0-9]{1,9})\.csv$", re.ASCII)
STATUSES = ("segmented", "resumed", "failed")
MAX_FIELD_CHARS = 1 << 20  # a path or a message; csv's own limit (131,072) was a traceback


@dataclass
class CohortRow:
    case: str
    status: str
    nodes: int | None = None
    total_volume_mm3: float | None = None
    largest_short_axis_mm: float | None = None
    model_version: str = ""
    seconds: float | None = None
    input: str = ""
    image_sha256: str = ""
    message: str = ""


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(CohortRow))


def cohort_file_name(part_tag: str = "") -> str:
    return f"cohort.{part_tag}.csv" if part_tag else COHORT_FILE


def write_cohort_csv(rows: Iterable[CohortRow], path: str | os.PathLike) -> Path:
    """Rows sorted by case, written atomically."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in sorted(rows, key=lambda r: r.case):
        writer.writerow([shown(_format(value)) for value in asdict(row).values()])
    write_text_atomic(path, stream.getvalue())
    return Path(path)


def read_cohort_csv(path: str | os.PathLike) -> list[CohortRow]:
    """The rows of a cohort CSV; anything that is not one (bad bytes, columns, values) is one
    UserInputError naming the file and the line."""
    path = Path(path)
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise UserInputError(f"{path} is not a cohort CSV (columns {reader.fieldnames})")
            return [_parse(record, f"{path}, line {reader.line_num}") for record in reader]
    except OSError as error:
        raise UserInputError(f"cannot read cohort CSV {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UserInputError(f"{path} is not a cohort CSV: it is not UTF-8 text") from None
    except csv.Error as error:
        raise UserInputError(f"{path} is not a cohort CSV: {error}") from None


def merge_cohort_csvs(sources: Sequence[str | os.PathLike], output: str | os.PathLike) -> list[CohortRow]:
    """Merge part CSVs (files, or folders holding cohort.part-K-of-N.csv) into one CSV.

    Refuses a case that appears in two parts, a part file whose name is impossible (part 3 of 2),
    an output that is a folder or one of the inputs, and, for the parts found in a folder, a
    missing part (files named explicitly may be any subset).
    """
    output = Path(output)
    if output.is_dir():
        raise UserInputError(f"{output} is a folder; -o names the merged CSV file")
    files: list[Path] = []
    found_in_folders: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if PART_FILE_PATTERN.match(p.name))
            if not found:
                raise UserInputError(f"no cohort.part-K-of-N.csv files in {source}")
            files.extend(found)
            found_in_folders.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            raise UserInputError(f"cohort CSV not found: {source}")
    for file in files:
        _check_part_name(file)
        if output.exists() and os.path.samefile(file, output):
            raise UserInputError(f"-o {output} is one of the CSVs being merged; write the merge elsewhere")
    _check_parts_complete(found_in_folders)
    merged: dict[str, tuple[CohortRow, Path]] = {}
    for file in files:
        for row in read_cohort_csv(file):
            if row.case in merged:
                raise UserInputError(f"case '{row.case}' is in both {merged[row.case][1]} and {file}")
            merged[row.case] = (row, file)
    rows = [row for row, _ in merged.values()]
    write_cohort_csv(rows, output)
    return sorted(rows, key=lambda r: r.case)


def _check_part_name(file: Path) -> None:
    match = PART_FILE_PATTERN.match(file.name)
    if match is None:
        return  # another name: a CSV the user named, checked by its contents
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= count <= MAX_PARTS:
        raise UserInputError(f"{file}: part {index} of {count} cannot exist (parts are numbered "
                             f"1..N, N at most {MAX_PARTS})")


def _check_parts_complete(files: Sequence[Path]) -> None:
    parts = [PART_FILE_PATTERN.match(f.name) for f in files]
    numbered = [(int(m.group(1)), int(m.group(2))) for m in parts if m]
    if not numbered:
        return
    counts = {n for _, n in numbered}
    if len(counts) > 1:
        raise UserInputError(f"part files of different splits: N = {sorted(counts)}")
    count = counts.pop()
    missing = sorted(set(range(1, count + 1)) - {k for k, _ in numbered})
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise UserInputError(f"parts {shown} of {count} are missing; run them, or name the part "
                             "files to merge one by one instead of their folder")


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _parse(record: dict, where: str) -> CohortRow:
    if None in record or any(value is None for value in record.values()):
        raise UserInputError(f"{where}: the row has {'more' if None in record else 'fewer'} fields "
                             f"than the {len(COLUMNS)} columns")
    if record["status"] not in STATUSES:
        raise UserInputError(f"{where}: status {record['status']!r} is not one of {', '.join(STATUSES)}")

    def number(column: str, kind):
        text = record[column]
        if text == "":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise UserInputError(f"{where}: {column} {text[:40]!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise UserInputError(f"{where}: {column} {text[:40]!r} must be a finite number >= 0")
        return value

    return CohortRow(record["case"], record["status"], number("nodes", int),
                     number("total_volume_mm3", float), number("largest_short_axis_mm", float),
                     record["model_version"], number("seconds", float), record["input"],
                     record["image_sha256"], record["message"])

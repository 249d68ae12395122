"""The cohort CSV: one row per case of a batch, and the merge of the parts' CSVs.

Columns: case, status (segmented | resumed | failed), nodes, total_volume_mm3,
largest_short_axis_mm, model_version, seconds, input, image_sha256, message. A failed case keeps
its row (status failed, the reason in message) so a merged cohort shows every input once.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

from LymphNodeDGSTLib.atomic import write_text_atomic
from LymphNodeDGSTLib.errors import UserInputError

COHORT_FILE = "cohort.csv"
PART_FILE_PATTERN = re.compile(r"^cohort\.part-(\d+)-of-(\d+)\.csv$")


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
        writer.writerow([_format(value) for value in asdict(row).values()])
    write_text_atomic(path, stream.getvalue())
    return Path(path)


def read_cohort_csv(path: str | os.PathLike) -> list[CohortRow]:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise UserInputError(f"{path} is not a cohort CSV (columns {reader.fieldnames})")
            return [_parse(record) for record in reader]
    except OSError as error:
        raise UserInputError(f"cannot read cohort CSV {path}: {error.strerror}") from None


def merge_cohort_csvs(sources: Sequence[str | os.PathLike], output: str | os.PathLike) -> list[CohortRow]:
    """Merge part CSVs (files, or folders holding cohort.part-K-of-N.csv) into one CSV.

    Refuses a case that appears in two parts, and, for part files, a missing part.
    """
    files: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if PART_FILE_PATTERN.match(p.name))
            if not found:
                raise UserInputError(f"no cohort.part-K-of-N.csv files in {source}")
            files.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            raise UserInputError(f"cohort CSV not found: {source}")
    _check_parts_complete(files)
    merged: dict[str, tuple[CohortRow, Path]] = {}
    for file in files:
        for row in read_cohort_csv(file):
            if row.case in merged:
                raise UserInputError(f"case '{row.case}' is in both {merged[row.case][1]} and {file}")
            merged[row.case] = (row, file)
    rows = [row for row, _ in merged.values()]
    write_cohort_csv(rows, output)
    return sorted(rows, key=lambda r: r.case)


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
        raise UserInputError(f"parts {', '.join(map(str, missing))} of {count} are missing; "
                             "run them (or name the files to merge explicitly)")


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _parse(record: dict) -> CohortRow:
    def number(text: str, kind):
        return kind(text) if text not in ("", None) else None

    return CohortRow(record["case"], record["status"], number(record["nodes"], int),
                     number(record["total_volume_mm3"], float),
                     number(record["largest_short_axis_mm"], float), record["model_version"],
                     number(record["seconds"], float), record["input"], record["image_sha256"],
                     record["message"])

"""A cohort run: discover the cases, take this part's share, segment them, write the cohort CSV.

Shared by `lndgst segment INPUT_DIR OUTPUT_DIR` and the Slicer panel's folder job. The cohort CSV
(`cohort.csv`, or `cohort.part-K-of-N.csv` for `--part K/N`) is rewritten atomically after every
case, so an interrupted run leaves a valid CSV of what is done, and a rerun resumes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from LymphNodeDGSTLib.engine.cohort.batch import BatchSettings
from LymphNodeDGSTLib.engine.cohort.table import CohortRow, cohort_file_name, write_cohort_csv
from LymphNodeDGSTLib.engine.cohort.inputs import CohortCase, discover_cases
from LymphNodeDGSTLib.engine.cohort.parts import Part
from LymphNodeDGSTLib.errors import UserInputError


@dataclass
class CohortPlan:
    input_dir: Path
    output_dir: Path
    part: Part
    cases: list[CohortCase]          # this part's share
    total_cases: int                 # in the whole folder
    ignored: list[Path] = field(default_factory=list)

    @property
    def csv_path(self) -> Path:
        return self.output_dir / cohort_file_name(self.part.tag)


def plan_cohort(input_dir: str | Path, output_dir: str | Path, part: Part = Part()) -> CohortPlan:
    """Everything checked before any model is loaded (bad input raises UserInputError)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserInputError(f"output {output_dir} exists and is not a folder")
    if not output_dir.parent.is_dir():
        raise UserInputError(f"output folder's parent does not exist: {output_dir.parent}")
    found = discover_cases(input_dir, output_dir)
    share = part.select([c.name for c in found.cases], found.cases)
    return CohortPlan(input_dir, output_dir, part, share, len(found.cases), found.ignored)


class Eta:
    """Progress of a batch: cases done, and the time left from the segmented cases' pace."""

    def __init__(self, total: int, workers: int = 1):
        self.total, self.workers, self.done, self.segmented = total, max(1, workers), 0, 0
        self.started = time.perf_counter()
        self._work_started: float | None = None

    def add(self, row: CohortRow) -> None:
        self.done += 1
        if row.status == "segmented":
            self.segmented += 1
            if self._work_started is None:  # time from the first case on, not model load
                self._work_started = time.perf_counter() - (row.seconds or 0.0)

    def seconds_left(self) -> float | None:
        if not self.segmented or self._work_started is None:
            return None
        pace = (time.perf_counter() - self._work_started) / self.segmented
        return pace * (self.total - self.done)

    def text(self) -> str:
        left = self.seconds_left()
        if left is None:
            return "eta --"
        minutes, seconds = divmod(int(round(left)), 60)
        return f"eta {minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def run_cohort(plan: CohortPlan, settings: BatchSettings, devices: list[str],
               on_row: Callable[[CohortRow, Eta], None] | None = None,
               cancel_event: threading.Event | None = None) -> list[CohortRow]:
    """Segment the plan's cases on `devices`; the cohort CSV holds every finished row."""
    from LymphNodeDGSTLib.engine.cohort.device_workers import segment_on_devices

    plan.output_dir.mkdir(exist_ok=True)
    eta = Eta(len(plan.cases), len(devices))
    done: dict[str, CohortRow] = {}

    def collect(row: CohortRow) -> None:
        done[row.case] = row
        eta.add(row)
        write_cohort_csv(done.values(), plan.csv_path)
        if on_row is not None:
            on_row(row, eta)

    rows = segment_on_devices(plan.cases, plan.output_dir, settings, devices, collect, cancel_event)
    write_cohort_csv(rows, plan.csv_path)
    return rows

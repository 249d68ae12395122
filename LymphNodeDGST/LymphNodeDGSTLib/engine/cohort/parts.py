"""`--part K/N`: a deterministic 1/N share of a cohort, as nnU-Net's `-part_id/-num_parts` does.

The cases are sorted by name and part K (1-based, so a SLURM array `--array=1-N` passes
`$SLURM_ARRAY_TASK_ID` straight through) takes every N-th case starting at the K-th. N jobs that
list the same folder therefore cover every case exactly once, whatever order they run in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, TypeVar

from LymphNodeDGSTLib.errors import UserInputError

T = TypeVar("T")
_PATTERN = re.compile(r"^\s*([0-9]{1,9})\s*/\s*([0-9]{1,9})\s*$", re.ASCII)  # not Arabic-Indic digits
MAX_PARTS = 100_000  # more parts than any cluster runs jobs; bounds the merge's bookkeeping


@dataclass(frozen=True)
class Part:
    """Part `index` (1..count) of `count`."""

    index: int = 1
    count: int = 1

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def tag(self) -> str:
        """File-name tag of this part ('' for the whole cohort)."""
        return "" if self.whole else f"part-{self.index}-of-{self.count}"

    def select(self, names: Sequence[str], items: Sequence[T] | None = None) -> list[T]:
        """This part's share of `items` (default: of `names`), taken in sorted-name order."""
        items = list(names) if items is None else list(items)
        if len(items) != len(names):
            raise ValueError("names and items differ in length")
        order = sorted(range(len(names)), key=lambda i: names[i])
        return [items[i] for i in order[self.index - 1::self.count]]


def parse_part(spec: str | None) -> Part:
    """'K/N' with 1 <= K <= N, e.g. '2/3'; None or '' is the whole cohort."""
    if spec is None or spec == "":
        return Part()
    match = _PATTERN.match(spec)
    if not match:
        raise UserInputError(f"--part '{spec}': write K/N, e.g. 2/3 (part K of N, counted from 1)")
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= count <= MAX_PARTS:
        raise UserInputError(f"--part '{spec}': N must be from 1 to {MAX_PARTS}")
    if not 1 <= index <= count:
        raise UserInputError(f"--part '{spec}': K must be between 1 and N={count} (parts are "
                             "counted from 1)")
    return Part(index, count)

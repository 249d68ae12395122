"""How persistent a sparse selection is: re-selection rate and picks per entry, over a run."""

from __future__ import annotations

import torch
from torch import nn


class SelectionPersistence:
    """Counts, over the applied steps, the sparse entries selected and how often they recur.

    - re-selection rate: of the entries selected in step t, the share selected in step t-1 too
      (summed over steps >= 2);
    - picks per entry: entries selected summed over all steps / distinct entries ever selected.
    Memory: two boolean masks per sparse weight.
    """

    def __init__(self) -> None:
        self.previous: dict[int, torch.Tensor] = {}
        self.ever: dict[int, torch.Tensor] = {}
        self.picks = 0
        self.picks_after_first = 0
        self.reselected = 0

    def update(self, masked: list[tuple[nn.Parameter, torch.Tensor, int]]) -> None:
        """Record one applied step's masks (parameter, mask in the weight's shape, count)."""
        for p, mask, _ in masked:
            key = id(p)
            picked = int(mask.sum())
            self.picks += picked
            previous = self.previous.get(key)
            if previous is not None:
                self.picks_after_first += picked
                self.reselected += int((mask & previous).sum())
                self.ever[key] |= mask
            else:
                self.ever[key] = mask.clone()
            self.previous[key] = mask.clone()

    def distinct(self) -> int:
        return int(sum(int(mask.sum()) for mask in self.ever.values()))

    def summary(self) -> dict:
        """JSON-ready: {} when no sparse entry was ever selected."""
        if not self.picks:
            return {}
        distinct = self.distinct()
        return {"sparse_picks_total": self.picks,
                "sparse_distinct_entries": distinct,
                "sparse_picks_per_entry": self.picks / max(distinct, 1),
                "sparse_reselection_rate": (self.reselected / self.picks_after_first
                                            if self.picks_after_first else None)}

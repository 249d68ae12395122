"""This project's variants of DGST (not the paper's method): dgst-ema (a running average of
|grad| chooses) and dgst-budget (each filter may ever move at most `budget` distinct entries);
dgst-split is `dgst` with a learning-rate factor on the sparse entries (see make_policy).
"""

from __future__ import annotations

import torch
from torch import nn

from LymphNodeDGSTLib.adaptation.dgst.parameters import ParameterInfo
from LymphNodeDGSTLib.adaptation.dgst.policies import SparseFilterPolicy
from LymphNodeDGSTLib.adaptation.dgst.selection import top_gamma_mask


EMA_BETA = 0.9            # dgst-ema: weight of the running average's past
SPLIT_LR_SCALE = 10.0     # dgst-split: learning-rate factor of the sparse convolution entries
BUDGET_PER_GAMMA = 4      # dgst-budget: distinct entries ever moved per filter = 4 x gamma


class RunningAverageTopGammaPolicy(SparseFilterPolicy):
    """Project variant `dgst-ema` (not the paper's): top-`gamma` per output filter of a running
    average of |grad|, `avg = beta * avg + (1 - beta) * |grad|` (the first step: |grad|).

    The average is committed only in `after_step` of a step that really ran, so a step the
    GradScaler skips does not enter it.
    """

    name = "dgst-ema"

    def __init__(self, network: nn.Module, gamma: int = 2, beta: float = EMA_BETA, **sparse_options) -> None:
        super().__init__(network, gamma, **sparse_options)
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.averages: dict[str, torch.Tensor] = {}       # [filters, entries] per weight
        self._pending: dict[str, torch.Tensor] | None = None

    def select(self) -> list[tuple[ParameterInfo, torch.Tensor]]:
        def averaged(info: ParameterInfo, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            previous = self.averages.get(info.name)
            if previous is not None:
                scores.mul_(1.0 - self.beta).add_(previous, alpha=self.beta)
            return top_gamma_mask(scores, self.gamma), scores

        return self._select_per_weight(averaged)

    def after_step(self, stepped: bool) -> None:
        pending = self._take_pending(stepped)
        if pending is not None:
            self.averages.update(pending)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "averages": {k: v.detach().cpu() for k, v in self.averages.items()}}

    def load_state_dict(self, state: dict) -> None:
        devices = {info.name: info.parameter.device for info in self.sparse}
        self.beta = float(state["beta"])
        self.averages = {k: v.to(devices[k]) for k, v in state["averages"].items()}
        self._pending = None


class BudgetTopGammaPolicy(SparseFilterPolicy):
    """Project variant `dgst-budget` (not the paper's): `dgst`'s top-|grad| selection, but each
    output filter may ever move at most `budget` distinct entries.

    Per step and filter: take the top-`gamma` by |grad|; if that would take the filter's count of
    entries ever moved past `budget`, choose instead by (ever moved, |grad|): entries already
    moved first, then new ones by |grad|. So a filter never holds more than `budget` moved entries
    (budget >= gamma), and still moves exactly `gamma` entries per step.
    """

    name = "dgst-budget"

    def __init__(self, network: nn.Module, gamma: int = 2, budget: int = 8, **sparse_options) -> None:
        super().__init__(network, gamma, **sparse_options)
        if int(budget) < self.gamma:
            raise ValueError(f"budget must be >= gamma ({self.gamma}), got {budget}")
        self.budget = int(budget)
        self.ever: dict[str, torch.Tensor] = {}           # [filters, entries] bool per weight
        self._pending: dict[str, torch.Tensor] | None = None

    def select(self) -> list[tuple[ParameterInfo, torch.Tensor]]:
        def within_budget(info: ParameterInfo, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            chosen = top_gamma_mask(scores, self.gamma)
            ever = self.ever.get(info.name)
            if ever is None:
                return chosen, chosen
            over = (ever | chosen).sum(dim=1) > self.budget
            if bool(over.any()):
                # (ever moved, |grad|) order: lift moved entries above every score of the row
                lift = scores.nan_to_num(nan=0.0).amax(dim=1, keepdim=True) + 1.0
                ranked = torch.where(ever, scores + lift, scores)
                chosen[over] = top_gamma_mask(ranked[over], self.gamma)
            return chosen, ever | chosen

        return self._select_per_weight(within_budget)

    def after_step(self, stepped: bool) -> None:
        pending = self._take_pending(stepped)
        if pending is not None:
            self.ever.update(pending)

    def distinct_moved(self) -> int:
        """Distinct convolution entries allowed to move so far."""
        return int(sum(int(mask.sum()) for mask in self.ever.values()))

    def state_dict(self) -> dict:
        return {"budget": self.budget, "ever": {k: v.cpu() for k, v in self.ever.items()}}

    def load_state_dict(self, state: dict) -> None:
        devices = {info.name: info.parameter.device for info in self.sparse}
        self.budget = int(state["budget"])
        self.ever = {k: v.to(devices[k]) for k, v in state["ever"].items()}
        self._pending = None

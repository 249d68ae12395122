"""Update policies: what may change in a step. The base classes, the paper's DGST (re-selected
top-|grad| every step) and the comparison policies (random, static, and the whole-tensor ones:
bias, norm, full).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
import torch
from torch import nn

from LymphNodeDGSTLib.adaptation.dgst.parameters import ParameterInfo, describe_parameters
from LymphNodeDGSTLib.adaptation.dgst.selection import top_gamma_mask
from LymphNodeDGSTLib.errors import UserInputError


@dataclass
class StepPlan:
    """What may change in one step: whole tensors, and tensors restricted to a boolean mask."""

    whole: list[nn.Parameter] = field(default_factory=list)
    masked: list[tuple[nn.Parameter, torch.Tensor, int]] = field(default_factory=list)  # (p, mask, count)


class UpdatePolicy(ABC):
    """Base class: decides which parameters the optimiser holds and what each step may change.

    Constructing a policy sets `requires_grad` on the network: True for what it may train,
    False for the rest (so backward skips gradients nobody uses).
    """

    name = "base"

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.infos = describe_parameters(network)

    def _freeze_all_but(self, trainable: Iterable[ParameterInfo]) -> None:
        keep = {id(info.parameter) for info in trainable}
        for info in self.infos:
            info.parameter.requires_grad_(id(info.parameter) in keep)

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to give the optimiser."""

    @abstractmethod
    def plan(self) -> StepPlan:
        """Called after backward (gradients unscaled): what may change in this step."""

    def optimizer_groups(self) -> list[dict]:
        """Optimizer parameter groups; `lr_scale` multiplies the schedule's learning rate."""
        return [{"params": self.trainable_parameters(), "lr_scale": 1.0}]

    def after_step(self, stepped: bool) -> None:
        """Called after the optimiser step; `stepped` is False when a GradScaler skipped it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        """Counts for the log: parameters in the network, trainable, and changed per step."""
        total = sum(info.parameter.numel() for info in self.infos)
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {"policy": self.name, "parameters": total, "trainable_parameters": trainable,
                "max_entries_per_step": self.max_entries_per_step()}

    def max_entries_per_step(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


class WholeTensorPolicy(UpdatePolicy):
    """Trains a fixed subset of whole parameters (BitFit, norm-only, full fine-tuning)."""

    def __init__(self, network: nn.Module, name: str, rule: Callable[[ParameterInfo], bool]) -> None:
        super().__init__(network)
        self.name = name
        self.trained = [info for info in self.infos if rule(info)]
        self._freeze_all_but(self.trained)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [info.parameter for info in self.trained]

    def plan(self) -> StepPlan:
        return StepPlan(whole=self.trainable_parameters())


class SparseFilterPolicy(UpdatePolicy):
    """`gamma` entries per output filter of every convolution + the always-trained set.

    Subclasses decide which entries (`select`).
    """

    name = "sparse"

    def __init__(self, network: nn.Module, gamma: int = 2, selection_only: bool = False,
                 sparse_lr_scale: float = 1.0, allow_full_selection: bool = False) -> None:
        """`allow_full_selection`: accept a gamma that selects whole kernels (tests comparing the
        masked step with a plain one); users are refused it, since it is full fine-tuning."""
        super().__init__(network)
        if int(gamma) < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.gamma = int(gamma)
        self.selection_only = bool(selection_only)
        self.sparse_lr_scale = float(sparse_lr_scale)
        self.always = [] if self.selection_only else [info for info in self.infos if info.always_trained]
        self.sparse = [info for info in self.infos
                       if info.layout is not None and not info.always_trained]
        largest = max((info.layout.filter_size for info in self.sparse), default=0)
        if self.sparse and self.gamma >= largest and not allow_full_selection:
            raise UserInputError(f"gamma {self.gamma} selects every entry of every kernel (the "
                                 f"largest holds {largest}): that is full fine-tuning; use "
                                 "--method full, or a gamma below that")
        self._freeze_all_but(self.always + self.sparse)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [info.parameter for info in self.always + self.sparse]

    def optimizer_groups(self) -> list[dict]:
        groups = [{"params": [info.parameter for info in self.always], "lr_scale": 1.0},
                  {"params": [info.parameter for info in self.sparse], "lr_scale": self.sparse_lr_scale}]
        return [group for group in groups if group["params"]]

    def describe(self) -> dict:
        return {**super().describe(), "selection_only": self.selection_only,
                "sparse_lr_scale": self.sparse_lr_scale}

    def entries_in(self, info: ParameterInfo) -> int:
        assert info.layout is not None
        return info.layout.n_filters * min(self.gamma, info.layout.filter_size)

    def max_entries_per_step(self) -> int:
        return (sum(info.parameter.numel() for info in self.always)
                + sum(self.entries_in(info) for info in self.sparse))

    @abstractmethod
    def select(self) -> list[tuple[ParameterInfo, torch.Tensor]]:
        """Masks (in the weight's own shape) for the convolution weights allowed in this step."""

    def plan(self) -> StepPlan:
        masked = [(info.parameter, mask, self.entries_in(info)) for info, mask in self.select()]
        return StepPlan(whole=[info.parameter for info in self.always], masked=masked)

    def _select_by_filter_size(self, scores_for: Callable[[list[ParameterInfo]], torch.Tensor]
                               ) -> list[tuple[ParameterInfo, torch.Tensor]]:
        """Masks for every convolution weight that has a gradient.

        Layers whose filters have the same length (on the same device) are stacked, so one
        selection serves them all: on a GPU the cost is kernel launches, not arithmetic.
        `scores_for(infos)` returns their fresh, stacked `[filters, entries]` scores.
        """
        groups: dict[tuple[int, torch.device], list[ParameterInfo]] = {}
        for info in self.sparse:
            if info.parameter.grad is not None:
                assert info.layout is not None
                groups.setdefault((info.layout.filter_size, info.parameter.device), []).append(info)
        masks = []
        for infos in groups.values():
            stacked = top_gamma_mask(scores_for(infos), self.gamma, overwrite_scores=True)
            parts = stacked.split([info.layout.n_filters for info in infos])
            masks.extend((info, info.layout.from_filters(part)) for info, part in zip(infos, parts))
        return masks

    def _mask_from_scores(self, info: ParameterInfo, scores: torch.Tensor) -> torch.Tensor:
        """Mask in the weight's shape; `scores` ([filters, entries], owned by us) is overwritten."""
        assert info.layout is not None
        return info.layout.from_filters(top_gamma_mask(scores, self.gamma, overwrite_scores=True))

    def _select_per_weight(self, choose: Callable[[ParameterInfo, torch.Tensor], tuple[torch.Tensor | None, Any]]
                           ) -> list[tuple[ParameterInfo, torch.Tensor]]:
        """The one selection loop of the stateful dgst family (dgst-ema, dgst-budget, static's
        warm-up): for each convolution weight with a gradient, `choose(info, scores)` gets its fresh
        |grad| scores ([filters, entries]) and returns (the [filters, entries] mask for this step,
        or None; the state to keep if the step runs). The states wait in `_pending` until
        `after_step`, so a step the GradScaler skips leaves no trace."""
        pending, masks = {}, []
        for info in self.sparse:
            gradient = info.parameter.grad
            if gradient is None:
                continue
            mask, state = choose(info, self._gradient_scores(info, gradient))
            pending[info.name] = state
            if mask is not None:
                masks.append((info, info.layout.from_filters(mask)))
        self._pending = pending
        return masks

    def _take_pending(self, stepped: bool) -> dict[str, Any] | None:
        """The states `_select_per_weight` left for this step, if the step ran."""
        pending, self._pending = getattr(self, "_pending", None), None
        return pending if stepped else None

    def _gradient_scores(self, info: ParameterInfo, gradient: torch.Tensor) -> torch.Tensor:
        """|grad| as [filters, entries], a fresh tensor (NaN stays NaN: selected first)."""
        assert info.layout is not None
        return info.layout.to_filters(gradient.abs())


class DynamicTopGammaPolicy(SparseFilterPolicy):
    """DGST: the `gamma` entries with the largest |grad| per output filter, re-selected every step."""

    name = "dgst"

    def __init__(self, network: nn.Module, gamma: int = 2, name: str = "dgst", **sparse_options) -> None:
        super().__init__(network, gamma, **sparse_options)
        self.name = name

    def select(self) -> list[tuple[ParameterInfo, torch.Tensor]]:
        def gradient_scores(infos: list[ParameterInfo]) -> torch.Tensor:
            gradient = infos[0].parameter.grad
            scores = torch.empty(sum(info.layout.n_filters for info in infos), infos[0].layout.filter_size,
                                 device=gradient.device, dtype=gradient.dtype)
            for info, rows in zip(infos, scores.split([info.layout.n_filters for info in infos])):
                torch.abs(info.layout.to_filters(info.parameter.grad), out=rows)
            return scores

        return self._select_by_filter_size(gradient_scores)


class RandomPolicy(SparseFilterPolicy):
    """`gamma` random entries per output filter, re-drawn every step from a seeded generator."""

    name = "random"

    def __init__(self, network: nn.Module, gamma: int = 2, seed: int = 0, **sparse_options) -> None:
        super().__init__(network, gamma, **sparse_options)
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def select(self) -> list[tuple[ParameterInfo, torch.Tensor]]:
        def random_scores(infos: list[ParameterInfo]) -> torch.Tensor:
            device = infos[0].parameter.device
            return torch.rand(sum(info.layout.n_filters for info in infos), infos[0].layout.filter_size,
                              generator=self._generator(device), device=device)

        return self._select_by_filter_size(random_scores)

    def state_dict(self) -> dict:
        return {"seed": self.seed,
                "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._generators = {}
        for device_name, generator_state in state.get("generators", {}).items():
            self._generator(torch.device(device_name)).set_state(generator_state)


class StaticPolicy(SparseFilterPolicy):
    """GPS-style: `gamma` entries per filter chosen once from |grad| summed over the first
    `warmup_steps` applied steps, then fixed. During warm-up only the always-trained set moves."""

    name = "static"

    def __init__(self, network: nn.Module, gamma: int = 2, warmup_steps: int = 10,
                 **sparse_options) -> None:
        super().__init__(network, gamma, **sparse_options)
        if int(warmup_steps) < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.warmup_seen = 0
        self._accumulated: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] | None = None
        self.fixed_masks: dict[str, torch.Tensor] | None = None

    def select(self) -> list[tuple[ParameterInfo, torch.Tensor]]:
        if self.fixed_masks is not None:
            return [(info, self.fixed_masks[info.name]) for info in self.sparse
                    if info.name in self.fixed_masks and info.parameter.grad is not None]
        # Warm-up: sum |grad| (committed in after_step, so a skipped step does not poison the
        # sum); only the always-trained set moves meanwhile.
        def summed(info: ParameterInfo, scores: torch.Tensor) -> tuple[None, torch.Tensor]:
            previous = self._accumulated.get(info.name)
            return None, scores if previous is None else previous + scores

        return self._select_per_weight(summed)

    def after_step(self, stepped: bool) -> None:
        pending = self._take_pending(stepped)
        if pending is None:
            return
        self._accumulated.update(pending)
        self.warmup_seen += 1
        if self.warmup_seen >= self.warmup_steps:
            by_name = {info.name: info for info in self.sparse}
            self.fixed_masks = {name: self._mask_from_scores(by_name[name], scores)
                                for name, scores in self._accumulated.items()}
            self._accumulated = {}

    def state_dict(self) -> dict:
        return {"warmup_seen": self.warmup_seen,
                "accumulated": {k: v.detach().cpu() for k, v in self._accumulated.items()},
                "fixed_masks": None if self.fixed_masks is None
                else {k: v.cpu() for k, v in self.fixed_masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        devices = {info.name: info.parameter.device for info in self.sparse}
        self.warmup_seen = int(state["warmup_seen"])
        self._accumulated = {k: v.to(devices[k]) for k, v in state["accumulated"].items()}
        fixed = state["fixed_masks"]
        self.fixed_masks = None if fixed is None else {k: v.to(devices[k]) for k, v in fixed.items()}
        self._pending = None

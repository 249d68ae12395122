"""Sparse update policies and the masked optimiser step of DGST fine-tuning.

A *policy* answers, once per iteration and after the backward pass, "which entries of which
parameters may change in this step". A `MaskedStepper` then applies any torch optimiser (SGD with
momentum/Nesterov/weight decay, Adam, AdamW, ...) so that every entry the policy did not allow is
bitwise unchanged by the step: it masks the gradient (so clipping and the optimiser state see the
gradient that is really applied) *and* restores the disallowed entries after the optimiser's
update (so momentum and weight decay cannot move them).

Policies (`make_policy(name, network, ...)`):
  dgst    top-`gamma` entries by |grad| per output filter of every convolution, re-selected every
          step, plus the always-trained set (norm affine parameters, all biases, `seg_layers`)
  random  `gamma` random entries per output filter, re-drawn every step, plus the always-trained set
  static  `gamma` entries per output filter chosen once from |grad| summed over the first
          `warmup_steps` applied steps (only the always-trained set moves meanwhile), then fixed
  bias    all biases + `seg_layers` (BitFit)
  norm    norm affine parameters + `seg_layers`
  full    everything
  lora    PEFT LoRA adapters on every convolution outside `seg_layers` + biases + `seg_layers`;
          `merge_lora` folds them back into plain convolution weights

This project's variants of DGST (not the paper's method; `dgst` above is the paper's, unchanged):
  dgst-ema     top-`gamma` per filter of a running average of |grad| (EMA, beta 0.9), so the
               selection is steadier and momentum gets several steps on the same entries
  dgst-split   `dgst`'s selection; the sparse convolution entries get 10x the learning rate of the
               always-trained set (optimizer parameter groups with an `lr_scale`)
  dgst-budget  `dgst`'s selection, but each filter may ever move at most 4 x `gamma` distinct
               entries; once a filter's budget would be exceeded it re-selects among its moved
               entries first (bounds the drift from the foundation and the adapter size)

Every sparse policy takes `selection_only=True`: the always-trained set is frozen too, so only
the selected convolution entries move (an ablation: does the selection itself matter?).

Use in a training step (nnU-Net's train_step, with or without a GradScaler)::

    policy = make_policy("dgst", network, gamma=2)          # after loading the foundation weights
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1e-3, momentum=0.99,
                                nesterov=True, weight_decay=3e-5)
    stepper = MaskedStepper(policy, max_grad_norm=12.0)
    ...
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        report = stepper.step(optimizer)            # select, mask, clip, step, restore
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)                  # optional: step() unscales if you did not
        report = stepper.step(optimizer, scaler)    # calls scaler.step(optimizer) itself
        scaler.update()
    report.entries_updated                          # entries allowed to change in this step

Selection ties: exactly min(gamma, filter size) entries are chosen in every filter; among equal
scores the entry with the lowest position in the filter (row-major over input channel and kernel
position) wins, on every device.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
import functools
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from LymphNodeDGSTLib.adaptation.selection_stats import SelectionPersistence
from LymphNodeDGSTLib.errors import UserInputError

POLICY_NAMES = ("dgst", "random", "static", "bias", "norm", "full", "lora",
                "dgst-ema", "dgst-split", "dgst-budget")
SPARSE_POLICY_NAMES = ("dgst", "random", "static", "dgst-ema", "dgst-split", "dgst-budget")
EMA_BETA = 0.9            # dgst-ema: weight of the running average's past
SPLIT_LR_SCALE = 10.0     # dgst-split: learning-rate factor of the sparse convolution entries
BUDGET_PER_GAMMA = 4      # dgst-budget: distinct entries ever moved per filter = 4 x gamma
SEG_LAYERS = "seg_layers"

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, getattr(nn, "RMSNorm", None))
    if t is not None
)


# ----------------------------------------------------------------------------------------------
# Output filters of convolution weights

@dataclass(frozen=True)
class FilterLayout:
    """How a convolution weight splits into output filters (kernels).

    Conv weights are `[out, in/groups, *k]` (filter = dim 0); transposed-conv weights are
    `[in, out/groups, *k]` (filter = dim 1 within each group).
    """

    shape: torch.Size
    transposed: bool
    groups: int = 1

    @classmethod
    def of(cls, conv: _ConvNd) -> "FilterLayout":
        return cls(conv.weight.shape, bool(conv.transposed), int(conv.groups))

    @property
    def n_filters(self) -> int:
        return self.shape[1] * self.groups if self.transposed else self.shape[0]

    @property
    def filter_size(self) -> int:
        return self.shape.numel() // self.n_filters

    def to_filters(self, tensor: torch.Tensor) -> torch.Tensor:
        """`[n_filters, filter_size]`: a view for convolutions, a copy for transposed ones."""
        if not self.transposed:
            return tensor.reshape(self.n_filters, self.filter_size)
        g = self.groups
        in_per_group, out_per_group = self.shape[0] // g, self.shape[1]
        grouped = tensor.reshape(g, in_per_group, out_per_group, -1).transpose(1, 2)
        return grouped.reshape(self.n_filters, self.filter_size)

    def from_filters(self, filters: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_filters`: back to the weight's own shape."""
        if not self.transposed:
            return filters.reshape(self.shape)
        g = self.groups
        in_per_group, out_per_group = self.shape[0] // g, self.shape[1]
        grouped = filters.reshape(g, out_per_group, in_per_group, -1).transpose(1, 2)
        return grouped.reshape(self.shape)


ITERATIVE_MAX_LIMIT = 8  # up to this gamma, k row-wise max passes beat one topk


def top_gamma_mask(scores: torch.Tensor, gamma: int, overwrite_scores: bool = False) -> torch.Tensor:
    """Boolean mask of the `gamma` largest scores in every row of a 2-D tensor.

    Exactly `min(gamma, row length)` entries per row; among equal scores the lowest column index
    wins; NaN counts as larger than any finite number. O(numel), no sort and no one-hot matrix: for small
    gamma, gamma passes of a row-wise `max` (which returns the first maximal index, NaN first)
    with a scatter after each; otherwise one `topk` for the per-row threshold plus elementwise
    passes. Scores must not hold -inf. With `overwrite_scores`, `scores` is used as scratch space.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [filters, entries], got shape {tuple(scores.shape)}")
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    row_length = scores.shape[1]
    k = min(int(gamma), row_length)
    if k == row_length:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= ITERATIVE_MAX_LIMIT:
        remaining = scores if overwrite_scores else scores.clone()
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for picked in range(k):
            index = remaining.max(dim=1, keepdim=True).indices
            mask.scatter_(1, index, True)
            if picked < k - 1:
                remaining.scatter_(1, index, float("-inf"))
        return mask
    scores = scores.nan_to_num_(nan=float("inf")) if overwrite_scores \
        else scores.nan_to_num(nan=float("inf"))
    threshold = scores.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = scores > threshold
    at_threshold = scores == threshold
    still_needed = k - above.sum(dim=1, keepdim=True, dtype=torch.int32)
    order_at_threshold = at_threshold.cumsum(dim=1, dtype=torch.int32)
    return above | (at_threshold & (order_at_threshold <= still_needed))


# ----------------------------------------------------------------------------------------------
# Parameter roles

@dataclass(frozen=True)
class ParameterInfo:
    """One parameter of the network and the roles that decide how policies treat it."""

    name: str
    parameter: nn.Parameter = field(repr=False)
    is_bias: bool
    is_norm: bool
    in_seg_layers: bool
    layout: FilterLayout | None  # set for convolution weights

    @property
    def always_trained(self) -> bool:
        """Norm affine parameters, all biases and the segmentation heads."""
        return self.is_bias or self.is_norm or self.in_seg_layers


def describe_parameters(network: nn.Module) -> list[ParameterInfo]:
    """Every parameter of `network` (shared ones once), named as `named_parameters()` names it."""
    infos: list[ParameterInfo] = []
    seen: set[int] = set()
    for module_name, module in network.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            name = f"{module_name}.{parameter_name}" if module_name else parameter_name
            is_conv_weight = isinstance(module, _ConvNd) and parameter_name == "weight"
            infos.append(ParameterInfo(
                name=name,
                parameter=parameter,
                is_bias=parameter_name == "bias",
                is_norm=isinstance(module, _NORM_TYPES),
                in_seg_layers=SEG_LAYERS in name.split("."),
                layout=FilterLayout.of(module) if is_conv_weight else None,
            ))
    return infos


# ----------------------------------------------------------------------------------------------
# Policies

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
        pending, masks = {}, []
        for info in self.sparse:
            gradient = info.parameter.grad
            if gradient is None:
                continue
            scores = self._gradient_scores(info, gradient)
            previous = self.averages.get(info.name)
            if previous is not None:
                scores.mul_(1.0 - self.beta).add_(previous, alpha=self.beta)
            pending[info.name] = scores
            masks.append((info, info.layout.from_filters(top_gamma_mask(scores, self.gamma))))
        self._pending = pending
        return masks

    def after_step(self, stepped: bool) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and stepped:
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
        pending, masks = {}, []
        for info in self.sparse:
            gradient = info.parameter.grad
            if gradient is None:
                continue
            scores = self._gradient_scores(info, gradient)
            chosen = top_gamma_mask(scores, self.gamma)
            ever = self.ever.get(info.name)
            if ever is not None:
                after = (ever | chosen).sum(dim=1)
                over = after > self.budget
                if bool(over.any()):
                    # (ever moved, |grad|) order: lift moved entries above every score of the row
                    lift = scores.nan_to_num(nan=0.0).amax(dim=1, keepdim=True) + 1.0
                    ranked = torch.where(ever, scores + lift, scores)
                    chosen[over] = top_gamma_mask(ranked[over], self.gamma)
                chosen_ever = ever | chosen
            else:
                chosen_ever = chosen
            pending[info.name] = chosen_ever
            masks.append((info, info.layout.from_filters(chosen)))
        self._pending = pending
        return masks

    def after_step(self, stepped: bool) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and stepped:
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
        # Warm-up: sum |grad|, but only commit it in after_step, so a step the GradScaler skips
        # (non-finite gradients) does not poison the sum.
        pending = {}
        for info in self.sparse:
            gradient = info.parameter.grad
            if gradient is None:
                continue
            scores = self._gradient_scores(info, gradient)
            previous = self._accumulated.get(info.name)
            pending[info.name] = scores if previous is None else previous + scores
        self._pending = pending
        return []

    def after_step(self, stepped: bool) -> None:
        pending, self._pending = self._pending, None
        if pending is None or not stepped:
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


# ----------------------------------------------------------------------------------------------
# LoRA (PEFT)

@functools.cache
def _lora_conv_transpose_class() -> type:
    """A PEFT LoRA layer for transposed convolutions, which PEFT itself does not support.

    A is a transposed convolution `in -> r` with the base layer's kernel, stride and padding; B is
    a pointwise transposed convolution `r -> out`. Both are linear, so
    `delta_W[i, o, ...] = scaling * sum_r A[i, r, ...] * B[r, o]` reproduces B(A(x)) exactly.
    """
    from peft.tuners.lora.layer import _ConvNd as LoraConvNd

    class LoraConvTranspose(LoraConvNd):
        def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
            target = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
            if target.groups != 1:
                raise ValueError("LoRA on grouped transposed convolutions is not supported")
            super().__init__(base_layer, adapter_name, **kwargs)
            self.conv_fn = getattr(torch.nn.functional, f"conv_transpose{self._kernel_dim - 2}d")
            lora_a = self.lora_A[adapter_name]
            lora_a.output_padding, lora_a.dilation = target.output_padding, target.dilation

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_channels, module.out_channels

        @property
        def lora_variants(self) -> dict:
            return {(): None}

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            weight_a = self.lora_A[adapter].weight  # [in, r, *k]
            weight_b = self.lora_B[adapter].weight.flatten(1)  # [r, out]
            dtype = self.get_base_layer().weight.dtype
            delta = torch.einsum("ir...,ro->io...", weight_a.float(), weight_b.float())
            return (delta * self.scaling[adapter]).to(dtype)

    return LoraConvTranspose


def _replace_modules_everywhere(network: nn.Module, replacements: dict[int, nn.Module],
                                skip_parents: set[int] = frozenset()) -> None:
    """Point every reference to a replaced module at its replacement.

    nnU-Net's blocks hold each convolution twice (`conv` and `all_modules.0`, the one forward
    uses), and the decoder holds the encoder; PEFT only swaps the first name it sees.
    """
    for parent in list(network.modules()):
        if id(parent) in skip_parents:
            continue
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]


def inject_lora(network: nn.Module, rank: int = 32, alpha: float = 16, dropout: float = 0.1) -> nn.Module:
    """Insert PEFT LoRA adapters (in place) on every convolution outside `seg_layers`."""
    from peft import LoraConfig, inject_adapter_in_model

    originals = {name: module for name, module in network.named_modules()
                 if isinstance(module, _ConvNd) and SEG_LAYERS not in name.split(".")}
    if not originals:
        raise ValueError("the network has no convolution to put LoRA adapters on")
    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout),
                        target_modules=list(originals), bias="none")
    transpose_layer = _lora_conv_transpose_class()
    config._register_custom_module({nn.ConvTranspose1d: transpose_layer,
                                    nn.ConvTranspose2d: transpose_layer,
                                    nn.ConvTranspose3d: transpose_layer})
    inject_adapter_in_model(config, network)
    wrappers = {id(module): network.get_submodule(name) for name, module in originals.items()}
    _replace_modules_everywhere(network, wrappers, skip_parents={id(w) for w in wrappers.values()})
    return network


def _peft_misreads_kernel(module: nn.Module) -> bool:
    """PEFT (0.21) merges any convolution whose weight is 1x1 in dims 2-3 as a 2-D 1x1 conv, which
    fails for Conv3d kernels 1x1xk, e.g. the 1x1x1 skip projections of ResEnc's residual blocks."""
    base = module.get_base_layer()
    return isinstance(base, nn.Conv3d) and tuple(base.weight.shape[2:4]) == (1, 1)


def _merge_by_convolution(module: nn.Module) -> None:
    """Fold a Conv3d LoRA adapter into its base weight: W[o, i, k] += s * sum_r B[o, r] A[r, i, k]."""
    base = module.get_base_layer()
    if base.groups != 1:
        raise ValueError("LoRA merge of grouped 1x1xk convolutions is not supported")
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        weight_a, weight_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        delta = torch.nn.functional.conv3d(weight_a.float().transpose(0, 1), weight_b.float())
        base.weight.data += (delta.transpose(0, 1) * module.scaling[adapter]).to(base.weight.dtype)


def merge_lora(network: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base convolution, in place; returns the plain network.

    Afterwards the state_dict has exactly the keys of the network before `inject_lora`, and
    inference needs no PEFT.
    """
    from peft.tuners.lora import LoraLayer

    bases = {}
    for module in network.modules():
        if isinstance(module, LoraLayer):
            if _peft_misreads_kernel(module):
                _merge_by_convolution(module)
            else:
                module.merge(safe_merge=True)
            bases[id(module)] = module.get_base_layer()
    _replace_modules_everywhere(network, bases)
    return network


def merged_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state_dict (original keys) of a LoRA-injected network; the network is untouched."""
    return merge_lora(copy.deepcopy(network)).state_dict()


class LoRAPolicy(WholeTensorPolicy):
    """LoRA adapters (PEFT) on every convolution + all biases + `seg_layers`.

    Build it after loading the foundation weights: it changes the network's modules and keys.
    Call `merge_lora(network)` (or `merged_state_dict`) before saving a plain nnU-Net checkpoint.
    """

    def __init__(self, network: nn.Module, rank: int = 32, alpha: float = 16,
                 dropout: float = 0.1) -> None:
        inject_lora(network, rank=rank, alpha=alpha, dropout=dropout)
        self.rank, self.alpha, self.dropout = int(rank), alpha, float(dropout)
        super().__init__(network, "lora", lambda info: (
            ".lora_" in f".{info.name}" or info.is_bias or info.in_seg_layers))


# ----------------------------------------------------------------------------------------------
# Factory

def make_policy(name: str, network: nn.Module, gamma: int = 2, seed: int = 0,
                warmup_steps: int = 10, lora_rank: int = 32, lora_alpha: float = 16,
                lora_dropout: float = 0.1, selection_only: bool = False,
                allow_full_selection: bool = False) -> UpdatePolicy:
    """The update policy called `name` (one of POLICY_NAMES) for `network`.

    `selection_only` (sparse policies only) freezes the always-trained set as well;
    `allow_full_selection` lets a sparse policy take a gamma that covers whole kernels.
    """
    if selection_only and name not in SPARSE_POLICY_NAMES:
        raise ValueError(f"selection-only needs a sparse method ({', '.join(SPARSE_POLICY_NAMES)}), "
                         f"not {name!r}")
    sparse = {"selection_only": selection_only, "allow_full_selection": allow_full_selection}
    if name == "dgst":
        return DynamicTopGammaPolicy(network, gamma, **sparse)
    if name == "dgst-split":
        return DynamicTopGammaPolicy(network, gamma, sparse_lr_scale=SPLIT_LR_SCALE, name="dgst-split",
                                     **sparse)
    if name == "dgst-ema":
        return RunningAverageTopGammaPolicy(network, gamma, beta=EMA_BETA, **sparse)
    if name == "dgst-budget":
        return BudgetTopGammaPolicy(network, gamma, budget=BUDGET_PER_GAMMA * gamma, **sparse)
    if name == "random":
        return RandomPolicy(network, gamma, seed=seed, **sparse)
    if name == "static":
        return StaticPolicy(network, gamma, warmup_steps=warmup_steps, **sparse)
    if name == "bias":
        return WholeTensorPolicy(network, "bias", lambda i: i.is_bias or i.in_seg_layers)
    if name == "norm":
        return WholeTensorPolicy(network, "norm", lambda i: i.is_norm or i.in_seg_layers)
    if name == "full":
        return WholeTensorPolicy(network, "full", lambda i: True)
    if name == "lora":
        return LoRAPolicy(network, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout)
    raise ValueError(f"unknown update policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


# ----------------------------------------------------------------------------------------------
# The masked step

@dataclass(frozen=True)
class StepReport:
    """What one `MaskedStepper.step` did."""

    stepped: bool                 # False when a GradScaler skipped the step (non-finite gradients)
    entries_updated: int          # entries the step was allowed to change (0 when skipped)
    sparse_entries: int           # of which selected entries of partially trained tensors
    grad_norm: float | None       # norm of the applied gradients, when clipping


class MaskedStepper:
    """Runs an optimiser step that changes only what the policy allows, bitwise.

    Per step: ask the policy for the plan; drop the gradients of parameters not allowed at all
    (torch optimisers skip parameters whose grad is None); zero the gradients of disallowed
    entries; add the optional L2-to-foundation gradient `foundation_l2 * (w - w_foundation)` on
    the allowed entries; clip the applied gradients; add coupled weight decay (SGD, Adam, ...:
    `weight_decay * w`) on the allowed entries only and step with the group's weight decay set to
    0; snapshot the partially allowed tensors; step; copy the snapshot back into every disallowed
    entry. So a disallowed entry's value never changes, and its optimiser state evolves exactly as
    with a zero gradient (SGD momentum: `buf = momentum * buf`, no weight-decay term). Decoupled
    weight decay (AdamW) acts on the value only, which is restored.
    """

    def __init__(self, policy: UpdatePolicy, max_grad_norm: float | None = None,
                 foundation_l2: float = 0.0) -> None:
        self.policy = policy
        self.max_grad_norm = max_grad_norm
        self.foundation_l2 = float(foundation_l2)
        self.foundation: dict[int, torch.Tensor] = {}
        if self.foundation_l2 > 0:
            self.foundation = {id(p): p.detach().clone() for p in policy.trainable_parameters()}
        self.entries_history: list[int] = []
        self.persistence = SelectionPersistence()
        self.steps = 0
        self.steps_applied = 0
        self._zeros: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _zero(self, like: torch.Tensor) -> torch.Tensor:
        """A cached 0-dim zero on `like`'s device and dtype (torch.where needs a tensor for out=)."""
        key = (like.device, like.dtype)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros((), device=like.device, dtype=like.dtype)
        return self._zeros[key]

    @property
    def total_entries_updated(self) -> int:
        return sum(self.entries_history)

    def step(self, optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler | None" = None) -> StepReport:
        """Select, mask, clip, step (through `scaler` when given) and restore. Call after backward."""
        if scaler is not None:
            _unscale_once(scaler, optimizer)
        plan = self.policy.plan()
        whole = [p for p in plan.whole if p.grad is not None]
        masked = [(p, mask, count) for p, mask, count in plan.masked if p.grad is not None]
        allowed = {id(p) for p in whole} | {id(p) for p, _, _ in masked}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in allowed:
                    p.grad = None

        for p, mask, _ in masked:
            torch.where(mask, p.grad, self._zero(p.grad), out=p.grad)
        if self.foundation_l2 > 0:
            self._add_foundation_gradient(whole, masked)

        grad_norm = None
        applied = whole + [p for p, _, _ in masked]
        if self.max_grad_norm is not None and applied:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(applied, self.max_grad_norm))

        decays = self._apply_weight_decay_to_allowed(optimizer, masked)
        snapshots = [p.detach().clone() for p, _, _ in masked]
        try:
            stepped = _run_optimizer_step(optimizer, scaler)
        finally:
            for group, decay in decays:
                group["weight_decay"] = decay
        if stepped:
            with torch.no_grad():
                for (p, mask, _), snapshot in zip(masked, snapshots):
                    torch.where(mask, p, snapshot, out=p)
            self.persistence.update(masked)
        del snapshots
        self.policy.after_step(stepped)

        sparse_entries = sum(count for _, _, count in masked) if stepped else 0
        entries = (sum(p.numel() for p in whole) + sparse_entries) if stepped else 0
        self.steps += 1
        self.steps_applied += int(stepped)
        self.entries_history.append(entries)
        return StepReport(stepped, entries, sparse_entries, grad_norm)

    def _apply_weight_decay_to_allowed(self, optimizer: torch.optim.Optimizer,
                                       masked: list[tuple[nn.Parameter, torch.Tensor, int]]
                                       ) -> list[tuple[dict, float]]:
        """Add coupled weight decay to the gradients of allowed entries only; set the groups'
        weight decay to 0 for the step. Returns (group, weight decay) pairs to restore."""
        if isinstance(optimizer, torch.optim.AdamW):
            return []
        masks = {id(p): mask for p, mask, _ in masked}
        changed = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                decay = group.get("weight_decay", 0.0)
                if not decay or group.get("decoupled_weight_decay", False):
                    continue
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    mask = masks.get(id(p))
                    if mask is None:
                        p.grad.add_(p, alpha=decay)
                    else:
                        p.grad.add_(torch.where(mask, p, self._zero(p)), alpha=decay)
                changed.append((group, decay))
                group["weight_decay"] = 0.0
        return changed

    def _add_foundation_gradient(self, whole: list[nn.Parameter],
                                 masked: list[tuple[nn.Parameter, torch.Tensor, int]]) -> None:
        with torch.no_grad():
            for p in whole:
                p.grad.add_(p - self.foundation[id(p)], alpha=self.foundation_l2)
            for p, mask, _ in masked:
                pull = torch.where(mask, p - self.foundation[id(p)], self._zero(p))
                p.grad.add_(pull, alpha=self.foundation_l2)

    def summary(self) -> dict:
        """JSON-serialisable totals for the training log."""
        described = self.policy.describe()
        steps = max(self.steps_applied, 1)
        return {**described,
                **self.persistence.summary(),
                "steps": self.steps,
                "steps_applied": self.steps_applied,
                "entries_updated_total": self.total_entries_updated,
                "entries_updated_per_step_mean": self.total_entries_updated / steps,
                "share_updated_per_step_mean": (self.total_entries_updated / steps)
                / max(described["parameters"], 1)}


def _unscale_once(scaler: "torch.amp.GradScaler", optimizer: torch.optim.Optimizer) -> None:
    """`scaler.unscale_(optimizer)` unless the caller already did it in this iteration."""
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as error:
        if "already been called" not in str(error):
            raise


def _run_optimizer_step(optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler | None") -> bool:
    """Step (through the scaler when given); True if the optimiser really stepped."""
    ran = []
    handle = optimizer.register_step_post_hook(lambda *_: ran.append(True))
    try:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
    finally:
        handle.remove()
    return bool(ran)

"""Which part of a network an adaptation moved: per-part shares of the weight change, and
state_dicts with one part's changes undone (to measure what each part contributes to Dice).

Parts of an nnU-Net PlainConvUNet state_dict, by key and shape:
  head  every tensor under `seg_layers`
  conv  the other convolution weights (5-D or 4-D `.weight`): DGST's sparse set
  bias  the other `.bias` tensors
  norm  the rest of the floating-point tensors (normalisation affine weights)
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from LymphNodeDGSTLib.engine.store.state_dicts import alias_key

PARTS = ("conv", "norm", "bias", "head")
ALWAYS_TRAINED_PARTS = ("norm", "bias", "head")


def part_of(key: str, tensor: torch.Tensor) -> str:
    """The part (one of PARTS) a floating-point state_dict entry belongs to."""
    if "seg_layers" in key.split("."):
        return "head"
    if key.endswith(".weight") and tensor.dim() >= 4:
        return "conv"
    if key.endswith(".bias"):
        return "bias"
    return "norm"


def change_shares(foundation: Mapping[str, torch.Tensor], adapted: Mapping[str, torch.Tensor]) -> dict:
    """Share of the total squared change `sum (w - w_foundation)^2` per part (aliases once)."""
    sums = {part: 0.0 for part in PARTS}
    seen: set[tuple] = set()
    for key, before in foundation.items():
        if not before.is_floating_point():
            continue
        alias = alias_key(before)
        if alias is not None:
            if alias in seen:
                continue
            seen.add(alias)
        difference = adapted[key].detach().double().cpu() - before.detach().double().cpu()
        sums[part_of(key, before)] += float((difference * difference).sum())
    total = sum(sums.values())
    return {part: (value / total if total > 0 else 0.0) for part, value in sums.items()}


def with_parts_reset(foundation: Mapping[str, torch.Tensor], adapted: Mapping[str, torch.Tensor],
                     parts: Iterable[str]) -> dict[str, torch.Tensor]:
    """The adapted state_dict with every tensor of `parts` set back to the foundation's value."""
    parts = set(parts)
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; parts are {', '.join(PARTS)}")
    return {key: (foundation[key] if value.is_floating_point() and part_of(key, value) in parts else value)
            for key, value in adapted.items()}

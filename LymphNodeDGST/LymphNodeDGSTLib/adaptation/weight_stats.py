"""How much of a network moved: bitwise comparison of two state_dicts.

Used at the end of an adaptation to log, per tensor and in total, the share of the weights that
differ from the foundation model.
"""

from __future__ import annotations

from typing import Mapping

import torch

from LymphNodeDGSTLib.engine.store.state_dicts import alias_key

_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def count_changed(before: torch.Tensor, after: torch.Tensor) -> int:
    """Entries whose bits differ (so -0.0 vs 0.0 counts as changed and NaN vs same NaN does not)."""
    if before.shape != after.shape or before.dtype != after.dtype:
        raise ValueError(f"cannot compare {tuple(before.shape)}/{before.dtype} "
                         f"with {tuple(after.shape)}/{after.dtype}")
    before, after = before.detach().cpu().contiguous(), after.detach().cpu().contiguous()
    if before.is_complex():
        before, after = torch.view_as_real(before), torch.view_as_real(after)
        return int((_as_bits(before) != _as_bits(after)).any(dim=-1).sum())
    return int((_as_bits(before) != _as_bits(after)).sum())


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == torch.bool:
        return tensor.view(torch.uint8)
    return tensor.view(_SAME_SIZE_INTEGER[tensor.element_size()])


def weight_change_summary(foundation: Mapping[str, torch.Tensor],
                          adapted: Mapping[str, torch.Tensor],
                          floating_only: bool = True) -> dict:
    """Per tensor and in total: entries, how many differ bitwise, and their share (JSON-ready).

    Both state_dicts must have the same keys and shapes (merge LoRA adapters first). A key that
    aliases an earlier key's tensor in either state_dict (nnU-Net's networks hold every
    convolution under two to four names) is counted once, under the first name. With
    `floating_only`, integer buffers (e.g. `num_batches_tracked`) are left out.
    """
    if set(foundation) != set(adapted):
        missing = sorted(set(foundation) ^ set(adapted))
        raise ValueError(f"state_dicts differ in keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    layers = {}
    total_entries = total_changed = 0
    seen: set[tuple] = set()
    for key, before in foundation.items():
        if floating_only and not before.is_floating_point():
            continue
        aliases = {("before", alias_key(before)), ("after", alias_key(adapted[key]))}
        aliases = {alias for alias in aliases if alias[1] is not None}
        if aliases & seen:
            continue
        seen |= aliases
        entries = before.numel()
        changed = count_changed(before, adapted[key])
        layers[key] = {"entries": entries, "changed": changed,
                       "share": changed / entries if entries else 0.0}
        total_entries += entries
        total_changed += changed
    return {"total": {"entries": total_entries, "changed": total_changed,
                      "share": total_changed / total_entries if total_entries else 0.0},
            "layers": layers}

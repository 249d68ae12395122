"""Copies of a network's state_dict that keep nnU-Net's aliased keys aliased.

nnU-Net's networks list each convolution under several names; a copy that duplicated every alias
would double the memory and the checkpoint size. Used by the engine (checkpoints) and by
adaptation (the foundation snapshot that weight statistics compare against).
"""

from __future__ import annotations

from typing import Mapping

import torch


def alias_key(tensor: torch.Tensor) -> tuple | None:
    """Identifies the memory a tensor views; None for empty tensors (their pointers mean nothing)."""
    if tensor.numel() == 0:
        return None
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def snapshot_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state_dict, to compare against later.

    Keys that alias the same tensor (nnU-Net's networks list each convolution under several
    names) share one copy, as they do in the network.
    """
    copies: dict[tuple, torch.Tensor] = {}
    snapshot = {}
    for key, value in state.items():
        alias = alias_key(value)
        if alias is not None and alias in copies:
            snapshot[key] = copies[alias]
            continue
        snapshot[key] = value.detach().to("cpu", copy=True)
        if alias is not None:
            copies[alias] = snapshot[key]
    return snapshot

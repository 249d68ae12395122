"""Copies of a network's state_dict that keep nnU-Net's aliased keys aliased.

nnU-Net's networks list each convolution under several names; a copy that duplicated every alias
would double the memory and the checkpoint size. Used by the engine (checkpoints) and by
adaptation (the foundation snapshot that weight statistics compare against).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # imported where used: the store lists versions without torch
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


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """The identity of a set of weights: SHA-256 over every key (sorted), its dtype, shape and raw
    bytes. Independent of how the checkpoint file around the weights was written (pickle layout,
    logs, optimiser state), so two sites holding the same weights get the same value."""
    import torch

    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            continue
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}\0{flat.dtype}\0{tuple(value.shape)}\0".encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()

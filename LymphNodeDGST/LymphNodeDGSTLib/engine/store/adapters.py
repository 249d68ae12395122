"""Site adapters: one network's weights as a bitwise-exact delta over its parent's, in safetensors.

File layout (safetensors: a JSON header and raw little-endian tensors, nothing executable):
    tensors   for every tensor that differs from the parent, either
              `KEY:gaps` (uint16, the distances between successive changed flat indices, the
              first counted from -1) or `KEY:indices` (int64, when a distance exceeds 65535),
              plus `KEY:values` (the new values, in the tensor's dtype); or `KEY:dense` (the whole
              tensor, when that is smaller than the sparse form).
    metadata  "format": "lndgst-site-adapter", "format_version": "1", "header": a JSON document:
              parent {name, version, fold, weights_sha256}, result {fold, weights_sha256,
              configuration, trainer_name, mirroring_axes}, plans, dataset_json, tensors {KEY:
              {shape, dtype}} for every tensor of the result, aliases {KEY: KEY it shares memory
              with}, and the version's record (method, metrics, ...).

"Changed" means a different bit pattern (so -0.0 vs 0.0 and NaN payloads count), and
reconstruction is checked against the result's `weights_sha256` (engine/store/state_dicts.py), so a
corrupted value is refused, never silently installed.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from LymphNodeDGSTLib.atomic import default_mode, temporary_sibling
from LymphNodeDGSTLib.engine.store.adapter_header import header_problem, stored_tensor_problem as _stored_tensor_problem
from LymphNodeDGSTLib.engine.store.state_dicts import alias_key, weights_sha256
from LymphNodeDGSTLib.errors import ModelValidationError

ADAPTER_FORMAT = "lndgst-site-adapter"
FORMAT_VERSION = "1"
_BITS_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class SiteAdapter:
    """An adapter file's header and its tensors (read, not yet applied)."""

    path: Path
    header: dict
    tensors: dict[str, torch.Tensor]

    @property
    def parent_sha256(self) -> str:
        return self.header["parent"]["weights_sha256"]


def canonical_keys(weights: Mapping[str, torch.Tensor]) -> tuple[list[str], dict[str, str]]:
    """Keys in order with nnU-Net's aliases (keys sharing one tensor's memory) split off:
    (keys that own their tensor, {alias key: the key whose tensor it shares})."""
    owners: dict[tuple, str] = {}
    keys, aliases = [], {}
    for key, value in weights.items():
        alias = alias_key(value)
        if alias is not None and alias in owners:
            aliases[key] = owners[alias]
            continue
        if alias is not None:
            owners[alias] = key
        keys.append(key)
    return keys, aliases


def changed_indices(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Flat positions where the two tensors' bit patterns differ (int64, ascending)."""
    bits = _BITS_OF_WIDTH[new.element_size()]
    a = base.detach().contiguous().reshape(-1).view(bits)
    b = new.detach().contiguous().reshape(-1).view(bits)
    return torch.nonzero(a != b, as_tuple=False).reshape(-1)


def delta_tensors(base: Mapping[str, torch.Tensor], adapted: Mapping[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """The adapter's tensors, the layout {KEY: {shape, dtype}} and the aliases of `adapted`."""
    keys, aliases = canonical_keys(adapted)
    tensors: dict[str, torch.Tensor] = {}
    layout = {}
    for key in keys:
        new = adapted[key].detach().to("cpu")
        layout[key] = {"shape": list(new.shape), "dtype": str(new.dtype).removeprefix("torch.")}
        old = base.get(key)
        if old is None or tuple(old.shape) != tuple(new.shape) or old.dtype != new.dtype:
            raise ModelValidationError(f"weights '{key}' differ in shape or type from the parent's: "
                                       "the version is not an adaptation of that parent")
        changed = changed_indices(old, new)
        if changed.numel() == 0:
            continue
        flat = new.contiguous().reshape(-1)
        values = flat[changed].clone()
        encoded = _encode_indices(changed)
        sparse_bytes = values.nbytes + encoded[1].nbytes
        if sparse_bytes >= flat.nbytes:
            tensors[f"{key}:dense"] = new.contiguous().clone()
        else:
            tensors[f"{key}:{encoded[0]}"] = encoded[1]
            tensors[f"{key}:values"] = values
    return tensors, layout, aliases


def _encode_indices(indices: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Ascending flat indices as uint16 gaps when every gap fits, else as int64."""
    array = indices.numpy().astype(np.int64)
    gaps = np.diff(array, prepend=-1)
    if gaps.size and gaps.max() <= np.iinfo(np.uint16).max:
        return "gaps", torch.from_numpy(gaps.astype(np.uint16))
    return "indices", torch.from_numpy(array)


def _decode_indices(kind: str, stored: torch.Tensor) -> torch.Tensor:
    if kind == "gaps":
        return torch.from_numpy(np.cumsum(stored.numpy().astype(np.int64)) - 1)
    return stored.to(torch.int64)


def write_adapter(path: str | os.PathLike, base: Mapping[str, torch.Tensor],
                  adapted: Mapping[str, torch.Tensor], header: dict) -> Path:
    """Write the delta of `adapted` over `base` (temporary file, read back and checked, renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, layout, aliases = delta_tensors(base, adapted)
    header = dict(header)
    header["parent"] = {**header["parent"], "weights_sha256": weights_sha256(base)}
    header["result"] = {**header["result"], "weights_sha256": weights_sha256(adapted)}
    header["tensors"], header["aliases"] = layout, aliases
    metadata = {"format": ADAPTER_FORMAT, "format_version": FORMAT_VERSION,
                "header": json.dumps(header, sort_keys=True)}
    with temporary_sibling(path, ".safetensors") as temporary:
        try:
            save_file(tensors, str(temporary), metadata=metadata)
        except Exception as error:  # noqa: BLE001 - safetensors wraps the OS error in its own type
            raise _write_error(error, path) from None
        os.chmod(temporary, default_mode())  # safetensors creates its file 0600
        apply_adapter(read_adapter(temporary), base)  # refuses anything that would not rebuild
        os.replace(temporary, path)
    return path


def _write_error(error: Exception, path: Path) -> OSError:
    """The OS error inside a safetensors write failure (`... (os error 28)`), naming the adapter
    being written, so that a full disk is one line and exit 2 like every other write."""
    code = re.search(r"os error (\d+)|code: (\d+)", str(error))
    number = int(code.group(1) or code.group(2)) if code else errno.EIO
    return OSError(number, os.strerror(number), str(path))


def read_adapter(path: str | os.PathLike) -> SiteAdapter:
    """Read and check an adapter file's structure; every defect is a ModelValidationError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelValidationError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelValidationError(f"{path}: not a readable site adapter (truncated or corrupted "
                                   f"safetensors file: {_first_line(error)})") from None
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ModelValidationError(f"{path}: not a LymphNodeDGST site adapter (no "
                                   f"'{ADAPTER_FORMAT}' marker in its metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelValidationError(f"{path}: adapter format version {metadata.get('format_version')} "
                                   f"is not supported (this LymphNodeDGST reads {FORMAT_VERSION})")
    try:
        header = json.loads(metadata["header"])
    except (KeyError, TypeError, ValueError, RecursionError) as error:
        raise ModelValidationError(f"{path}: the adapter's header is incomplete or corrupted "
                                   f"({_first_line(error)})") from None
    problem = header_problem(header)
    if problem is None:
        problem = _stored_tensor_problem(header, tensors)
    if problem is not None:
        raise ModelValidationError(f"{path}: the adapter's header is incomplete or corrupted ({problem})")
    return SiteAdapter(path, header, tensors)


def apply_adapter(adapter: SiteAdapter, base: Mapping[str, torch.Tensor], verify: bool = True,
                  in_place: bool = False) -> dict[str, torch.Tensor]:
    """The adapted weights: `base` with the adapter's entries put back, checked bitwise against
    the weights_sha256 the adapter was made from. `in_place` writes into `base`'s tensors (a
    freshly loaded parent: no copy); `verify=False` skips the checksum for an adapter that was
    verified when it was installed (loading a version stored as a delta)."""
    where = adapter.path
    layout, aliases = adapter.header["tensors"], adapter.header["aliases"]
    expected = set(layout) | set(aliases)
    if set(base) != expected:
        missing, extra = sorted(expected - set(base)), sorted(set(base) - expected)
        raise ModelValidationError(f"{where}: the adapter's tensors do not match the base's "
                                   f"(missing in base: {missing[:3]}, not in adapter: {extra[:3]})")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapter.tensors.items():
        key, _, kind = name.rpartition(":")
        if key not in layout or kind not in ("gaps", "indices", "values", "dense"):
            raise ModelValidationError(f"{where}: unexpected tensor '{name}' in the adapter")
        parts.setdefault(key, {})[kind] = tensor
    result: dict[str, torch.Tensor] = {}
    for key, spec in layout.items():
        original = base[key]
        if list(original.shape) != list(spec["shape"]) or str(original.dtype).removeprefix("torch.") != spec["dtype"]:
            raise ModelValidationError(
                f"{where}: tensor '{key}' has shape {list(original.shape)} ({original.dtype}) in the "
                f"base but {spec['shape']} ({spec['dtype']}) in the adapter")
        result[key] = _rebuild(where, key, original, parts.get(key, {}), in_place)
    for alias, owner in aliases.items():
        result[alias] = result[owner]
    if verify and weights_sha256(result) != adapter.header["result"]["weights_sha256"]:
        raise ModelValidationError(f"{where}: the rebuilt weights do not match the adapter's "
                                   "checksum (the file is corrupted)")
    return result


def _rebuild(where: Path, key: str, original: torch.Tensor, part: dict[str, torch.Tensor],
             in_place: bool = False) -> torch.Tensor:
    if not part:
        return original.detach() if in_place else original.detach().clone()
    if "dense" in part:
        dense = part["dense"]
        if dense.shape != original.shape or dense.dtype != original.dtype:
            raise ModelValidationError(f"{where}: tensor '{key}' does not match the base's shape or type")
        return dense.clone()
    kinds = [k for k in ("gaps", "indices") if k in part]
    values = part.get("values")
    if len(kinds) != 1 or values is None:
        raise ModelValidationError(f"{where}: tensor '{key}' lacks its indices or values")
    indices = _decode_indices(kinds[0], part[kinds[0]])
    if (values.dim() != 1 or indices.dim() != 1 or values.numel() != indices.numel()
            or values.dtype != original.dtype):
        raise ModelValidationError(f"{where}: tensor '{key}': indices and values do not match "
                                   "the base's tensor")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= original.numel()):
        raise ModelValidationError(f"{where}: tensor '{key}': an index lies outside the base's "
                                   f"tensor of shape {list(original.shape)}")
    rebuilt = original.detach()
    if not (in_place and rebuilt.is_contiguous()):
        rebuilt = rebuilt.clone().contiguous()
    rebuilt.view(-1)[indices] = values
    return rebuilt


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__

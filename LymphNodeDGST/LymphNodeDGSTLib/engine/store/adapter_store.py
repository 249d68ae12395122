"""Site adapters and the model store: export a version as a delta, install one onto its base.

`export_adapter(store, "NAME@V", FILE)` writes version V of NAME as a delta over the fold of its
parent it was fine-tuned from (engine/store/adapters.py). `install_adapter(store, FILE)` finds that
parent among the installed versions by the sha256 of its weights (whatever the model is called
here), rebuilds the adapted weights bitwise, and adds them as a new version of that model: an
ordinary results folder, validated like any install, published with one rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from LymphNodeDGSTLib.atomic import staging_folder
from LymphNodeDGSTLib.engine.file_lock import exclusive_lock
from LymphNodeDGSTLib.engine.processes import owner_tag
from LymphNodeDGSTLib.engine.store.adapters import apply_adapter, read_adapter, write_adapter
from LymphNodeDGSTLib.engine.store.architectures import checkpoint_dict, read_json
from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
from LymphNodeDGSTLib.engine.store.fetch import file_sha256
from LymphNodeDGSTLib.engine.store.results_folders import find_checkpoints, validate_results_folder
from LymphNodeDGSTLib.engine.store.models import ModelStore, ModelVersion, remove_stale_staging
from LymphNodeDGSTLib.engine.store.state_dicts import weights_sha256
from LymphNodeDGSTLib.errors import ModelValidationError, UserInputError

# What of a version's record travels with its adapter.
SHARED_RECORD_KEYS = ("method", "gamma", "iterations", "metrics", "created", "device")
ADAPTER_STAGING, INSTALL_LOCK = ".adapter-", ".install-adapter.lock"
NAME_MAX = 255  # bytes in one file name on every file system we meet


def fold_weights(version: ModelVersion, fold: str) -> dict:
    checkpoint = find_checkpoints(version.path).get(fold)
    if checkpoint is None:
        raise UserInputError(f"{version.ref} has no fold {fold}")
    return load_checkpoint(checkpoint, trust=version.metadata.get("trusted_checkpoint", False))["network_weights"]


def parent_fold(parent: ModelVersion, version: ModelVersion, fold: str) -> str:
    """The parent's fold a version's fold was fine-tuned from (recorded by adaptation)."""
    recorded = version.metadata.get("parent_fold")
    folds = list(find_checkpoints(parent.path))
    if recorded in folds:
        return recorded
    if fold in folds:
        return fold
    if len(folds) == 1:
        return folds[0]
    raise UserInputError(f"{version.ref}: cannot tell which fold of {parent.ref} it was made from")


def export_adapter(store: ModelStore, spec: str, destination: str | os.PathLike, force: bool = False) -> Path:
    """Write version `spec` as a site adapter file over its parent (an existing file only with `force`)."""
    version = store.resolve(spec)
    parent_number = version.metadata.get("parent")
    if parent_number is None:
        raise UserInputError(f"{version.ref} was installed, not adapted: it has no parent to be a "
                             "delta of (share it with 'lndgst models export')")
    parent = store.resolve(f"{version.name}@{parent_number}")
    folds = list(find_checkpoints(version.path))
    if len(folds) != 1:
        raise UserInputError(f"{version.ref} holds {len(folds)} folds; an adapter holds one")
    destination = check_adapter_destination(Path(destination).expanduser(), store.root, force)
    fold = folds[0]
    base_fold = parent_fold(parent, version, fold)
    checkpoint = load_checkpoint(find_checkpoints(version.path)[fold],
                                 trust=version.metadata.get("trusted_checkpoint", False))
    header = {
        "parent": {"name": parent.name, "version": parent.version, "fold": base_fold},
        "result": {"name": version.name, "version": version.version, "fold": fold,
                   "configuration": checkpoint["init_args"]["configuration"],
                   "trainer_name": "nnUNetTrainer",
                   "mirroring_axes": _as_list(checkpoint.get("inference_allowed_mirroring_axes"))},
        "plans": read_json(version.path / "plans.json"),
        "dataset_json": read_json(version.path / "dataset.json"),
        "record": {k: version.metadata[k] for k in SHARED_RECORD_KEYS if k in version.metadata},
    }
    return write_adapter(destination, fold_weights(parent, base_fold), checkpoint["network_weights"], header)


def check_adapter_destination(destination: Path, store_root: Path, force: bool) -> Path:
    """Refuse a destination an export must not write: inside the model store (a version's own
    checkpoint or version.json), anything but a regular file (a FIFO, a device), an existing file
    without `force`, a name the file system cannot hold."""
    if destination.is_dir():
        raise UserInputError(f"adapter destination is a folder: {destination}")
    resolved, root = destination.resolve(), Path(store_root).expanduser().resolve()
    if resolved == root or root in resolved.parents:
        raise UserInputError(f"adapter destination {destination} lies inside the model store {root}; "
                             "write the adapter somewhere else")
    if os.path.lexists(destination):
        if not destination.is_file():
            raise UserInputError(f"adapter destination {destination} exists and is not a regular file")
        if not force:
            raise UserInputError(f"adapter destination {destination} exists; pass --force to replace it")
    if len(os.fsencode(destination.name)) > NAME_MAX:
        raise UserInputError(f"adapter file name is longer than {NAME_MAX} bytes: {destination.name[:40]}...")
    if not destination.parent.is_dir() or not os.access(destination.parent, os.W_OK):
        raise UserInputError(f"adapter destination's folder is missing or not writable: "
                             f"{destination.parent}")
    return destination


def find_base(store: ModelStore, sha256: str, preferred: str | None = None) -> tuple[ModelVersion, str] | None:
    """The installed version and fold whose weights have this sha256 (a model named `preferred`
    first), or None."""
    names = store.names()
    if preferred in names:
        names.remove(preferred)
        names.insert(0, preferred)
    for name in names:
        for version in store.versions(name):
            for fold, digest in version_weight_hashes(version).items():
                if digest == sha256:
                    return version, fold
    return None


def version_weight_hashes(version: ModelVersion) -> dict[str, str]:
    """fold -> weights sha256, from version.json (recorded at install) or computed for versions
    installed before it was recorded."""
    recorded = version.metadata.get("weights_sha256")
    if isinstance(recorded, dict) and recorded:
        return recorded
    return {fold: weights_sha256(fold_weights(version, fold)) for fold in find_checkpoints(version.path)}


def install_adapter(store: ModelStore, source: str | os.PathLike, activate: bool = False) -> ModelVersion:
    """Add the adapter's weights as a new version of the installed model it was made from."""
    source = Path(source).expanduser()
    adapter = read_adapter(source)
    parent = adapter.header["parent"]
    found = find_base(store, adapter.parent_sha256, parent.get("name"))
    if found is None:
        raise UserInputError(
            f"{source}: no installed version has the weights this adapter was made from "
            f"({parent.get('name')}@{parent.get('version')}, weights sha256 "
            f"{adapter.parent_sha256[:12]}...); install that base model first")
    base, base_fold = found
    result = adapter.header["result"]
    _refuse_installed(store, base, result["weights_sha256"], source)
    weights = apply_adapter(adapter, fold_weights(base, base_fold))
    record = adapter.header.get("record") or {}
    metadata = {**{k: record[k] for k in SHARED_RECORD_KEYS if k in record and k != "created"},
                "source": str(source.resolve()), "kind": "adapter", "parent": base.version,
                "parent_fold": base_fold, "adapter_sha256": file_sha256(source),
                "adapter_origin": f"{result.get('name')}@{result.get('version')}",
                "trusted_checkpoint": False}
    remove_stale_staging(store.root, ADAPTER_STAGING)
    version = _publish_rebuilt(store, base, adapter, weights, metadata, source)
    if activate:
        store.activate(base.name, version.version)
    return version


def _publish_rebuilt(store: ModelStore, base: ModelVersion, adapter, weights: dict, metadata: dict,
                     source: Path) -> ModelVersion:
    """The rebuilt weights as a results folder, validated and published as a version of `base`'s model."""
    result = adapter.header["result"]
    with staging_folder(store.root, f"{ADAPTER_STAGING}{owner_tag()}-") as work:
        folder = work / "results"
        fold_dir = folder / f"fold_{result['fold']}"
        fold_dir.mkdir(parents=True)
        (folder / "plans.json").write_text(json.dumps(adapter.header["plans"], indent=2))
        (folder / "dataset.json").write_text(json.dumps(adapter.header["dataset_json"], indent=2))
        mirroring = result.get("mirroring_axes")
        checkpoint = checkpoint_dict(weights, adapter.header["plans"], adapter.header["dataset_json"],
                                     configuration=result["configuration"], fold=result["fold"],
                                     trainer_name="nnUNetTrainer",
                                     mirroring_axes=tuple(mirroring) if mirroring is not None else None)
        torch.save(checkpoint, fold_dir / "checkpoint_final.pth")
        try:
            info = validate_results_folder(folder)
        except ModelValidationError as error:
            raise ModelValidationError(f"{source}: the rebuilt model is not valid ({error})") from None
        # one publication at a time: two runs of one file would both pass the "already installed" check
        with exclusive_lock(store.root / INSTALL_LOCK, what=f"the model store {store.root}"):
            _refuse_installed(store, base, result["weights_sha256"], source)
            return store.add_version(base.name, folder, metadata, info=info, activate_if_first=False)


def _refuse_installed(store: ModelStore, base: ModelVersion, weights_sha256: str, source: Path) -> None:
    for version in store.versions(base.name):
        if weights_sha256 in version_weight_hashes(version).values():
            raise UserInputError(f"{source}: already installed as {version.ref}")


def _as_list(axes) -> list[int] | None:
    return None if axes is None else [int(a) for a in axes]

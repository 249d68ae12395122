"""A results folder rebuilt from bare nnU-Net v2 checkpoint files (what `-pretrained_weights` takes).

nnU-Net v2's trainer saves its constructor arguments in every checkpoint as `init_args`: plans,
configuration, fold and dataset.json. That is everything inference needs besides the weights, so
`fold_F/checkpoint_final.pth` + plans.json + dataset.json are written from it, and the folder is
then validated exactly like one given as a folder. Several checkpoints are the folds of one model
when they agree on plans, dataset.json and configuration.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Sequence

from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
from LymphNodeDGSTLib.engine.store.names import is_fold_name
from LymphNodeDGSTLib.errors import ModelValidationError

NEEDED = (("plans", "plans", dict), ("dataset_json", "dataset.json", dict),
          ("configuration", "configuration name", str))


def is_torch_checkpoint(path: Path) -> bool:
    """True for a file in PyTorch's zip format (a checkpoint), false for a zip of a folder."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.count("/") == 1 and name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def rebuild_results_folder(checkpoints: Sequence[Path], destination: Path, trust: bool = False) -> Path:
    """Write dataset.json, plans.json and fold_F/checkpoint_final.pth (a byte copy) per checkpoint."""
    destination.mkdir(parents=True, exist_ok=True)
    first: dict | None = None
    for path in checkpoints:
        init_args = _init_args(path, load_checkpoint(path, trust=trust), single=len(checkpoints) == 1)
        if first is None:
            first = init_args
        else:
            for key, what, _ in NEEDED:
                if init_args[key] != first[key]:
                    raise ModelValidationError(
                        f"{path}: its {what} differs from that of {checkpoints[0]}: the checkpoints "
                        "are not folds of one model; install them one at a time")
        fold_dir = destination / f"fold_{init_args['fold']}"
        if fold_dir.exists():
            raise ModelValidationError(f"{path}: a second checkpoint for fold {init_args['fold']}; "
                                       "give each fold once")
        fold_dir.mkdir()
        shutil.copyfile(path, fold_dir / "checkpoint_final.pth")
    assert first is not None, "no checkpoint given"
    plans = {k: v for k, v in first["plans"].items() if k != "continue_training"}
    (destination / "plans.json").write_text(json.dumps(plans, indent=2))
    (destination / "dataset.json").write_text(json.dumps(first["dataset_json"], indent=2))
    return destination


def _init_args(path: Path, checkpoint: dict, single: bool) -> dict:
    init_args = checkpoint.get("init_args")
    if not isinstance(init_args, dict):
        raise ModelValidationError(
            f"{path}: the checkpoint has no init_args, so it lacks the plans, dataset.json and "
            "configuration inference needs (nnU-Net v2's trainer saves them; this file was written "
            "otherwise); install the nnU-Net results folder it came from instead")
    for key, what, kind in NEEDED:
        if not isinstance(init_args.get(key), kind) or not init_args[key]:
            raise ModelValidationError(
                f"{path}: the checkpoint's init_args lack the {what} ('{key}') inference needs; "
                "install the nnU-Net results folder it came from instead")
    fold = init_args.get("fold")
    if fold is None and single:
        fold = 0
    if fold is None or isinstance(fold, bool) or not is_fold_name(str(fold)):
        raise ModelValidationError(f"{path}: the checkpoint's init_args name no usable fold ({fold!r})")
    return {**init_args, "fold": str(fold)}

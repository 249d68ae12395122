"""Validation of nnU-Net v2 results folders, each defect with its own message."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
from LymphNodeDGSTLib.engine.store.fetch import file_sha256
from LymphNodeDGSTLib.engine.store.json_files import read_json_object
from LymphNodeDGSTLib.engine.store.network_support import check_supported_network
from LymphNodeDGSTLib.engine.store.plan_checks import check_configuration, check_mirroring_axes
from LymphNodeDGSTLib.engine.store.state_dicts import weights_sha256
from LymphNodeDGSTLib.errors import ModelValidationError

CHECKPOINT_NAME = "checkpoint_final.pth"


@dataclass
class ResultsFolderInfo:
    """What validation learned about a results folder."""

    path: Path
    configuration: str
    folds: list[str]
    labels: dict
    trainer_name: str
    parameters: int
    checkpoint_sha256: dict[str, str] = field(default_factory=dict)
    weights_sha256: dict[str, str] = field(default_factory=dict)  # identity of each fold's weights


def find_checkpoints(folder: Path) -> dict[str, Path]:
    """fold name ('0', 'all', ...) -> checkpoint path, for every fold_*/checkpoint_final.pth."""
    found = {}
    for fold_dir in sorted(folder.glob("fold_*")):
        checkpoint = fold_dir / CHECKPOINT_NAME
        if fold_dir.is_dir() and checkpoint.is_file():
            found[fold_dir.name[len("fold_"):]] = checkpoint
    return found


def read_json_file(path: Path) -> dict:
    return read_json_object(path, "a results folder needs the file as nnU-Net wrote it",
                            error=ModelValidationError)


def validate_results_folder(folder: str | os.PathLike, trust: bool = False,
                            check_network: bool = True) -> ResultsFolderInfo:
    """Check that stock nnU-Net could run inference with this folder; raise on the first defect."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelValidationError(f"not a folder: {folder}")
    dataset_json = read_json_file(folder / "dataset.json")
    plans = read_json_file(folder / "plans.json")
    labels = _check_dataset_json(folder, dataset_json)
    if not isinstance(plans.get("configurations"), dict) or not plans["configurations"]:
        raise ModelValidationError(f"{folder}/plans.json: no 'configurations'")

    checkpoints = find_checkpoints(folder)
    if not checkpoints:
        raise ModelValidationError(f"{folder}: no fold_*/{CHECKPOINT_NAME} found")

    configuration = trainer_name = None
    weights_of_first = network = None
    parameters = 0
    hashes, weight_hashes = {}, {}
    for fold, path in checkpoints.items():
        checkpoint = load_checkpoint(path, trust=trust)
        hashes[fold] = file_sha256(path)
        _check_weights(path, checkpoint["network_weights"])
        weight_hashes[fold] = weights_sha256(checkpoint["network_weights"])
        init_args = checkpoint.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise ModelValidationError(f"{path}: the checkpoint's 'init_args' must be a dictionary "
                                       f"(nnU-Net's trainer arguments), not {type(init_args).__name__}")
        named = init_args.get("configuration")
        if not named or not isinstance(named, str):
            raise ModelValidationError(f"{path}: checkpoint does not name its configuration")
        if named not in plans["configurations"]:
            raise ModelValidationError(
                f"{path}: checkpoint was trained with configuration '{named}', which plans.json "
                f"does not contain (it has: {', '.join(plans['configurations'])})")
        if configuration is not None and named != configuration:
            raise ModelValidationError(f"{folder}: folds were trained with different "
                                       f"configurations ({configuration}, {named})")
        configuration = named
        check_configuration(folder, plans, named)
        check_mirroring_axes(path, checkpoint.get("inference_allowed_mirroring_axes"))
        trainer_name = str(checkpoint.get("trainer_name", "nnUNetTrainer"))
        check_supported_network(path, plans, named, trainer_name, checkpoint["network_weights"])
        _check_head(path, checkpoint["network_weights"], labels, dataset_json)
        if weights_of_first is None:
            weights_of_first = checkpoint["network_weights"]
        if check_network:  # every fold: a second fold of another shape would crash `segment`
            network = network or _build_network(folder, plans, dataset_json, configuration)
            parameters = _check_network_matches(path, network, checkpoint["network_weights"])

    if not check_network:
        parameters = sum(int(v.numel()) for v in weights_of_first.values() if hasattr(v, "numel"))
    return ResultsFolderInfo(folder, configuration, list(checkpoints), labels, trainer_name,
                             parameters, hashes, weight_hashes)


def _check_dataset_json(folder: Path, dataset_json: dict) -> dict:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelValidationError(f"{folder}/dataset.json: no 'labels'")
    if labels.get("background") != 0 or isinstance(labels.get("background"), bool):
        raise ModelValidationError(f"{folder}/dataset.json: labels must map 'background' to 0")
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(_is_int(v) and v >= 0 for v in values):
            raise ModelValidationError(
                f"{folder}/dataset.json: label '{name}' is {value!r}; a label value is a whole "
                "number >= 0 (or, for region training, a list of them)")
    regions = [v for v in labels.values() if isinstance(v, list) and len(v) > 1]
    order = dataset_json.get("regions_class_order")
    if regions and not (isinstance(order, list) and all(_is_int(v) for v in order)):
        raise ModelValidationError(
            f"{folder}/dataset.json: labels define regions (lists of values) but there is no "
            "'regions_class_order' list; nnU-Net needs it to turn regions into one label")
    try:
        from nnunetv2.utilities.label_handling.label_handling import LabelManager
        LabelManager(labels, order if regions else None)
    except (AssertionError, ValueError, TypeError) as error:
        raise ModelValidationError(f"{folder}/dataset.json: nnU-Net cannot use these labels "
                                   f"({error or type(error).__name__})") from None
    channels = dataset_json.get("channel_names") or dataset_json.get("modality")
    if not isinstance(channels, dict) or len(channels) != 1:
        raise ModelValidationError(
            f"{folder}/dataset.json: exactly one input channel (CT) is supported, "
            f"found {len(channels) if isinstance(channels, dict) else 'none'}")
    return labels


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_weights(path: Path, weights: object) -> None:
    """network_weights must map parameter names to finite tensors (a state_dict)."""
    import torch

    if not isinstance(weights, dict):
        raise ModelValidationError(f"{path}: 'network_weights' is not a state_dict "
                                   f"(a {type(weights).__name__})")
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise ModelValidationError(f"{path}: network weight '{key}' is not a tensor "
                                       f"(a {type(value).__name__}); the checkpoint is damaged")
    poisoned = [key for key, value in weights.items()
                if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if poisoned:  # such a network segments nothing, silently
        raise ModelValidationError(f"{path}: {len(poisoned)} network weight tensor(s) hold NaN or infinite "
                                   f"values (e.g. '{poisoned[0]}'); the checkpoint is damaged or its "
                                   "training diverged")


def _check_head(path: Path, weights: dict, labels: dict, dataset_json: dict) -> None:
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    expected = LabelManager(labels, dataset_json.get("regions_class_order")).num_segmentation_heads
    heads = sorted((k for k in weights if ".seg_layers." in f".{k}" and k.endswith(".weight")),
                   key=_seg_layer_index)
    if not heads:
        raise ModelValidationError(f"{path}: network weights have no seg_layers (not an nnU-Net network?)")
    head = weights[heads[-1]]
    outputs = int(head.shape[0]) if head.dim() else 0
    if outputs != expected:
        raise ModelValidationError(
            f"{path}: the network predicts {outputs} classes but dataset.json defines {expected} "
            f"labels ({', '.join(labels)})")


def _seg_layer_index(key: str) -> int:
    parts = key.split(".")
    try:
        return int(parts[parts.index("seg_layers") + 1])
    except (ValueError, IndexError):
        return -1


def _build_network(folder: Path, plans: dict, dataset_json: dict, configuration: str):
    from LymphNodeDGSTLib.engine.store.architectures import build_network

    try:
        return build_network(plans, dataset_json, configuration)
    except Exception as error:  # noqa: BLE001 - any failure here means unusable plans
        raise ModelValidationError(
            f"{folder}/plans.json: cannot build the '{configuration}' network ({error})") from None


def _check_network_matches(path: Path, network, weights: dict) -> int:
    """The network's parameter count, once a checkpoint's weights load into it exactly."""
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else ""
        detail = [line.strip() for line in str(error).splitlines()[1:3]]
        raise ModelValidationError(
            f"{path}: checkpoint does not match the network plans.json describes "
            f"({first} {' '.join(detail)[:300]})") from None
    return sum(p.numel() for p in network.parameters())

"""Validation of nnU-Net v2 results folders, each defect with its own message."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from LymphNodeDGSTLib.engine.checkpoints import load_checkpoint
from LymphNodeDGSTLib.errors import ModelValidationError
from LymphNodeDGSTLib.engine.fetch import file_sha256
from LymphNodeDGSTLib.engine.network_support import check_supported_network
from LymphNodeDGSTLib.engine.state_dicts import weights_sha256

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


def read_json_file(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelValidationError(f"{path.parent}: {what} is missing ({path.name})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelValidationError(f"{path}: {what} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ModelValidationError(f"{path}: {what} must hold a JSON object")
    return data


def validate_results_folder(folder: str | os.PathLike, trust: bool = False,
                            check_network: bool = True) -> ResultsFolderInfo:
    """Check that stock nnU-Net could run inference with this folder; raise on the first defect."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelValidationError(f"not a folder: {folder}")
    dataset_json = read_json_file(folder / "dataset.json", "dataset.json")
    plans = read_json_file(folder / "plans.json", "plans.json")
    labels = _check_dataset_json(folder, dataset_json)
    if not isinstance(plans.get("configurations"), dict) or not plans["configurations"]:
        raise ModelValidationError(f"{folder}/plans.json: no 'configurations'")

    checkpoints = find_checkpoints(folder)
    if not checkpoints:
        raise ModelValidationError(f"{folder}: no fold_*/{CHECKPOINT_NAME} found")

    configuration = trainer_name = None
    weights_of_first = None
    hashes, weight_hashes = {}, {}
    for fold, path in checkpoints.items():
        checkpoint = load_checkpoint(path, trust=trust)
        hashes[fold] = file_sha256(path)
        weight_hashes[fold] = weights_sha256(checkpoint["network_weights"])
        init_args = checkpoint.get("init_args") or {}
        named = init_args.get("configuration")
        if not named:
            raise ModelValidationError(f"{path}: checkpoint does not name its configuration")
        if named not in plans["configurations"]:
            raise ModelValidationError(
                f"{path}: checkpoint was trained with configuration '{named}', which plans.json "
                f"does not contain (it has: {', '.join(plans['configurations'])})")
        if configuration is not None and named != configuration:
            raise ModelValidationError(f"{folder}: folds were trained with different "
                                       f"configurations ({configuration}, {named})")
        configuration = named
        trainer_name = str(checkpoint.get("trainer_name", "nnUNetTrainer"))
        check_supported_network(path, plans, named, trainer_name, checkpoint["network_weights"])
        _check_head(path, checkpoint["network_weights"], labels, dataset_json)
        if weights_of_first is None:
            weights_of_first = checkpoint["network_weights"]

    parameters = sum(int(v.numel()) for v in weights_of_first.values() if hasattr(v, "numel"))
    if check_network:
        parameters = _check_network_matches(folder, plans, dataset_json, configuration, weights_of_first)
    return ResultsFolderInfo(folder, configuration, list(checkpoints), labels, trainer_name,
                             parameters, hashes, weight_hashes)


def _check_dataset_json(folder: Path, dataset_json: dict) -> dict:
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelValidationError(f"{folder}/dataset.json: no 'labels'")
    if labels.get("background") != 0:
        raise ModelValidationError(f"{folder}/dataset.json: labels must map 'background' to 0")
    channels = dataset_json.get("channel_names") or dataset_json.get("modality")
    if not isinstance(channels, dict) or len(channels) != 1:
        raise ModelValidationError(
            f"{folder}/dataset.json: exactly one input channel (CT) is supported, "
            f"found {len(channels) if isinstance(channels, dict) else 'none'}")
    return labels


def _check_head(path: Path, weights: dict, labels: dict, dataset_json: dict) -> None:
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    expected = LabelManager(labels, dataset_json.get("regions_class_order")).num_segmentation_heads
    heads = sorted((k for k in weights if ".seg_layers." in f".{k}" and k.endswith(".weight")),
                   key=_seg_layer_index)
    if not heads:
        raise ModelValidationError(f"{path}: network weights have no seg_layers (not an nnU-Net network?)")
    outputs = int(weights[heads[-1]].shape[0])
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


def _check_network_matches(folder: Path, plans: dict, dataset_json: dict, configuration: str,
                           weights: dict) -> int:
    from LymphNodeDGSTLib.engine.architectures import build_network

    try:
        network = build_network(plans, dataset_json, configuration)
    except Exception as error:  # noqa: BLE001 - any failure here means unusable plans
        raise ModelValidationError(
            f"{folder}/plans.json: cannot build the '{configuration}' network ({error})") from None
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else ""
        detail = [line.strip() for line in str(error).splitlines()[1:3]]
        raise ModelValidationError(
            f"{folder}: checkpoint does not match the network plans.json describes "
            f"({first} {' '.join(detail)[:300]})") from None
    return sum(p.numel() for p in network.parameters())

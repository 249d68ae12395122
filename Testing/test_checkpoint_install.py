"""Installing bare nnU-Net v2 checkpoint files (as the LN-Seg-FM authors publish their weights),
several folds as one model, what segmentation does with the folds, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_ct, run_cli, tree_snapshot
from LymphNodeDGSTLib.engine.store.architectures import (build_network, checkpoint_dict, make_dataset_json,
                                                    make_plans, tiny_spec)
from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
from LymphNodeDGSTLib.engine.store.models import ModelStore

HEAD_BIAS = "decoder.seg_layers.2.bias"   # the full-resolution head of tiny_spec()


def nnunet_checkpoint(path: Path, fold: int | str = 0, seed: int = 0, spec=None, head_bias=None,
                      edit=None) -> Path:
    """A checkpoint as nnU-Net v2's trainer writes it: init_args with plans, configuration, fold,
    dataset.json and the device; numpy scalars in its logs; a custom trainer name."""
    spec = spec or tiny_spec()
    plans, dataset_json = make_plans(spec), make_dataset_json(spec.labels)
    torch.manual_seed(seed)
    weights = build_network(plans, dataset_json).state_dict()
    if head_bias is not None:
        weights[HEAD_BIAS].copy_(torch.tensor(head_bias))
    checkpoint = checkpoint_dict(weights, plans, dataset_json, fold=fold,
                                 trainer_name="nnUNetTrainer_DGST",
                                 extra={"logging": {"train_losses": [np.float64(0.5)]}})
    checkpoint["init_args"]["device"] = torch.device("cpu")
    if edit:
        edit(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def test_bare_checkpoint_installs_as_a_validated_results_folder(home, tmp_path):
    """Catches: a checkpoint file taken for a zip of a results folder (the old refusal), plans.json
    or dataset.json not rebuilt from init_args, the checkpoint not copied byte for byte."""
    source = nnunet_checkpoint(tmp_path / "download" / "checkpoint_final.pth", fold=0)
    result = run_cli("models", "install", str(source), home=home, check_rc=0)
    assert result.stdout.strip() == "Dataset901_LymphNodeCT@1"
    version = ModelStore(home / "models").resolve("Dataset901_LymphNodeCT")
    assert version.metadata["folds"] == ["0"] and version.metadata["trainer_name"] == "nnUNetTrainer_DGST"
    assert json.loads((version.path / "plans.json").read_text()) == make_plans(tiny_spec())
    assert (version.path / "fold_0" / "checkpoint_final.pth").read_bytes() == source.read_bytes()
    label = Segmenter(ModelStore(home / "models"), device="cpu").segment(make_ct(), fast=True).label
    assert label.GetSize() == make_ct().GetSize()


def test_fold_checkpoints_form_one_model_and_segmentation_ensembles_them(home, tmp_path):
    """Fold 0 says 'background' everywhere (head bias), fold 1 'lymph node' more strongly; the
    2-fold model must average their logits as nnU-Net does. Catches: folds installed as separate
    models, or the segmenter running only the first fold."""
    background = nnunet_checkpoint(tmp_path / "f0" / "checkpoint_final.pth", 0, seed=0, head_bias=[20.0, -20.0])
    node = nnunet_checkpoint(tmp_path / "f1" / "checkpoint_final.pth", 1, seed=1, head_bias=[-30.0, 30.0])
    store = ModelStore(home / "models")
    run_cli("models", "install", str(background), str(node), "--name", "both", home=home, check_rc=0)
    assert store.resolve("both").metadata["folds"] == ["0", "1"]
    store.install(background, name="first", show_progress=False)
    store.install(node, name="second", show_progress=False)

    segmenter, image = Segmenter(store, device="cpu"), make_ct()
    labels = {name: sitk.GetArrayFromImage(segmenter.segment(image, model=name, fast=True).label)
              for name in ("both", "first", "second")}
    assert labels["first"].sum() == 0 and labels["second"].sum() > 0
    assert np.array_equal(labels["both"], labels["second"])


def _drop_init_args(checkpoint: dict) -> None:
    del checkpoint["init_args"]


def _swin_plans(checkpoint: dict) -> None:
    architecture = checkpoint["init_args"]["plans"]["configurations"]["3d_fullres"]["architecture"]
    architecture["network_class_name"] = "monai.networks.nets.SwinUNETR"
    checkpoint["trainer_name"] = "nnUNetTrainer_SwinUNETR"


def _custom_trainer_network(checkpoint: dict) -> None:
    """plans.json still says PlainConvUNet, but the trainer built a MONAI network of its own."""
    checkpoint["network_weights"] = {"swinViT.patch_embed.proj.weight": torch.zeros(48, 1, 2, 2, 2),
                                     "out.conv.conv.weight": torch.zeros(2, 48, 1, 1, 1)}
    checkpoint["trainer_name"] = "nnUNetTrainer_SwinUNETR"


BAD_CHECKPOINTS = {
    "no init_args": ([(0, _drop_init_args)], "has no init_args"),
    "no plans": ([(0, lambda c: c["init_args"].pop("plans"))], "lack the plans ('plans')"),
    "no dataset.json": ([(0, lambda c: c["init_args"].pop("dataset_json"))], "lack the dataset.json"),
    "SwinUNETR in plans": ([(0, _swin_plans)], "unsupported network 'SwinUNETR'"),
    "custom trainer network": ([(0, _custom_trainer_network)], "nnUNetTrainer_SwinUNETR built its own"),
    "same fold twice": ([(0, None), (0, None)], "a second checkpoint for fold 0"),
    "different plans": ([(0, None), (1, lambda c: c["init_args"]["plans"].update(dataset_name="x"))],
                        "are not folds of one model"),
}


@pytest.mark.parametrize("defect", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoints_exit_2_with_one_line_and_install_nothing(home, tiny_model_folder, tmp_path, defect):
    """Catches: a KeyError traceback on a checkpoint without init_args, a SwinUNETR checkpoint
    crashing in network building instead of a message naming what is supported, fold clashes."""
    ModelStore(home / "models").install(tiny_model_folder, name="good", show_progress=False)
    before = tree_snapshot(home)
    parts, message = BAD_CHECKPOINTS[defect]
    files = [str(nnunet_checkpoint(tmp_path / f"c{i}" / "checkpoint_final.pth", fold=fold, edit=edit))
             for i, (fold, edit) in enumerate(parts)]
    result = run_cli("models", "install", *files, home=home)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    if "network" in defect or "Swin" in defect:
        assert "PlainConvUNet" in result.stderr and "ResidualEncoderUNet" in result.stderr
    assert tree_snapshot(home) == before

"""nnU-Net v2 plans, networks and results folders built from a few numbers.

Used for the bundled demo model, the test fixtures (tiny models, nothing downloaded) and the
benchmarks (the default 30 M-parameter 3d_fullres PlainConvUNet). A results folder written here is
an ordinary nnU-Net results folder: stock `nnUNetPredictor` loads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from LymphNodeDGSTLib.engine import nnunet_env  # noqa: F401  (sets nnU-Net's environment first)

import torch
from torch import nn

from LymphNodeDGSTLib.engine.store.network_support import PLAIN_UNET, RESENC_UNET
from LymphNodeDGSTLib.engine.store.state_dicts import snapshot_state

CONFIGURATION = "3d_fullres"
NETWORKS = {"plain": PLAIN_UNET, "resenc": RESENC_UNET}
# nnU-Net's ResEnc planners (M, L, XL differ only in patch and batch size, not in these).
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6)

# CT intensity statistics of soft tissue, used by nnU-Net's CTNormalization (clip to the 0.5/99.5
# percentiles, then z-score). A real foundation model brings its own from its training data.
DEFAULT_CT_INTENSITIES = {
    "max": 3000.0,
    "mean": 60.0,
    "median": 55.0,
    "min": -1000.0,
    "percentile_00_5": -160.0,
    "percentile_99_5": 300.0,
    "std": 80.0,
}


@dataclass
class UNetSpec:
    """The few numbers that define a 3d_fullres PlainConvUNet and its plans."""

    features_per_stage: Sequence[int] = (32, 64, 128, 256, 320, 320)
    patch_size: Sequence[int] = (64, 160, 160)
    spacing: Sequence[float] = (3.0, 1.0, 1.0)  # z, y, x in mm (nnU-Net order)
    strides: Sequence[Sequence[int]] | None = None
    kernel_sizes: Sequence[Sequence[int]] | None = None
    convs_per_stage: int = 2
    batch_size: int = 2
    labels: dict = field(default_factory=lambda: {"background": 0, "lymph_node": 1})
    intensity_properties: dict = field(default_factory=lambda: dict(DEFAULT_CT_INTENSITIES))
    dataset_name: str = "Dataset901_LymphNodeCT"
    network: str = "plain"                         # "plain" (PlainConvUNet) or "resenc"
    blocks_per_stage: Sequence[int] | None = None  # ResEnc encoder blocks (default nnU-Net's)

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    def resolved_strides(self) -> list[list[int]]:
        if self.strides is not None:
            return [list(s) for s in self.strides]
        return [[1, 1, 1]] + [[2, 2, 2]] * (self.n_stages - 1)

    def resolved_kernel_sizes(self) -> list[list[int]]:
        if self.kernel_sizes is not None:
            return [list(k) for k in self.kernel_sizes]
        return [[3, 3, 3]] * self.n_stages


def default_foundation_spec() -> UNetSpec:
    """nnU-Net's default 3d_fullres PlainConvUNet for 1x1x3 mm CT: 6 stages, 32..320 features."""
    return UNetSpec(
        features_per_stage=(32, 64, 128, 256, 320, 320),
        patch_size=(40, 192, 192),
        spacing=(3.0, 1.0, 1.0),
        strides=([1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]),
        kernel_sizes=([1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]),
    )


def resenc_spec(**overrides) -> UNetSpec:
    """nnU-Net's ResEnc (M/L/XL) 3d_fullres ResidualEncoderUNet for 1x1x3 mm CT."""
    spec = default_foundation_spec()
    spec.network = "resenc"
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def tiny_spec(**overrides) -> UNetSpec:
    """A network of a few hundred thousand parameters for tests and the demo."""
    values = dict(
        features_per_stage=(8, 16, 32, 48),
        patch_size=(32, 64, 64),
        spacing=(3.0, 1.5, 1.5),
        strides=([1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]),
        kernel_sizes=([1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]),
    )
    values.update(overrides)
    return UNetSpec(**values)


def make_plans(spec: UNetSpec) -> dict:
    """An nnU-Net v2 plans dictionary with one 3d_fullres configuration."""
    n_stages = spec.n_stages
    if spec.network not in NETWORKS:
        raise ValueError(f"network must be one of {', '.join(NETWORKS)}, not {spec.network!r}")
    if spec.network == "resenc":
        blocks = list(spec.blocks_per_stage or RESENC_BLOCKS_PER_STAGE[:n_stages])
        per_stage = {"n_blocks_per_stage": blocks, "n_conv_per_stage_decoder": [1] * (n_stages - 1)}
    else:
        per_stage = {"n_conv_per_stage": [spec.convs_per_stage] * n_stages,
                     "n_conv_per_stage_decoder": [spec.convs_per_stage] * (n_stages - 1)}
    arch_kwargs = {
        "n_stages": n_stages,
        "features_per_stage": list(spec.features_per_stage),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": spec.resolved_kernel_sizes(),
        "strides": spec.resolved_strides(),
        **per_stage,
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    resample_data = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    resample_seg = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    resample_prob = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": f"nnUNetPlans_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": spec.batch_size,
        "patch_size": list(spec.patch_size),
        "median_image_size_in_voxels": [int(p * 2) for p in spec.patch_size],
        "spacing": [float(s) for s in spec.spacing],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resample_data,
        "resampling_fn_seg_kwargs": resample_seg,
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": resample_prob,
        "architecture": {
            "network_class_name": NETWORKS[spec.network],
            "arch_kwargs": arch_kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": spec.dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [float(s) for s in spec.spacing],
        "original_median_shape_after_transp": [int(p * 2) for p in spec.patch_size],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(spec.intensity_properties)},
    }


def make_dataset_json(labels: dict, num_training: int = 0) -> dict:
    """nnU-Net's dataset.json for single-channel CT."""
    return {
        "channel_names": {"0": "CT"},
        "labels": dict(labels),
        "numTraining": int(num_training),
        "file_ending": ".nii.gz",
    }


def build_network(plans: dict, dataset_json: dict, configuration: str = CONFIGURATION,
                  deep_supervision: bool = False) -> nn.Module:
    """The network nnU-Net itself would build for these plans (same class, same arguments)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    return get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        len(dataset_json["channel_names"]),
        label_manager.num_segmentation_heads,
        allow_init=True,
        deep_supervision=deep_supervision,
    )


def checkpoint_dict(network_weights: dict, plans: dict, dataset_json: dict,
                    configuration: str = CONFIGURATION, fold: int | str = 0,
                    trainer_name: str = "nnUNetTrainer",
                    mirroring_axes: tuple[int, ...] | None = (0, 1, 2),
                    extra: dict | None = None) -> dict:
    """A checkpoint laid out like nnU-Net's own `save_checkpoint` writes it."""
    checkpoint = {
        "network_weights": snapshot_state(network_weights),  # aliases kept: 1 copy per tensor
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 0,
        "init_args": {
            "plans": plans,
            "configuration": configuration,
            "fold": fold,
            "dataset_json": dataset_json,
        },
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": mirroring_axes,
    }
    if extra:
        checkpoint.update(extra)
    return checkpoint


def write_results_folder(folder: str | os.PathLike, plans: dict, dataset_json: dict,
                         network_weights: dict, fold: int | str = 0,
                         checkpoint_name: str = "checkpoint_final.pth",
                         trainer_name: str = "nnUNetTrainer") -> Path:
    """Write an nnU-Net results folder: dataset.json, plans.json, fold_F/checkpoint_final.pth."""
    folder = Path(folder)
    (folder / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    checkpoint = checkpoint_dict(network_weights, plans, dataset_json, fold=fold,
                                 trainer_name=trainer_name)
    torch.save(checkpoint, folder / f"fold_{fold}" / checkpoint_name)
    return folder


def create_random_model(folder: str | os.PathLike, spec: UNetSpec | None = None,
                        seed: int = 0) -> Path:
    """A results folder holding a seeded, randomly initialised network (nnU-Net's own init)."""
    spec = spec or tiny_spec()
    plans = make_plans(spec)
    dataset_json = make_dataset_json(spec.labels)
    torch.manual_seed(seed)
    network = build_network(plans, dataset_json)
    return write_results_folder(folder, plans, dataset_json, network.state_dict())


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def read_json(path: str | os.PathLike) -> dict:
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)

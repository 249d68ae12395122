"""The values of a plans.json configuration and a checkpoint that only inference reads, checked
against what nnU-Net needs, with bounds.

Each of these would pass the network check at install and crash (or exhaust the memory of)
`segment` later: patch size and spacing, the architecture entry, normalisation schemes and the
intensity statistics CT normalisation reads, the axis order, and the mirroring axes.
"""

from __future__ import annotations

import math
from pathlib import Path

from LymphNodeDGSTLib.errors import ModelValidationError

MAX_PATCH_AXIS = 4096
MAX_PATCH_VOXELS = 2 ** 24          # 16.8 M voxels: nnU-Net's 3D patches are ~2 M, 2D ~4 M
SPACING_RANGE_MM = (0.01, 100.0)    # finer than 10 micrometres: a CT would resample to billions of voxels
NORMALIZATION_SCHEMES = ("CTNormalization", "ZScoreNormalization", "NoNormalization",
                         "RescaleTo01Normalization", "RGBTo01Normalization")
INTENSITY_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")


def check_configuration(folder: Path, plans: dict, name: str) -> None:
    """Everything of configuration `name` (and the plan-wide values it uses) that inference reads."""
    where = f"{folder}/plans.json: configuration '{name}'"
    configuration = plans["configurations"][name]
    if not isinstance(configuration, dict):
        raise ModelValidationError(f"{where} is not a JSON object")
    architecture = configuration.get("architecture")
    if architecture is not None and not (isinstance(architecture, dict)
                                         and isinstance(architecture.get("arch_kwargs", {}), dict)):
        raise ModelValidationError(f"{where}: 'architecture' must be an object with 'arch_kwargs', "
                                   f"not {_shown(architecture)}")
    _check_patch_and_spacing(where, configuration)
    _check_normalization(folder, where, plans, configuration)
    _check_transpose(folder, plans)


def check_mirroring_axes(path: Path, axes: object) -> None:
    """A checkpoint's inference_allowed_mirroring_axes: absent, or distinct axes 0-2."""
    if axes is None:
        return
    if not (isinstance(axes, (list, tuple)) and len(axes) <= 3 and len(set(map(repr, axes))) == len(axes)
            and all(_is_int(a) and 0 <= a <= 2 for a in axes)):
        raise ModelValidationError(f"{path}: 'inference_allowed_mirroring_axes' must be a list of "
                                   f"distinct axes 0, 1 or 2, not {_shown(axes)}")


def _check_patch_and_spacing(where: str, configuration: dict) -> None:
    patch, spacing = configuration.get("patch_size"), configuration.get("spacing")
    if not (isinstance(patch, list) and patch and all(_is_int(p) and 1 <= p <= MAX_PATCH_AXIS for p in patch)):
        raise ModelValidationError(f"{where}: 'patch_size' must be a list of whole numbers from 1 to "
                                   f"{MAX_PATCH_AXIS}, not {_shown(patch)}")
    if math.prod(patch) > MAX_PATCH_VOXELS:
        raise ModelValidationError(f"{where}: 'patch_size' {patch} holds {math.prod(patch):,} voxels, "
                                   f"more than the {MAX_PATCH_VOXELS:,} any nnU-Net network uses")
    low, high = SPACING_RANGE_MM
    if not (isinstance(spacing, list) and len(spacing) == len(patch)
            and all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                    and low <= s <= high for s in spacing)):
        raise ModelValidationError(f"{where}: 'spacing' must be {len(patch)} numbers from {low:g} to "
                                   f"{high:g} mm (one per patch_size axis), not {_shown(spacing)}")
    arch = (configuration.get("architecture") or {}).get("arch_kwargs") or {}
    conv_op = str(arch.get("conv_op", ""))
    dims = 3 if conv_op.endswith("Conv3d") else 2 if conv_op.endswith("Conv2d") else len(patch)
    if len(patch) != dims:
        raise ModelValidationError(f"{where}: 'patch_size' {patch} has {len(patch)} axes but the "
                                   f"network is {dims}D")
    strides = arch.get("strides")
    if isinstance(strides, list) and all(isinstance(s, (list, int)) for s in strides):
        total = [1] * dims
        for stage in strides:
            for axis, step in enumerate(stage if isinstance(stage, list) else [stage] * dims):
                total[axis] *= step if _is_int(step) and step > 0 else 1
        if any(p % t for p, t in zip(patch, total)):
            raise ModelValidationError(f"{where}: 'patch_size' {patch} is not divisible by the "
                                       f"network's total downsampling {total}")


def _check_normalization(folder: Path, where: str, plans: dict, configuration: dict) -> None:
    schemes = configuration.get("normalization_schemes")
    if schemes is None:
        return  # nnU-Net's default for the configuration
    if not (isinstance(schemes, list) and len(schemes) == 1 and schemes[0] in NORMALIZATION_SCHEMES):
        raise ModelValidationError(f"{where}: 'normalization_schemes' must name one of nnU-Net's "
                                   f"schemes ({', '.join(NORMALIZATION_SCHEMES)}) for the one CT "
                                   f"channel, not {_shown(schemes)}")
    if schemes[0] != "CTNormalization":
        return
    properties = plans.get("foreground_intensity_properties_per_channel",
                           plans.get("foreground_intensity_properties_by_modality"))
    channel = properties.get("0") if isinstance(properties, dict) else None
    if not (isinstance(channel, dict) and all(
            isinstance(channel.get(k), (int, float)) and not isinstance(channel.get(k), bool)
            and math.isfinite(channel[k]) for k in INTENSITY_KEYS)):
        raise ModelValidationError(
            f"{folder}/plans.json: CT normalisation needs 'foreground_intensity_properties_per_channel'"
            f" with finite {', '.join(INTENSITY_KEYS)} for channel '0'; found {_shown(properties)}")


def _check_transpose(folder: Path, plans: dict) -> None:
    for key in ("transpose_forward", "transpose_backward"):
        order = plans.get(key, [0, 1, 2])
        if not (isinstance(order, list) and sorted(order) == [0, 1, 2] and all(_is_int(a) for a in order)):
            raise ModelValidationError(f"{folder}/plans.json: '{key}' must be an order of the axes "
                                       f"0, 1, 2, not {_shown(order)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: object) -> str:
    text = repr(value).encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= 60 else text[:57] + "..."

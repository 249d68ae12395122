"""Which nnU-Net networks LymphNodeDGST runs, and the refusal message for the others.

Every network is built from plans.json with nnU-Net's own `get_network_from_plans`, never by
running a trainer class found by name: a downloaded checkpoint cannot make us import its code.
That supports exactly the architectures nnU-Net itself describes in plans.json. Networks that a
custom trainer builds in its own `build_network_architecture` (the LN-Seg-FM authors' SwinUNETR
and SwinUNETRv2, MONAI-based) are refused with a message that says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from LymphNodeDGSTLib.errors import ModelValidationError

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
SUPPORTED_NETWORKS = {
    PLAIN_UNET: "PlainConvUNet (plain nnU-Net)",
    RESENC_UNET: "ResidualEncoderUNet (nnU-Net ResEnc M, L, XL)",
}
SUPPORTED_TEXT = ("LymphNodeDGST runs nnU-Net v2's PlainConvUNet (plain nnU-Net) and "
                  "ResidualEncoderUNet (ResEnc M/L/XL), which it builds from plans.json with "
                  "nnU-Net's own code; networks defined in a custom trainer class (e.g. the "
                  "authors' SwinUNETR/SwinUNETRv2) need that class's code, which a checkpoint does "
                  "not carry and which is never run from a downloaded file")


def network_class_name(plans: dict, configuration: str) -> str:
    """The architecture class plans.json names for a configuration (following `inherits_from`)."""
    configurations = plans.get("configurations") or {}
    seen = set()
    while configuration in configurations and configuration not in seen:
        seen.add(configuration)
        entry = configurations[configuration] or {}
        architecture = entry.get("architecture")
        if isinstance(architecture, dict) and architecture.get("network_class_name"):
            return str(architecture["network_class_name"])
        configuration = entry.get("inherits_from")
    return ""


def check_supported_network(where: str | Path, plans: dict, configuration: str, trainer_name: str,
                            weights: Mapping[str, object]) -> None:
    """Refuse a network LymphNodeDGST cannot build, with what is supported and why."""
    name = network_class_name(plans, configuration)
    short = name.rsplit(".", 1)[-1] or "none"
    if name not in SUPPORTED_NETWORKS:
        raise ModelValidationError(f"{where}: unsupported network '{short}' in plans.json "
                                   f"(trainer {trainer_name}). {SUPPORTED_TEXT}")
    if not any(str(key).startswith("decoder.seg_layers.") for key in weights):
        sample = ", ".join(list(map(str, weights))[:2])
        raise ModelValidationError(
            f"{where}: the weights are not those of the {short} that plans.json describes "
            f"(trainer {trainer_name} built its own network; first weights: {sample}). "
            f"{SUPPORTED_TEXT}")

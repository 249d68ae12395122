"""Which parameters of an nnU-Net network a policy sees: convolution weights (selected entry by
entry), and the always-trained set (norm affine parameters, all biases, the `seg_layers` head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from torch import nn
from torch.nn.modules.conv import _ConvNd

from LymphNodeDGSTLib.adaptation.dgst.selection import FilterLayout


SEG_LAYERS = "seg_layers"
_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, getattr(nn, "RMSNorm", None))
    if t is not None
)


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter of the network and the roles that decide how policies treat it."""

    name: str
    parameter: nn.Parameter = field(repr=False)
    is_bias: bool
    is_norm: bool
    in_seg_layers: bool
    layout: FilterLayout | None  # set for convolution weights

    @property
    def always_trained(self) -> bool:
        """Norm affine parameters, all biases and the segmentation heads."""
        return self.is_bias or self.is_norm or self.in_seg_layers


def describe_parameters(network: nn.Module) -> list[ParameterInfo]:
    """Every parameter of `network` (shared ones once), named as `named_parameters()` names it."""
    infos: list[ParameterInfo] = []
    seen: set[int] = set()
    for module_name, module in network.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            name = f"{module_name}.{parameter_name}" if module_name else parameter_name
            is_conv_weight = isinstance(module, _ConvNd) and parameter_name == "weight"
            infos.append(ParameterInfo(
                name=name,
                parameter=parameter,
                is_bias=parameter_name == "bias",
                is_norm=isinstance(module, _NORM_TYPES),
                in_seg_layers=SEG_LAYERS in name.split("."),
                layout=FilterLayout.of(module) if is_conv_weight else None,
            ))
    return infos

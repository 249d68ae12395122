"""The LoRA comparison method: PEFT adapters on every convolution outside `seg_layers`, and folding
them back into plain convolution weights (so the result is an ordinary nnU-Net checkpoint).
"""

from __future__ import annotations

import copy
import functools
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from LymphNodeDGSTLib.adaptation.dgst.parameters import SEG_LAYERS
from LymphNodeDGSTLib.adaptation.dgst.policies import WholeTensorPolicy


@functools.cache
def _lora_conv_transpose_class() -> type:
    """A PEFT LoRA layer for transposed convolutions, which PEFT itself does not support.

    A is a transposed convolution `in -> r` with the base layer's kernel, stride and padding; B is
    a pointwise transposed convolution `r -> out`. Both are linear, so
    `delta_W[i, o, ...] = scaling * sum_r A[i, r, ...] * B[r, o]` reproduces B(A(x)) exactly.
    """
    from peft.tuners.lora.layer import _ConvNd as LoraConvNd

    class LoraConvTranspose(LoraConvNd):
        def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
            target = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
            if target.groups != 1:
                raise ValueError("LoRA on grouped transposed convolutions is not supported")
            super().__init__(base_layer, adapter_name, **kwargs)
            self.conv_fn = getattr(torch.nn.functional, f"conv_transpose{self._kernel_dim - 2}d")
            lora_a = self.lora_A[adapter_name]
            lora_a.output_padding, lora_a.dilation = target.output_padding, target.dilation

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_channels, module.out_channels

        @property
        def lora_variants(self) -> dict:
            return {(): None}

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            weight_a = self.lora_A[adapter].weight  # [in, r, *k]
            weight_b = self.lora_B[adapter].weight.flatten(1)  # [r, out]
            dtype = self.get_base_layer().weight.dtype
            delta = torch.einsum("ir...,ro->io...", weight_a.float(), weight_b.float())
            return (delta * self.scaling[adapter]).to(dtype)

    return LoraConvTranspose


def _replace_modules_everywhere(network: nn.Module, replacements: dict[int, nn.Module],
                                skip_parents: set[int] = frozenset()) -> None:
    """Point every reference to a replaced module at its replacement.

    nnU-Net's blocks hold each convolution twice (`conv` and `all_modules.0`, the one forward
    uses), and the decoder holds the encoder; PEFT only swaps the first name it sees.
    """
    for parent in list(network.modules()):
        if id(parent) in skip_parents:
            continue
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]


def inject_lora(network: nn.Module, rank: int = 32, alpha: float = 16, dropout: float = 0.1) -> nn.Module:
    """Insert PEFT LoRA adapters (in place) on every convolution outside `seg_layers`."""
    from peft import LoraConfig, inject_adapter_in_model

    originals = {name: module for name, module in network.named_modules()
                 if isinstance(module, _ConvNd) and SEG_LAYERS not in name.split(".")}
    if not originals:
        raise ValueError("the network has no convolution to put LoRA adapters on")
    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout),
                        target_modules=list(originals), bias="none")
    transpose_layer = _lora_conv_transpose_class()
    config._register_custom_module({nn.ConvTranspose1d: transpose_layer,
                                    nn.ConvTranspose2d: transpose_layer,
                                    nn.ConvTranspose3d: transpose_layer})
    inject_adapter_in_model(config, network)
    wrappers = {id(module): network.get_submodule(name) for name, module in originals.items()}
    _replace_modules_everywhere(network, wrappers, skip_parents={id(w) for w in wrappers.values()})
    return network


def _peft_misreads_kernel(module: nn.Module) -> bool:
    """PEFT (0.21) merges any convolution whose weight is 1x1 in dims 2-3 as a 2-D 1x1 conv, which
    fails for Conv3d kernels 1x1xk, e.g. the 1x1x1 skip projections of ResEnc's residual blocks."""
    base = module.get_base_layer()
    return isinstance(base, nn.Conv3d) and tuple(base.weight.shape[2:4]) == (1, 1)


def _merge_by_convolution(module: nn.Module) -> None:
    """Fold a Conv3d LoRA adapter into its base weight: W[o, i, k] += s * sum_r B[o, r] A[r, i, k]."""
    base = module.get_base_layer()
    if base.groups != 1:
        raise ValueError("LoRA merge of grouped 1x1xk convolutions is not supported")
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        weight_a, weight_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        delta = torch.nn.functional.conv3d(weight_a.float().transpose(0, 1), weight_b.float())
        base.weight.data += (delta.transpose(0, 1) * module.scaling[adapter]).to(base.weight.dtype)


def merge_lora(network: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base convolution, in place; returns the plain network.

    Afterwards the state_dict has exactly the keys of the network before `inject_lora`, and
    inference needs no PEFT.
    """
    from peft.tuners.lora import LoraLayer

    bases = {}
    for module in network.modules():
        if isinstance(module, LoraLayer):
            if _peft_misreads_kernel(module):
                _merge_by_convolution(module)
            else:
                module.merge(safe_merge=True)
            bases[id(module)] = module.get_base_layer()
    _replace_modules_everywhere(network, bases)
    return network


def merged_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state_dict (original keys) of a LoRA-injected network; the network is untouched."""
    return merge_lora(copy.deepcopy(network)).state_dict()


class LoRAPolicy(WholeTensorPolicy):
    """LoRA adapters (PEFT) on every convolution + all biases + `seg_layers`.

    Build it after loading the foundation weights: it changes the network's modules and keys.
    Call `merge_lora(network)` (or `merged_state_dict`) before saving a plain nnU-Net checkpoint.
    """

    def __init__(self, network: nn.Module, rank: int = 32, alpha: float = 16,
                 dropout: float = 0.1) -> None:
        inject_lora(network, rank=rank, alpha=alpha, dropout=dropout)
        self.rank, self.alpha, self.dropout = int(rank), alpha, float(dropout)
        super().__init__(network, "lora", lambda info: (
            ".lora_" in f".{info.name}" or info.is_bias or info.in_seg_layers))

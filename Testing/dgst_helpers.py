"""Shared helpers of the DGST tests and the toy benchmark: a tiny nnU-Net, batches and losses,
an edge-detection task the convolutions must learn, and the changed-entry masks the tests compare.
(A helper module, not a test file: test_dgst.py, test_dgst_method.py, test_resenc.py and
benchmarks/bench_toy_selection.py import it.)"""

from __future__ import annotations

import torch
from torch import nn
from LymphNodeDGSTLib.adaptation.dgst import masked_step as dgst_step
from LymphNodeDGSTLib.adaptation.dgst import policies as dgst_policies
from LymphNodeDGSTLib.engine.store import architectures


GAMMA = 2


INPUT_SHAPE = (2, 1, 4, 16, 16)  # batch, channel, z, y, x: divisible by the tiny net's strides


def tiny_unet(deep_supervision: bool = True, seed: int = 0) -> nn.Module:
    """A 3-stage nnU-Net PlainConvUNet (Conv3d + ConvTranspose3d + seg_layers), a few k weights."""
    spec = architectures.tiny_spec(
        features_per_stage=(4, 8, 16), patch_size=(4, 16, 16),
        strides=([1, 1, 1], [1, 2, 2], [2, 2, 2]),
        kernel_sizes=([1, 3, 3], [3, 3, 3], [3, 3, 3]))
    torch.manual_seed(seed)
    return architectures.build_network(architectures.make_plans(spec),
                                       architectures.make_dataset_json(spec.labels),
                                       deep_supervision=deep_supervision)


def random_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(INPUT_SHAPE, generator=generator)
    target = (torch.rand(INPUT_SHAPE, generator=generator) > 0.7).long()[:, 0]
    return image, target


def segmentation_loss(outputs, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on every output (deep supervision: the target downsampled by striding)."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    loss = torch.zeros(())
    for output in outputs:
        steps = [t // o for t, o in zip(target.shape[1:], output.shape[2:])]
        loss = loss + nn.functional.cross_entropy(
            output, target[:, ::steps[0], ::steps[1], ::steps[2]])
    return loss


def sgd(parameters, lr: float = 1e-2) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=lr, momentum=0.99, nesterov=True, weight_decay=3e-5)


def record_plans(policy: dgst_policies.UpdatePolicy) -> list[dict[int, torch.Tensor]]:
    """Wrap policy.plan so every step's allowed entries (per parameter with a gradient) are kept."""
    recorded: list[dict[int, torch.Tensor]] = []
    original_plan = policy.plan

    def recording_plan() -> dgst_policies.StepPlan:
        plan = original_plan()
        allowed = {id(p): torch.ones_like(p, dtype=torch.bool) for p in plan.whole if p.grad is not None}
        allowed.update({id(p): mask.clone() for p, mask, _ in plan.masked if p.grad is not None})
        recorded.append(allowed)
        return plan

    policy.plan = recording_plan
    return recorded


def train(network: nn.Module, policy: dgst_policies.UpdatePolicy, steps: int, optimizer=None,
          **stepper_options) -> tuple[dgst_step.MaskedStepper, list[dgst_step.StepReport]]:
    optimizer = optimizer or sgd(policy.trainable_parameters())
    stepper = dgst_step.MaskedStepper(policy, **stepper_options)
    reports = []
    for step in range(steps):
        image, target = random_batch(step)
        optimizer.zero_grad(set_to_none=True)
        segmentation_loss(network(image), target).backward()
        reports.append(stepper.step(optimizer))
    return stepper, reports


def changed_mask(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return before.view(torch.int32) != after.detach().view(torch.int32)


def output_filters(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[out_channels, -1], written independently of FilterLayout (ungrouped convolutions)."""
    return (tensor.transpose(0, 1) if transposed else tensor).flatten(1)


def union_of(recorded: list[dict[int, torch.Tensor]], parameter: nn.Parameter) -> torch.Tensor:
    union = torch.zeros_like(parameter, dtype=torch.bool)
    for allowed in recorded:
        if id(parameter) in allowed:
            union |= allowed[id(parameter)]
    return union


def edge_task(seed: int, n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Smoothed noise volumes; the label marks where the image rises steeply along x (an edge
    detector the convolutions must learn: no per-channel affine of the input gives it)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        image = torch.randn(INPUT, generator=generator)
        image = nn.functional.avg_pool3d(image, (1, 3, 3), stride=1, padding=(0, 1, 1))
        rise = torch.zeros_like(image)
        rise[..., 1:] = image[..., 1:] - image[..., :-1]
        target = (rise > 0.25).long()[:, 0]
        batches.append((image, target))
    return batches


INPUT = (2, 1, 4, 16, 16)

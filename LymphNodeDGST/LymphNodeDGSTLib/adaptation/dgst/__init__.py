"""Sparse update policies and the masked optimiser step of DGST fine-tuning.

A *policy* answers, once per iteration and after the backward pass, "which entries of which
parameters may change in this step". A `MaskedStepper` then applies any torch optimiser (SGD with
momentum/Nesterov/weight decay, Adam, AdamW, ...) so that every entry the policy did not allow is
bitwise unchanged by the step: it masks the gradient (so clipping and the optimiser state see the
gradient that is really applied) *and* restores the disallowed entries after the optimiser's
update (so momentum and weight decay cannot move them).

Policies (`make_policy(name, network, ...)`):
  dgst    top-`gamma` entries by |grad| per output filter of every convolution, re-selected every
          step, plus the always-trained set (norm affine parameters, all biases, `seg_layers`)
  random  `gamma` random entries per output filter, re-drawn every step, plus the always-trained set
  static  `gamma` entries per output filter chosen once from |grad| summed over the first
          `warmup_steps` applied steps (only the always-trained set moves meanwhile), then fixed
  bias    all biases + `seg_layers` (BitFit)
  norm    norm affine parameters + `seg_layers`
  full    everything
  lora    PEFT LoRA adapters on every convolution outside `seg_layers` + biases + `seg_layers`;
          `merge_lora` folds them back into plain convolution weights

This project's variants of DGST (not the paper's method; `dgst` above is the paper's, unchanged):
  dgst-ema     top-`gamma` per filter of a running average of |grad| (EMA, beta 0.9), so the
               selection is steadier and momentum gets several steps on the same entries
  dgst-split   `dgst`'s selection; the sparse convolution entries get 10x the learning rate of the
               always-trained set (optimizer parameter groups with an `lr_scale`)
  dgst-budget  `dgst`'s selection, but each filter may ever move at most 4 x `gamma` distinct
               entries; once a filter's budget would be exceeded it re-selects among its moved
               entries first (bounds the drift from the foundation and the adapter size)

Every sparse policy takes `selection_only=True`: the always-trained set is frozen too, so only
the selected convolution entries move (an ablation: does the selection itself matter?).

Use in a training step (nnU-Net's train_step, with or without a GradScaler)::

    policy = make_policy("dgst", network, gamma=2)          # after loading the foundation weights
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1e-3, momentum=0.99,
                                nesterov=True, weight_decay=3e-5)
    stepper = MaskedStepper(policy, max_grad_norm=12.0)
    ...
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        report = stepper.step(optimizer)            # select, mask, clip, step, restore
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)                  # optional: step() unscales if you did not
        report = stepper.step(optimizer, scaler)    # calls scaler.step(optimizer) itself
        scaler.update()
    report.entries_updated                          # entries allowed to change in this step

Selection ties: exactly min(gamma, filter size) entries are chosen in every filter; among equal
scores the entry with the lowest position in the filter (row-major over input channel and kernel
position) wins, on every device.

The package: selection.py (the paper's top-gamma choice), parameters.py (what a policy sees),
policies.py (DGST and the comparison policies), variants.py (this project's DGST variants), lora.py,
masked_step.py (the masked optimiser step); this module names the policies and makes them.
"""

from __future__ import annotations

from torch import nn

from LymphNodeDGSTLib.adaptation.dgst.policies import (DynamicTopGammaPolicy, RandomPolicy, StaticPolicy, UpdatePolicy, WholeTensorPolicy)
from LymphNodeDGSTLib.adaptation.dgst.variants import (BUDGET_PER_GAMMA, BudgetTopGammaPolicy, EMA_BETA, RunningAverageTopGammaPolicy, SPLIT_LR_SCALE)
from LymphNodeDGSTLib.adaptation.dgst.lora import LoRAPolicy


POLICY_NAMES = ("dgst", "random", "static", "bias", "norm", "full", "lora",
                "dgst-ema", "dgst-split", "dgst-budget")
SPARSE_POLICY_NAMES = ("dgst", "random", "static", "dgst-ema", "dgst-split", "dgst-budget")


def make_policy(name: str, network: nn.Module, gamma: int = 2, seed: int = 0,
                warmup_steps: int = 10, lora_rank: int = 32, lora_alpha: float = 16,
                lora_dropout: float = 0.1, selection_only: bool = False,
                allow_full_selection: bool = False) -> UpdatePolicy:
    """The update policy called `name` (one of POLICY_NAMES) for `network`.

    `selection_only` (sparse policies only) freezes the always-trained set as well;
    `allow_full_selection` lets a sparse policy take a gamma that covers whole kernels.
    """
    if selection_only and name not in SPARSE_POLICY_NAMES:
        raise ValueError(f"selection-only needs a sparse method ({', '.join(SPARSE_POLICY_NAMES)}), "
                         f"not {name!r}")
    sparse = {"selection_only": selection_only, "allow_full_selection": allow_full_selection}
    if name == "dgst":
        return DynamicTopGammaPolicy(network, gamma, **sparse)
    if name == "dgst-split":
        return DynamicTopGammaPolicy(network, gamma, sparse_lr_scale=SPLIT_LR_SCALE, name="dgst-split",
                                     **sparse)
    if name == "dgst-ema":
        return RunningAverageTopGammaPolicy(network, gamma, beta=EMA_BETA, **sparse)
    if name == "dgst-budget":
        return BudgetTopGammaPolicy(network, gamma, budget=BUDGET_PER_GAMMA * gamma, **sparse)
    if name == "random":
        return RandomPolicy(network, gamma, seed=seed, **sparse)
    if name == "static":
        return StaticPolicy(network, gamma, warmup_steps=warmup_steps, **sparse)
    if name == "bias":
        return WholeTensorPolicy(network, "bias", lambda i: i.is_bias or i.in_seg_layers)
    if name == "norm":
        return WholeTensorPolicy(network, "norm", lambda i: i.is_norm or i.in_seg_layers)
    if name == "full":
        return WholeTensorPolicy(network, "full", lambda i: True)
    if name == "lora":
        return LoRAPolicy(network, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout)
    raise ValueError(f"unknown update policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")



"""Cost of the DGST update on the default 30 M-parameter 3d_fullres nnU-Net, side by side.

    python Testing/benchmarks/bench_dgst_step.py [--device cpu|cuda] [--json OUT] [--patch Z Y X]

Measures in one run:
  (a) DGST selection and the whole masked step (select, mask, clip, step, restore) as a share of
      one full fine-tuning training step (forward, backward, clip, step); target <= 3 %;
  (b) the O(numel) selection against a reconstruction of the authors' construction (full argsort
      per filter plus a dense one-hot from an identity matrix, defect 3 of DGST.md) on the same
      real gradients of every sparse layer; target >= 100x;
  (c) peak memory of a DGST training step against a full fine-tuning step, each in its own
      subprocess (peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA); target: no more.
With --device cuda the training steps use AMP (float16 autocast + GradScaler), as nnU-Net does.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pydoc
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from LymphNodeDGSTLib.adaptation import dgst
from LymphNodeDGSTLib.adaptation.dgst import masked_step as dgst_step
from LymphNodeDGSTLib.adaptation.dgst import policies as dgst_policies
from LymphNodeDGSTLib.adaptation.dgst import selection as dgst_selection
from LymphNodeDGSTLib.engine.store import architectures

CPU_DEFAULT_PATCH = (40, 96, 96)  # the foundation's (40, 192, 192) takes ~70 s a step on 2 cores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="patch size (default: the foundation's on CUDA, "
                             f"{CPU_DEFAULT_PATCH} on CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measured training steps per method (default 2 on CPU, 10 on CUDA)")
    parser.add_argument("--gamma", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true", help="skip part (c)")
    parser.add_argument("--memory-probe", choices=("full", "dgst"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The training step nnU-Net runs: DC+CE loss with deep supervision, clipping at 12, SGD Nesterov

def build_foundation_network(spec: architectures.UNetSpec) -> torch.nn.Module:
    """The class, arguments and initialisation nnU-Net's get_network_from_plans uses, with deep
    supervision; built directly so the benchmark needs only nnunetv2's (pure Python) losses."""
    architecture = architectures.make_plans(spec)["configurations"][architectures.CONFIGURATION]["architecture"]
    kwargs = dict(architecture["arch_kwargs"])
    for name in architecture["_kw_requires_import"]:
        if kwargs[name] is not None:
            kwargs[name] = pydoc.locate(kwargs[name])
    network = pydoc.locate(architecture["network_class_name"])(
        input_channels=1, num_classes=len(spec.labels), deep_supervision=True, **kwargs)
    network.apply(network.initialize)
    return network


class Setup:
    """A network, its loss, a random batch and an optimiser for one update method."""

    def __init__(self, method: str, device: torch.device, patch: tuple[int, int, int],
                 gamma: int, seed: int = 0) -> None:
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        spec = architectures.default_foundation_spec()
        torch.manual_seed(seed)
        self.network = build_foundation_network(spec).to(device)
        self.parameters = architectures.count_parameters(self.network)
        self.device = device
        self.policy = dgst.make_policy(method, self.network, gamma=gamma)
        self.optimizer = torch.optim.SGD(self.policy.trainable_parameters(), lr=1e-3,
                                         momentum=0.99, nesterov=True, weight_decay=3e-5)
        self.stepper = dgst_step.MaskedStepper(self.policy, max_grad_norm=12.0)
        self.use_amp = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None

        n_outputs = len(spec.resolved_strides())
        weights = np.array([1 / (2 ** i) for i in range(n_outputs - 1)])
        weights[-1] = 0
        self.loss = DeepSupervisionWrapper(
            DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                           weight_ce=1, weight_dice=1, ignore_label=None,
                           dice_class=MemoryEfficientSoftDiceLoss),
            weights / weights.sum())
        generator = torch.Generator().manual_seed(seed)
        self.image = torch.randn((spec.batch_size, 1, *patch), generator=generator).to(device)
        label = (torch.rand((spec.batch_size, 1, *patch), generator=generator) > 0.9).float()
        strides = np.cumprod(np.array(spec.resolved_strides()), axis=0)[:n_outputs - 1]
        shapes = [tuple(int(p) for p in np.array(patch) // s) for s in strides]
        self.target = [torch.nn.functional.interpolate(label, size=tuple(s), mode="nearest").to(device)
                       for s in shapes]
        self.batch_size = spec.batch_size

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext()
        with autocast:
            loss = self.loss(self.network(self.image), self.target)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)

    def plain_step(self) -> None:
        """nnU-Net's own step: clip all gradients at 12, then optimizer.step()."""
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def masked_step(self) -> dgst_step.StepReport:
        report = self.stepper.step(self.optimizer, self.scaler)
        if self.scaler is not None:
            self.scaler.update()
        return report


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_training(full: Setup, sparse: Setup, repeats: int) -> dict:
    """Alternate full and DGST steps; time every phase."""
    device = full.device
    rows: dict[str, list[float]] = {k: [] for k in (
        "full_forward_backward", "full_clip_step", "dgst_forward_backward", "dgst_selection",
        "dgst_masked_step")}
    entries, stepped = [], []
    for repeat in range(repeats + 1):  # the first round is a warm-up (allocates momentum buffers)
        t0 = clock(device)
        full.forward_backward()
        t1 = clock(device)
        full.plain_step()
        t2 = clock(device)
        sparse.forward_backward()
        t3 = clock(device)
        sparse.policy.plan()  # selection alone (pure: the masked step selects again)
        t4 = clock(device)
        report = sparse.masked_step()
        t5 = clock(device)
        if repeat == 0:
            continue
        for key, value in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            rows[key].append(value)
        entries.append(report.entries_updated)
        stepped.append(report.stepped)
    mean = {key: statistics.mean(values) for key, values in rows.items()}
    full_step = mean["full_forward_backward"] + mean["full_clip_step"]
    return {
        "seconds": mean,
        "seconds_all": rows,
        "full_training_step_s": full_step,
        "selection_share_of_full_step": mean["dgst_selection"] / full_step,
        "masked_step_share_of_full_step": mean["dgst_masked_step"] / full_step,
        "masked_step_overhead_share": (mean["dgst_masked_step"] - mean["full_clip_step"]) / full_step,
        "entries_updated_per_step": entries,
        "steps_applied": stepped,
    }


# ---------------------------------------------------------------------------------------------
# (b) Selection: top-k + threshold vs. full argsort + identity-matrix one-hot

def naive_mask(gradient: torch.Tensor, layout: dgst_selection.FilterLayout, gamma: int) -> torch.Tensor:
    """The authors' construction (on output filters): full sort, dense one-hot from an identity."""
    scores = layout.to_filters(gradient.abs())
    order = scores.argsort(dim=1, descending=True)[:, :gamma]
    identity = torch.eye(scores.shape[1], device=scores.device)
    one_hot = identity[order].sum(dim=1)
    return layout.from_filters(one_hot > 0)


def median_seconds(function, device: torch.device, calls: int, budget_s: float | None = None) -> float:
    """Median time of `calls` calls after one warm-up (fewer when `budget_s` runs out)."""
    function()
    times = []
    for _ in range(calls):
        t0 = clock(device)
        function()
        times.append(clock(device) - t0)
        if budget_s is not None and sum(times) > budget_s:
            break
    return statistics.median(times)


def same_scores_selected(gradient: torch.Tensor, layout: dgst_selection.FilterLayout, gamma: int,
                         mask_a: torch.Tensor, mask_b: torch.Tensor) -> bool:
    """Both masks pick the same |grad| values in every filter (they may differ only among ties)."""
    scores = layout.to_filters(gradient.abs())
    k = min(gamma, layout.filter_size)
    picked = [scores[layout.to_filters(m)].view(-1, k).sort(dim=1).values for m in (mask_a, mask_b)]
    return bool(torch.equal(*picked))


def time_selection(sparse: Setup, gamma: int) -> dict:
    device = sparse.device
    sparse.forward_backward()  # fresh, unmasked gradients
    policy = sparse.policy
    layers = []
    for info in policy.sparse:
        gradient = info.parameter.grad
        if gradient is None:
            continue
        fast_s = median_seconds(
            lambda: policy._mask_from_scores(info, policy._gradient_scores(info, gradient)), device, 5)
        fast_mask = policy._mask_from_scores(info, policy._gradient_scores(info, gradient))
        naive_s = median_seconds(lambda: naive_mask(gradient, info.layout, gamma), device, 3, budget_s=1.0)
        slow_mask = naive_mask(gradient, info.layout, gamma)
        layers.append({"name": info.name, "shape": list(info.layout.shape),
                       "transposed": info.layout.transposed, "filter_size": info.layout.filter_size,
                       "fast_s": fast_s, "naive_s": naive_s,
                       "masks_identical": bool(torch.equal(slow_mask, fast_mask)),
                       "same_scores_selected": same_scores_selected(gradient, info.layout, gamma,
                                                                    slow_mask, fast_mask)})
        del slow_mask
    # The policy's own path selects all layers at once, stacking layers of equal filter length.
    fast_total = median_seconds(policy.select, device, 5)
    sparse.masked_step()  # finish the iteration (the GradScaler expects step + update)
    naive_total = sum(layer["naive_s"] for layer in layers)
    largest = max(layers, key=lambda layer: layer["naive_s"])
    return {"layers": layers, "fast_total_s": fast_total,
            "fast_sum_of_single_layer_calls_s": sum(layer["fast_s"] for layer in layers),
            "naive_total_s": naive_total,
            "speedup_total": naive_total / fast_total,
            "speedup_min_layer": min(layer["naive_s"] / layer["fast_s"] for layer in layers),
            "largest_naive_layer": {"name": largest["name"], "shape": largest["shape"],
                                    "fast_s": largest["fast_s"], "naive_s": largest["naive_s"]},
            "layers_with_identical_masks": sum(layer["masks_identical"] for layer in layers),
            "all_select_the_same_scores": all(layer["same_scores_selected"] for layer in layers)}


def verify_bitwise(sparse: Setup) -> dict:
    """One more DGST step: count entries that changed outside / inside the allowed set."""
    policy = sparse.policy
    plans = []
    original_plan = policy.plan

    def recording_plan() -> dgst_policies.StepPlan:
        plan = original_plan()
        plans.append(plan)
        return plan

    policy.plan = recording_plan
    try:
        sparse.forward_backward()
        before = {id(info.parameter): info.parameter.detach().clone() for info in policy.sparse}
        report = sparse.masked_step()
    finally:
        policy.plan = original_plan
    masks = {id(p): mask for p, mask, _ in plans[0].masked}
    outside = inside = allowed = 0
    for info in policy.sparse:
        p = info.parameter
        changed = before[id(p)].view(torch.int32) != p.detach().view(torch.int32)
        mask = masks.get(id(p), torch.zeros_like(changed))
        outside += int((changed & ~mask).sum())
        inside += int((changed & mask).sum())
        allowed += int(mask.sum())
    return {"stepped": report.stepped, "conv_entries_allowed": allowed,
            "conv_entries_changed_inside": inside, "conv_entries_changed_outside": outside}


# ---------------------------------------------------------------------------------------------
# (c) Peak memory, one subprocess per method

def memory_probe(method: str, device: torch.device, patch, gamma: int) -> dict:
    setup = Setup(method, device, patch, gamma)
    step = setup.plain_step if method == "full" else setup.masked_step
    setup.forward_backward()
    step()  # warm-up: momentum buffers exist from here on
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        setup.forward_backward()
        step()
    result = {"method": method,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def measure_memory(args: argparse.Namespace, patch) -> dict:
    results = {}
    for method in ("full", "dgst"):
        command = [sys.executable, os.path.abspath(__file__), "--device", args.device,
                   "--patch", *map(str, patch), "--gamma", str(args.gamma), "--memory-probe", method]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        results[method] = json.loads(completed.stdout.strip().splitlines()[-1])
    key = "cuda_peak_allocated_bytes" if args.device == "cuda" else "peak_rss_bytes"
    results["measure"] = key
    results["dgst_over_full"] = results["dgst"][key] / results["full"][key]
    return results


# ---------------------------------------------------------------------------------------------

def print_report(result: dict) -> None:
    training, selection = result["training"], result["selection"]
    s = training["seconds"]
    print(f"\nDGST step benchmark: {result['parameters']:,} parameters, batch {result['batch_size']}, "
          f"patch {tuple(result['patch'])}, {result['device_name']}, AMP {result['amp']}")
    if result.get("note"):
        print(f"note: {result['note']}")
    print(f"load average (1/5/15 min) at start {result['load_average_at_start']}, "
          f"at end {result['load_average_at_end']} (other work on the machine skews CPU timings)")
    print("\n(a) time per training step (mean of", len(training["seconds_all"]["full_clip_step"]), "steps)")
    print(f"  full fine-tuning: forward+backward {s['full_forward_backward']:.3f} s, "
          f"clip+step {s['full_clip_step']:.4f} s, total {training['full_training_step_s']:.3f} s")
    print(f"  DGST selection alone           {s['dgst_selection']:.4f} s = "
          f"{100 * training['selection_share_of_full_step']:.2f} % of a full step")
    print(f"  DGST masked step (select+mask+clip+step+restore) {s['dgst_masked_step']:.4f} s = "
          f"{100 * training['masked_step_share_of_full_step']:.2f} % "
          f"(overhead over nnU-Net's clip+step: {100 * training['masked_step_overhead_share']:.2f} %)"
          "   target <= 3 %")
    print(f"  entries updated per DGST step: {training['entries_updated_per_step']}")
    print(f"\n(b) selection, all {len(selection['layers'])} sparse layers: "
          f"policy.select() {selection['fast_total_s']:.4f} s vs naive {selection['naive_total_s']:.4f} s "
          f"-> {selection['speedup_total']:.0f}x   target >= 100x")
    print(f"  layer by layer: O(numel) {selection['fast_sum_of_single_layer_calls_s']:.4f} s in all; "
          f"smallest per-layer gain {selection['speedup_min_layer']:.1f}x")
    big = selection["largest_naive_layer"]
    print(f"  largest layer {big['name']} {tuple(big['shape'])}: {big['fast_s'] * 1e3:.2f} ms vs "
          f"{big['naive_s'] * 1e3:.1f} ms = {big['naive_s'] / big['fast_s']:.0f}x;"
          " (medians: fast of 5 calls, naive of up to 3)")
    print(f"  identical masks in {selection['layers_with_identical_masks']}/{len(selection['layers'])} layers;"
          f" same |grad| values selected in every filter of every layer: "
          f"{selection['all_select_the_same_scores']} (masks may differ only among tied gradients)")
    check = result["bitwise_check"]
    print(f"\nbitwise check of one more DGST step (stepped: {check['stepped']}): "
          f"{check['conv_entries_changed_outside']} convolution entries changed outside the selection, "
          f"{check['conv_entries_changed_inside']} of {check['conv_entries_allowed']} selected changed")
    memory = result.get("memory")
    if memory:
        key = memory["measure"]
        print(f"\n(c) peak memory ({key}): full {memory['full'][key] / 2**30:.2f} GiB, "
              f"DGST {memory['dgst'][key] / 2**30:.2f} GiB -> DGST/full = {memory['dgst_over_full']:.3f}"
              "   target <= 1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    spec = architectures.default_foundation_spec()
    patch = tuple(args.patch) if args.patch else (tuple(spec.patch_size) if device.type == "cuda"
                                                   else CPU_DEFAULT_PATCH)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, device, patch, args.gamma)))
        return 0

    repeats = args.repeats or (10 if device.type == "cuda" else 2)
    full = Setup("full", device, patch, args.gamma)
    sparse = Setup("dgst", device, patch, args.gamma)
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "amp": full.use_amp, "parameters": full.parameters,
        "batch_size": full.batch_size, "patch": list(patch), "foundation_patch": list(spec.patch_size),
        "gamma": args.gamma, "repeats": repeats, "load_average_at_start": list(os.getloadavg()),
        "note": None if list(patch) == list(spec.patch_size) else
        f"patch {patch} instead of the foundation's {tuple(spec.patch_size)}: forward/backward is "
        "cheaper, so the DGST shares in (a) are overestimated (the selection cost does not depend "
        "on the patch)",
    }
    result["training"] = time_training(full, sparse, repeats)
    result["selection"] = time_selection(sparse, args.gamma)
    result["bitwise_check"] = verify_bitwise(sparse)
    del full, sparse
    if not args.skip_memory:
        result["memory"] = measure_memory(args, patch)
    result["load_average_at_end"] = list(os.getloadavg())
    print_report(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Site-adapter size per adaptation method, adapter install time and delta loading time.

    python Testing/benchmarks/bench_adapter_size.py [--archs demo default] [--iterations 250]
        [--other-iterations 20] [--patch-scale 1] [--json OUT]

What it does, for each architecture (`demo`: the demo model's 4-stage PlainConvUNet, about 1 M
parameters; `default`: nnU-Net's default 3d_fullres PlainConvUNet, 30.4 M), with seeded random
foundation weights (an adapter's size depends only on how many entries change, not on their values):
  1. For each method (dgst, random, static, norm, bias, full, lora) runs the project's own update
     machinery, exactly as the trainer does (`dgst.make_policy` + `MaskedStepper`, SGD momentum
     0.99 Nesterov, weight decay 3e-5, the method's default learning rate, gradient clipping 12,
     gamma 2, static warm-up 10), for N iterations on random CT-like input with random labels
     (cross-entropy on every deep-supervision output; batch 1; a small patch, since the share of
     entries that change does not depend on the patch). dgst and random use `--iterations`
     (their changed set grows with every iteration); the other methods change a set that is fixed
     after their first step (norm, bias, full, lora) or after the warm-up (static), so
     `--other-iterations` (2) and `--static-iterations` (12) give their final size. `--budget-seconds`
     stops a run early on a loaded machine; every row records the iterations actually run.
  2. Writes the checkpoint nnU-Net would store (checkpoint_dict, torch.save) and the site adapter
     (engine/store/adapters.write_adapter, which reads it back and checks the rebuild), and records both
     sizes and the share of weights that differ bitwise.
  3. For the dgst version: time of `install_adapter` into a store holding the base (reading,
     sha256 lookup, rebuild, checksum, writing and validating the new version), against
     `ModelStore.install` of the full results folder; and time to load the weights from the full
     checkpoint against loading the parent checkpoint + applying the delta (in place, with and
     without the checksum), medians of 3, side by side in one process.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from LymphNodeDGSTLib.adaptation import dgst
from LymphNodeDGSTLib.adaptation.dgst import lora as dgst_lora
from LymphNodeDGSTLib.adaptation.dgst import masked_step as dgst_step
from LymphNodeDGSTLib.adaptation.trainer import DEFAULT_LEARNING_RATES
from LymphNodeDGSTLib.adaptation.weight_stats import weight_change_summary
from LymphNodeDGSTLib.demo.demo_model import demo_spec
from LymphNodeDGSTLib.engine.store import architectures
from LymphNodeDGSTLib.engine.store.adapters import apply_adapter, read_adapter, write_adapter
from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
from LymphNodeDGSTLib.engine.store.state_dicts import snapshot_state

METHODS = ("dgst", "random", "static", "norm", "bias", "full", "lora")
SPECS = {"demo": demo_spec, "default": architectures.default_foundation_spec}
PATCHES = {"demo": (4, 16, 16), "default": (4, 64, 64)}  # about the smallest each network takes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--iterations", type=int, default=250, help="dgst and random")
    parser.add_argument("--other-iterations", type=int, default=2,
                        help="norm, bias, full, lora (their changed set is fixed after one step)")
    parser.add_argument("--static-iterations", type=int, default=12,
                        help="static (its selection is fixed after the 10-step warm-up)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="stop a method's run after this many seconds; the row records the "
                             "iterations reached")
    parser.add_argument("--json", help="write all rows here")
    return parser.parse_args(argv)


def loss_of(outputs, target: torch.Tensor) -> torch.Tensor:
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    loss = torch.zeros(())
    for output in outputs:
        steps = [t // o for t, o in zip(target.shape[1:], output.shape[2:])]
        loss = loss + nn.functional.cross_entropy(output, target[:, ::steps[0], ::steps[1], ::steps[2]])
    return loss


def adapt(plans: dict, dataset_json: dict, foundation: dict, method: str, iterations: int,
          patch: tuple[int, int, int], budget: float | None = None) -> tuple[dict, float, int]:
    network = architectures.build_network(plans, dataset_json, deep_supervision=True)
    network.load_state_dict(foundation)
    policy = dgst.make_policy(method, network, gamma=2, seed=0, warmup_steps=10)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=DEFAULT_LEARNING_RATES[method],
                                momentum=0.99, nesterov=True, weight_decay=3e-5)
    stepper = dgst_step.MaskedStepper(policy, max_grad_norm=12.0)
    generator = torch.Generator().manual_seed(1)
    started = time.perf_counter()
    done = 0
    for done in range(1, iterations + 1):
        image = torch.randn((1, 1, *patch), generator=generator)
        target = (torch.rand((1, *patch), generator=generator) > 0.9).long()
        optimizer.zero_grad(set_to_none=True)
        loss_of(network(image), target).backward()
        stepper.step(optimizer)
        if done % 10 == 0:
            print(f"  {method}: {done} iterations, {time.perf_counter() - started:.0f} s wall, "
                  f"{time.process_time():.0f} s CPU", file=sys.stderr, flush=True)
        if budget is not None and time.perf_counter() - started > budget:
            break
    seconds = time.perf_counter() - started
    weights = dgst_lora.merged_state_dict(network) if method == "lora" else snapshot_state(network.state_dict())
    return weights, seconds, done


def median_seconds(action, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def timings(work: Path, plans: dict, dataset_json: dict, foundation: dict, adapted: dict,
            adapter: Path) -> dict:
    from LymphNodeDGSTLib.engine.store.adapter_store import install_adapter
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    base_folder = architectures.write_results_folder(work / "base", plans, dataset_json, foundation)
    full_folder = architectures.write_results_folder(work / "full", plans, dataset_json, adapted)
    base_checkpoint = base_folder / "fold_0" / "checkpoint_final.pth"
    full_checkpoint = full_folder / "fold_0" / "checkpoint_final.pth"
    rows = {}
    load_full = lambda: load_checkpoint(full_checkpoint)["network_weights"]  # noqa: E731
    load_delta = lambda verify: apply_adapter(read_adapter(adapter),  # noqa: E731
                                              load_checkpoint(base_checkpoint)["network_weights"],
                                              verify=verify, in_place=True)
    load_full(), load_delta(False)  # warm the page cache for both
    rows["load_full_s"] = median_seconds(load_full)
    rows["load_delta_s"] = median_seconds(lambda: load_delta(False))
    rows["load_delta_verified_s"] = median_seconds(lambda: load_delta(True))
    rows["load_ratio"] = rows["load_delta_s"] / rows["load_full_s"]
    rows["load_verified_ratio"] = rows["load_delta_verified_s"] / rows["load_full_s"]

    installs, full_installs = [], []
    for attempt in range(1):
        store = ModelStore(work / f"store{attempt}")
        store.install(base_folder, name="base", show_progress=False)
        started = time.perf_counter()
        install_adapter(store, adapter)
        installs.append(time.perf_counter() - started)
        started = time.perf_counter()
        store.install(full_folder, name="copy", show_progress=False)
        full_installs.append(time.perf_counter() - started)
        shutil.rmtree(work / f"store{attempt}")
    rows["install_adapter_s"] = installs[0]
    rows["install_full_s"] = full_installs[0]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for arch in args.archs:
        spec = SPECS[arch]()
        plans, dataset_json = architectures.make_plans(spec), architectures.make_dataset_json(spec.labels)
        torch.manual_seed(0)
        foundation = snapshot_state(architectures.build_network(plans, dataset_json).state_dict())
        with tempfile.TemporaryDirectory(prefix="bench-adapter-") as temporary:
            work = Path(temporary)
            checkpoint = work / "checkpoint_final.pth"
            header = {"parent": {"name": "bench", "version": 1, "fold": "0"},
                      "result": {"name": "bench", "version": 2, "fold": "0", "configuration": "3d_fullres",
                                 "trainer_name": "nnUNetTrainer", "mirroring_axes": [0, 1, 2]},
                      "plans": plans, "dataset_json": dataset_json, "record": {}}
            for method in args.methods:
                iterations = (args.iterations if method in ("dgst", "random") else
                              args.static_iterations if method == "static" else args.other_iterations)
                adapted, seconds, iterations = adapt(plans, dataset_json, foundation, method, iterations,
                                                     PATCHES[arch], args.budget_seconds)
                torch.save(architectures.checkpoint_dict(adapted, plans, dataset_json), checkpoint)
                adapter = write_adapter(work / f"{method}.safetensors", foundation, adapted,
                                        {**header, "record": {"method": method}})
                change = weight_change_summary(foundation, adapted)["total"]
                changed, total = change["changed"], change["entries"]
                row = {"arch": arch, "parameters": total, "method": method, "iterations": iterations,
                       "train_seconds": round(seconds, 1), "changed_share": changed / total,
                       "checkpoint_bytes": checkpoint.stat().st_size,
                       "adapter_bytes": adapter.stat().st_size}
                row["adapter_share"] = row["adapter_bytes"] / row["checkpoint_bytes"]
                if method == "dgst":
                    row.update(timings(work, plans, dataset_json, foundation, adapted, adapter))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # on the shared, overloaded 2-core machine threads only stall
    sys.exit(main())

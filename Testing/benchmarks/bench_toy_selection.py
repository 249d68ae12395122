"""Toy comparison of the sparse selections where the convolutions must learn (seconds per run).

A random-weight tiny nnU-Net (Testing/dgst_helpers.py's) learns an edge label on smoothed noise
(dgst_helpers.edge_task): no per-channel affine gives it, so the convolutions must change.
Every method gets the product's optimiser (SGD momentum 0.99 Nesterov, weight decay 3e-5,
clipping 12, PolyLR) for STEPS steps; the held-out loss and foreground Dice are paired over seeds.

    PYTHONPATH=LymphNodeDGST:Testing python Testing/benchmarks/bench_toy_selection.py [--seeds 5]

Not a claim about CT: it isolates whether a selection lets the selected entries learn.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from LymphNodeDGSTLib.adaptation import dgst
from LymphNodeDGSTLib.adaptation.dgst import masked_step as dgst_step
from LymphNodeDGSTLib.demo.bench_paired import format_interval, mean_interval
from dgst_helpers import edge_task, segmentation_loss, tiny_unet

STEPS = 60
SPARSE = ("dgst", "dgst-ema", "dgst-split", "dgst-budget", "random")


def run(method: str, seed: int, selection_only: bool, lr: float, steps: int = STEPS) -> dict:
    network = tiny_unet(seed=seed)
    policy = dgst.make_policy(method, network, gamma=2, seed=seed, selection_only=selection_only)
    optimizer = torch.optim.SGD(policy.optimizer_groups(), lr=lr, momentum=0.99, nesterov=True,
                                weight_decay=3e-5)
    stepper = dgst_step.MaskedStepper(policy, max_grad_norm=12.0)
    train, test = edge_task(seed), edge_task(1000 + seed, n=2)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0) * (1 - step / steps) ** 0.9
        image, target = train[step % len(train)]
        optimizer.zero_grad(set_to_none=True)
        segmentation_loss(network(image), target).backward()
        stepper.step(optimizer)
    network.eval()
    with torch.no_grad():
        loss = float(sum(segmentation_loss(network(i), t) for i, t in test) / len(test))
        dice = []
        for image, target in test:
            output = network(image)
            predicted = (output[0] if isinstance(output, (list, tuple)) else output).argmax(1)
            overlap = float(((predicted == 1) & (target == 1)).sum())
            dice.append(2 * overlap / max(float((predicted == 1).sum() + (target == 1).sum()), 1.0))
    summary = stepper.summary()
    return {"method": method, "seed": seed, "selection_only": selection_only, "lr": lr, "loss": loss,
            "dice": sum(dice) / len(dice), "reselection": summary.get("sparse_reselection_rate"),
            "picks_per_entry": summary.get("sparse_picks_per_entry")}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for selection_only, methods in ((True, SPARSE), (False, ("norm",) + SPARSE)):
        for method in methods:
            for seed in range(args.seeds):
                rows.append(run(method, seed, selection_only, args.lr))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{STEPS} steps, lr {args.lr:g}, seeds 0-{args.seeds - 1}; paired over seeds, 95 % t-interval\n")
    print("| mode | method | loss | Dice | Dice vs random | Dice vs dgst | re-selected | picks/entry |")
    print("|---|---|---|---|---|---|---|---|")
    for selection_only in (True, False):
        mode = [r for r in rows if r["selection_only"] == selection_only]
        by = {(r["method"], r["seed"]): r for r in mode}
        for method in dict.fromkeys(r["method"] for r in mode):
            own = [by[(method, s)] for s in range(args.seeds)]

            def versus(reference: str) -> str:
                if reference == method:
                    return "-"
                return format_interval(*mean_interval(
                    [by[(method, s)]["dice"] - by[(reference, s)]["dice"] for s in range(args.seeds)]))

            def mean(key: str) -> str:
                values = [r[key] for r in own if r[key] is not None]
                return f"{sum(values) / len(values):.3f}" if values else "-"

            print(f"| {'selection-only' if selection_only else 'with norms/biases/head'} | {method} | "
                  f"{mean('loss')} | {mean('dice')} | {versus('random')} | {versus('dgst')} | "
                  f"{mean('reselection')} | {mean('picks_per_entry')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The adaptation report as a figure: training curves and before/after metrics per case."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def write_adaptation_figure(report: dict, path: Path) -> Path:
    """Loss and pseudo-Dice per epoch (left), held-out Dice before/after per case (right)."""
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    epochs = [e["epoch"] for e in report["epochs"]]
    curves.plot(epochs, [e["train_loss"] for e in report["epochs"]], "o-", label="train loss")
    curves.plot(epochs, [e["val_loss"] for e in report["epochs"]], "s--", label="pseudo-val loss")
    curves.set_xlabel("epoch")
    curves.set_ylabel("loss (Dice + CE)")
    dice_axis = curves.twinx()
    pseudo = [e["pseudo_dice"] for e in report["epochs"]]
    dice_axis.plot(epochs, [0 if math.isnan(p) else p for p in pseudo], "^-", color="tab:green",
                   label="pseudo Dice")
    dice_axis.set_ylim(0, 1)
    dice_axis.set_ylabel("pseudo Dice")
    handles = curves.get_legend_handles_labels()[0] + dice_axis.get_legend_handles_labels()[0]
    curves.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    curves.set_title(f"{report['method']} from {report['parent']}, {report['iterations']} iterations")

    cases = [c["case"] for c in report["per_case"]]
    positions = range(len(cases))
    width = 0.38
    bars.bar([p - width / 2 for p in positions], [c["before"]["dice"] for c in report["per_case"]],
             width, label=f"parent (mean {report['dice_before']:.3f})", color="tab:gray")
    bars.bar([p + width / 2 for p in positions], [c["after"]["dice"] for c in report["per_case"]],
             width, label=f"adapted (mean {report['dice_after']:.3f})", color="tab:blue")
    bars.set_xticks(list(positions), cases, rotation=30, ha="right", fontsize=8)
    bars.set_ylim(0, 1)
    bars.set_ylabel("Dice")
    where = "held-out cases" if report["evaluation_is_held_out"] else "training cases (too few to hold out)"
    bars.set_title(f"Dice on {where}")
    bars.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path

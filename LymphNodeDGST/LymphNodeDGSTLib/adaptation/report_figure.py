"""The adaptation report as a figure: training curves and before/after metrics per case."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def write_adaptation_figure(report: dict, path: Path) -> Path:
    """Loss and pseudo-Dice per epoch (left), held-out Dice before/after per case (right), and
    under the automatic schedule the held-out Dice of every check (middle)."""
    schedule = report.get("schedule") or {}
    automatic = schedule.get("kind") == "auto"
    figure, axes = plt.subplots(1, 3 if automatic else 2, figsize=(15 if automatic else 10, 4), dpi=100)
    curves, bars = axes[0], axes[-1]
    if automatic:
        _held_out_curve(axes[1], schedule)
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
    kept = (f"kept {report['iterations']} of {schedule['iterations_run']} iterations" if automatic
            else f"{report['iterations']} iterations")
    curves.set_title(f"{report['method']} from {report['parent']}, {kept}")

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


def _held_out_curve(axis, schedule: dict) -> None:
    """Held-out Dice per check of the training run, the kept checkpoint, the parent and probes."""
    curve = schedule.get("curve") or []
    axis.plot([c["iteration"] for c in curve], [c["dice"] for c in curve], "o-", color="tab:blue",
              label=f"training at lr {schedule['chosen_rate']:g}")
    axis.plot([schedule["best_iteration"]], [schedule["best_dice"]], "*", markersize=14,
              color="tab:orange", label=f"kept ({schedule['best_iteration']} iterations)")
    if schedule.get("reference_dice") is not None:
        axis.axhline(schedule["reference_dice"], color="tab:gray", linestyle="--", label="parent")
    probes = [p for p in schedule.get("probes") or [] if p.get("dice") is not None]
    if probes:
        axis.plot([schedule["probe_iterations"]] * len(probes), [p["dice"] for p in probes], "x",
                  color="tab:red", label="probes")
    if schedule.get("probes"):
        lines = [f"{p['rate']:g}: " + ("diverged" if p["dice"] is None else f"{p['dice']:.3f}")
                 + (" (chosen)" if p["rate"] == schedule["chosen_rate"] else "")
                 for p in schedule["probes"]]
        axis.text(0.98, 0.03, f"probes, Dice after {schedule['probe_iterations']} iterations\n"
                  + "\n".join(lines), transform=axis.transAxes, ha="right", va="bottom", fontsize=7,
                  bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "lightgray"})
    axis.set_ylim(0, 1)
    axis.set_xlabel("iteration")
    axis.set_ylabel("held-out Dice (schedule cases, fast)")
    axis.set_title(schedule.get("stop_text", ""), fontsize=8)
    axis.legend(fontsize=7, loc="lower left")

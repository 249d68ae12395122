"""One benchmark run in a fresh process: fine-tune with one method, evaluate, report a row
(`python -m LymphNodeDGSTLib.demo.bench_adapt.runs SPEC.json` is the child's entry point).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
import numpy as np

from LymphNodeDGSTLib.demo.bench_adapt.plan import CaseFile, RunSpec


def peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def execute_run(spec: RunSpec) -> dict:
    """Fine-tune (unless method is none) and evaluate; the row for runs.jsonl."""
    import SimpleITK as sitk
    import torch

    from LymphNodeDGSTLib.engine.store.architectures import read_json
    from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
    from LymphNodeDGSTLib.engine.segmentation.devices import choose_device
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
    from LymphNodeDGSTLib.adaptation.metrics import image_dice
    from LymphNodeDGSTLib.engine.store.results_folders import find_checkpoints
    from LymphNodeDGSTLib.adaptation.nnunet_dataset import TrainingCase, prepare_dataset
    from LymphNodeDGSTLib.adaptation.trainer import FineTuneSettings, fine_tune

    from LymphNodeDGSTLib.adaptation.weight_attribution import (ALWAYS_TRAINED_PARTS, change_shares,
                                                                with_parts_reset)

    device = choose_device(spec.device)
    foundation, work = Path(spec.foundation), Path(spec.work)
    attribution_folders: dict[str, Path] = {}
    row: dict = {"run_id": spec.run_id, "part": spec.part, "method": spec.method, "shots": spec.shots,
                 "seed": spec.seed, "train_cases": [c.case_id for c in spec.train], "device": str(device),
                 "seconds": 0.0, "seconds_per_iteration": None, "peak_rss_mb": None,
                 "rss_before_training_mb": None, "weights_changed_share": 0.0,
                 "entries_updated_per_step_mean": 0.0, "learning_rate": None, "iterations": 0}
    model_folder = foundation
    if spec.method != "none":
        checkpoint = load_checkpoint(next(iter(find_checkpoints(foundation).values())))
        configuration = checkpoint["init_args"]["configuration"]
        dataset = prepare_dataset([TrainingCase(c.case_id, Path(c.image), Path(c.label)) for c in spec.train],
                                  read_json(foundation / "plans.json"), read_json(foundation / "dataset.json"),
                                  configuration, work / "preprocessed")
        settings = FineTuneSettings(**spec.settings).validate()
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer  # noqa: F401  (its import is not fine-tuning time)
        row["rss_before_training_mb"] = round(peak_rss_mb(), 1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if spec.schedule_cases:
            result, row["schedule"] = fine_tune_automatically(spec, checkpoint, dataset, settings, device)
        else:
            result = fine_tune(checkpoint, dataset, work / "training", settings, device)
            row["schedule"] = {"kind": "fixed", "iterations": settings.iterations, "learning_rate": settings.lr}
        row["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if device.type == "cuda":
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        automatic = row["schedule"]["kind"] == "auto"
        seconds = row["schedule"]["seconds"] if automatic else result.seconds   # probes and checks count
        iterations = row["schedule"]["iterations_run"] if automatic else settings.iterations
        row.update(seconds=round(seconds, 2), seconds_per_iteration=round(result.seconds / max(iterations, 1), 3),
                   weights_changed_share=result.weight_change["total"]["share"],
                   entries_updated_per_step_mean=result.step_summary.get("entries_updated_per_step_mean"),
                   learning_rate=row["schedule"]["chosen_rate"] if automatic else settings.lr,
                   iterations=row["schedule"]["best_iteration"] if automatic else settings.iterations,
                   selection_only=settings.selection_only,
                   reselection_rate=result.step_summary.get("sparse_reselection_rate"),
                   picks_per_entry=result.step_summary.get("sparse_picks_per_entry"))
        model_folder = result.results_folder
        adapted = torch.load(model_folder / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                             weights_only=False)
        row["change_share"] = change_shares(checkpoint["network_weights"], adapted["network_weights"])
        if spec.attribution:
            variants = {"conv_reset": ("conv",), "always_reset": ALWAYS_TRAINED_PARTS}
            for name, parts in variants.items():
                folder = work / name
                shutil.copytree(model_folder, folder, dirs_exist_ok=True)
                torch.save({**adapted, "network_weights": with_parts_reset(
                    checkpoint["network_weights"], adapted["network_weights"], parts)},
                    folder / "fold_0" / "checkpoint_final.pth")
                attribution_folders[name] = folder

    started = time.perf_counter()
    segmenter = Segmenter.for_results_folder(model_folder, device=str(device), name="bench")
    row["dice"] = {}
    for name, cases in spec.evaluate.items():
        scores = []
        for case in cases:
            label = segmenter.segment(sitk.ReadImage(case.image), fast=True).label
            scores.append(round(image_dice(label, sitk.ReadImage(case.label)), 4))
        row["dice"][name] = scores
    target = next(iter(spec.evaluate))   # the first evaluation set is the run's target
    for name, folder in attribution_folders.items():
        variant = Segmenter.for_results_folder(folder, device=str(device), name=f"bench-{name}")
        row["dice"][f"{target}_{name}"] = [
            round(image_dice(variant.segment(sitk.ReadImage(case.image), fast=True).label,
                             sitk.ReadImage(case.label)), 4) for case in spec.evaluate[target]]
    row["eval_seconds"] = round(time.perf_counter() - started, 2)
    row["dice_mean"] = {name: float(np.mean(scores)) for name, scores in row["dice"].items()}
    return row


def _child_main(spec_path: str) -> int:
    data = json.loads(Path(spec_path).read_text())
    data["train"] = [CaseFile(**c) for c in data["train"]]
    data["evaluate"] = {name: [CaseFile(**c) for c in cases] for name, cases in data["evaluate"].items()}
    if data.get("schedule_cases") is not None:
        data["schedule_cases"] = [CaseFile(**c) for c in data["schedule_cases"]]
    spec = RunSpec(**data)
    row = execute_run(spec)
    Path(spec.result_path).write_text(json.dumps(row, indent=1))
    return 0


def fine_tune_automatically(spec: RunSpec, checkpoint: dict, dataset, settings, device) -> tuple:
    """The automatic schedule (its settings: the spec's, else the product's defaults) on the spec's
    schedule cases: the fine-tune result and the row's `schedule` record."""
    from LymphNodeDGSTLib.adaptation.auto_schedule import auto_fine_tune
    from LymphNodeDGSTLib.demo.bench_adapt.plan import auto_schedule
    from LymphNodeDGSTLib.engine.store.models import ModelVersion

    foundation = Path(spec.foundation)
    auto = auto_schedule(spec.auto_settings)
    result, record = auto_fine_tune(checkpoint, ModelVersion("foundation", 0, foundation, {}), dataset,
                                    Path(spec.work), settings, auto,
                                    [(c.case_id, Path(c.image), Path(c.label)) for c in spec.schedule_cases],
                                    device)
    schedule = {"kind": "auto", "schedule_cases": [c.case_id for c in spec.schedule_cases],
                "settings": auto.describe(),
                **{key: record[key] for key in ("chosen_rate", "probes", "curve", "iterations_run",
                                                "best_iteration", "best_dice", "stop_reason", "seconds")}}
    return result, schedule


def run_in_child(spec: RunSpec, timeout_s: float) -> dict:
    """Run one spec in a fresh interpreter; its row, or a row with status 'failed'."""
    work = Path(spec.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec_path, log_path, result_path = work / "spec.json", work.parent / f"{work.name}.log", Path(spec.result_path)
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    environment = dict(os.environ, nnUNet_n_proc_DA="0", PYTHONUNBUFFERED="1")
    # OpenMP threads that spin while they wait made a training step 4x slower whenever another
    # process shared the cores (measured: 3.6 s against 0.9 s per step on 2 busy cores).
    environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            completed = subprocess.run([sys.executable, "-m", "LymphNodeDGSTLib.demo.bench_adapt.runs", str(spec_path)],
                                       stdout=log, stderr=subprocess.STDOUT, env=environment, timeout=timeout_s)
            error = None if completed.returncode == 0 else f"exit status {completed.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:.0f} s"
    if error is None and result_path.is_file():
        row = json.loads(result_path.read_text())
        row["status"] = "ok"
    else:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        row = {"run_id": spec.run_id, "part": spec.part, "method": spec.method, "shots": spec.shots,
               "seed": spec.seed, "status": "failed", "error": error or "no result written",
               "log_tail": tail, "log": str(log_path)}
    row["process_seconds"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(work, ignore_errors=True)  # adapted checkpoints and preprocessed data: not kept
    return row


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))

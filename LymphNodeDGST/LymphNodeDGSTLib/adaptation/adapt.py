"""The adaptation pipeline: site cases -> fine-tuned model version, checked before it is used.

1. Check everything that can be checked before any training (`check_request`).
2. Split the case library: held-out cases for evaluation, the rest for training.
3. Preprocess the training cases with the foundation's own plans (no re-planning).
4. Fine-tune with the chosen method (`trainer.fine_tune`).
5. Segment the held-out cases with the parent and the adapted weights; Dice and HD95.
6. Publish the adapted weights as the next version of the model, with report and figure.
7. Activate it if it is no worse than its parent on the held-out cases (or as the user says).

Only step 6 and 7 touch the model store, each with one atomic rename: a worker killed at any
earlier moment leaves the store and the active version exactly as they were.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.adaptation.methods import DEFAULT_METHOD, SPARSE_METHODS
from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary, CaseRecord
from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
from LymphNodeDGSTLib.engine.segmentation.devices import choose_device
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.adaptation.metrics import case_metrics
from LymphNodeDGSTLib.engine.store.results_folders import find_checkpoints
from LymphNodeDGSTLib.engine.store.models import ModelStore, ModelVersion
from LymphNodeDGSTLib.adaptation.trainer import STATS_FILE, FineTuneSettings

REPORT_FILE = "adaptation_report.json"
FIGURE_FILE = "adaptation_report.png"
ACTIVATION_CHOICES = ("auto", "never", "force")
WORK_FOLDER = "work"


@dataclass
class AdaptRequest:
    """What `lndgst adapt` and the Slicer module ask for."""

    model: str | None = None
    method: str = DEFAULT_METHOD
    gamma: int = 2
    iterations: int = 250
    iterations_per_epoch: int = 50
    device: str = "auto"
    activation: str = "auto"        # auto: only if no worse than the parent; never; force
    learning_rate: float | None = None
    foundation_l2: float = 0.0
    seed: int = 0
    holdout: int | None = None      # held-out cases; None: a quarter, at least one from 3 cases
    evaluate_fast: bool = True      # held-out evaluation without mirroring (8x faster on CPU)
    nproc: int = 1                  # > 1: DDP training on this many processes (torchrun)
    selection_only: bool = False    # sparse methods: only the selected convolution entries move

    def settings(self) -> FineTuneSettings:
        return FineTuneSettings(method=self.method, gamma=self.gamma, iterations=self.iterations,
                                iterations_per_epoch=self.iterations_per_epoch,
                                learning_rate=self.learning_rate, foundation_l2=self.foundation_l2,
                                seed=self.seed, selection_only=self.selection_only).validate()


@dataclass
class CaseSplit:
    training: list[CaseRecord]
    evaluation: list[CaseRecord]
    held_out: bool                  # False: too few cases, evaluated on the training cases


def check_request(home: Home, request: AdaptRequest) -> tuple[ModelVersion, CaseSplit]:
    """Everything that can fail before training, as UserInputErrors (exit 2 on the command line)."""
    if request.activation not in ACTIVATION_CHOICES:
        raise UserInputError(f"activation must be one of {', '.join(ACTIVATION_CHOICES)}")
    request.settings()
    device = choose_device(request.device)
    from LymphNodeDGSTLib.adaptation.distributed import check_nproc
    check_nproc(request.nproc, str(device))
    parent = ModelStore(home.models).resolve(request.model)
    labels = parent.metadata.get("labels") or {}
    if len(labels) != 2:
        raise UserInputError(
            f"model {parent.ref} segments {len(labels) - 1} structures ({', '.join(labels)}); the "
            "case library holds one (lymph node vs background), so this model cannot be adapted "
            "with it")
    cases = CaseLibrary(home.cases).list()
    if not cases:
        raise UserInputError("the case library is empty; add corrected cases with "
                             "'lndgst cases add IMAGE LABEL' (or 'Save as training case' in Slicer)")
    return parent, split_cases(cases, request.holdout, request.seed)


def split_cases(cases: list[CaseRecord], holdout: int | None, seed: int) -> CaseSplit:
    """Hold out a quarter of the cases (at least one) when there are 3 or more."""
    if holdout is None:
        holdout = max(1, len(cases) // 4) if len(cases) >= 3 else 0
    if holdout < 0 or holdout >= len(cases):
        raise UserInputError(f"cannot hold out {holdout} of {len(cases)} cases: at least one "
                             "case must remain for training")
    shuffled = sorted(cases, key=lambda c: c.id)
    random.Random(seed).shuffle(shuffled)
    if holdout == 0:
        return CaseSplit(shuffled, shuffled, held_out=False)
    return CaseSplit(shuffled[holdout:], shuffled[:holdout], held_out=True)


class Reporter(Protocol):
    """What the pipeline needs from whoever runs it (the background worker provides it)."""

    job_folder: Path

    def progress(self, done: int, total: int, stage: str | None = None, **extra: Any) -> None: ...
    def metric(self, name: str, value: float, **extra: Any) -> None: ...
    def log(self, message: str) -> None: ...
    def cancelled(self) -> bool: ...
    def check_cancelled(self) -> None: ...


def run_adaptation(home: Home, request: AdaptRequest, reporter: Reporter, work_dir: Path) -> dict:
    """The whole pipeline; returns the summary that ends the job's `done` event."""
    from LymphNodeDGSTLib.adaptation.nnunet_dataset import TrainingCase, prepare_dataset
    from LymphNodeDGSTLib.adaptation.report_figure import write_adaptation_figure
    from LymphNodeDGSTLib.adaptation.trainer import fine_tune

    parent, split = check_request(home, request)
    settings = request.settings()
    device = choose_device(request.device)
    store = ModelStore(home.models)
    if not split.held_out:
        reporter.log(f"only {len(split.training)} case(s): no case can be held out, so the "
                     "evaluation uses the training cases (marked as such in the report)")
    reporter.log(f"adapting {parent.ref} with {settings.method} on {len(split.training)} case(s), "
                 f"evaluating on {len(split.evaluation)}, device {device}")

    from LymphNodeDGSTLib.engine.store.architectures import read_json
    plans = read_json(parent.path / "plans.json")
    dataset_json = read_json(parent.path / "dataset.json")
    fold, checkpoint_path = adaptation_fold(parent)
    foundation = load_checkpoint(checkpoint_path, trust=parent.metadata.get("trusted_checkpoint", False))
    configuration = foundation["init_args"]["configuration"]

    reporter.progress(0, len(split.training), stage="preprocess")
    dataset = prepare_dataset(
        [TrainingCase(c.id, c.image_path, c.label_path) for c in split.training], plans,
        dataset_json, configuration, work_dir / "preprocessed",
        progress=lambda done, total: (reporter.check_cancelled(),
                                      reporter.progress(done, total, stage="preprocess")))

    def on_iteration(done: int, total: int, loss: float) -> None:
        reporter.progress(done, total, stage="train", loss=round(loss, 5))

    def on_epoch(epoch: int, record: dict) -> None:
        reporter.metric("train_loss", record["train_loss"], epoch=epoch)
        reporter.metric("pseudo_dice", record["pseudo_dice"], epoch=epoch)

    if request.nproc > 1:
        from LymphNodeDGSTLib.adaptation.distributed import launch_fine_tune
        reporter.log(f"training on {request.nproc} processes (torchrun, nnU-Net's DDP path)")
        result = launch_fine_tune(checkpoint_path, parent.metadata.get("trusted_checkpoint", False),
                                  dataset, work_dir / "training", settings, str(device), request.nproc,
                                  on_iteration, on_epoch, should_stop=reporter.cancelled)
    else:
        result = fine_tune(foundation, dataset, work_dir / "training", settings, device,
                           on_iteration=on_iteration, on_epoch=on_epoch, should_stop=reporter.cancelled,
                           fold=fold)

    staged = ModelVersion(parent.name, 0, result.results_folder, {"labels": parent.metadata.get("labels")})
    evaluation = evaluate_versions(store, parent, staged, split.evaluation, device,
                                   request.evaluate_fast, reporter)
    before = float(np.mean([e["before"]["dice"] for e in evaluation]))
    after = float(np.mean([e["after"]["dice"] for e in evaluation]))
    reporter.metric("dice_before", before)
    reporter.metric("dice_after", after)

    report = {
        "parent": parent.ref,
        "parent_checkpoint_sha256": parent.metadata.get("checkpoint_sha256", {}).get(fold),
        "method": settings.method,
        "gamma": settings.gamma if settings.method in SPARSE_METHODS else None,
        "iterations": settings.iterations,
        "settings": asdict(settings),
        "device": str(device),
        "processes": request.nproc,
        "training_seconds": round(result.seconds, 2),
        "training_cases": [c.id for c in split.training],
        "evaluation_cases": [c.id for c in split.evaluation],
        "evaluation_is_held_out": split.held_out,
        "evaluation_mode": "fast (no mirroring)" if request.evaluate_fast else "accurate (mirroring)",
        "per_case": evaluation,
        "dice_before": before,
        "dice_after": after,
        "weights_changed_share": result.weight_change["total"]["share"],
        "entries_updated_per_iteration_mean": result.step_summary.get("entries_updated_per_step_mean"),
        "epochs": result.epochs,
    }
    (result.results_folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
    write_adaptation_figure(report, result.results_folder / FIGURE_FILE)
    reporter.check_cancelled()  # last moment a cancel can still stop publication

    version = store.add_version(
        parent.name, result.results_folder,
        {"kind": "adapted", "parent": parent.version, "parent_fold": fold, "method": settings.method,
         "gamma": report["gamma"], "iterations": settings.iterations, "device": str(device),
         "metrics": {"dice_before": before, "dice_after": after,
                     "evaluation_is_held_out": split.held_out},
         "trusted_checkpoint": parent.metadata.get("trusted_checkpoint", False)},
        activate_if_first=False, extra_files=(REPORT_FILE, FIGURE_FILE, STATS_FILE))
    activated = request.activation == "force" or (request.activation == "auto" and after >= before)
    if activated:
        store.activate(parent.name, version.version)
    reporter.log(f"published {version.ref}" + (" and activated it" if activated else
                                               " (not activated: " + _why_not(request, before, after) + ")"))
    shutil.rmtree(work_dir / "preprocessed", ignore_errors=True)
    return {"version": version.ref, "parent": parent.ref, "activated": activated,
            "dice_before": before, "dice_after": after, "evaluation_is_held_out": split.held_out,
            "report": str(version.path / REPORT_FILE), "figure": str(version.path / FIGURE_FILE)}


def adaptation_fold(parent: ModelVersion) -> tuple[str, Path]:
    """The fold a multi-fold model is adapted from: fold 0 if it has one, else its first.

    Only that fold is fine-tuned, and the new version holds only it (one network, no ensemble):
    fine-tuning every fold on the same few cases would cost k times the time and would not keep
    the folds' diversity, which came from their different training data.
    """
    checkpoints = find_checkpoints(parent.path)
    fold = "0" if "0" in checkpoints else sorted(checkpoints)[0]
    return fold, checkpoints[fold]


def _why_not(request: AdaptRequest, before: float, after: float) -> str:
    if request.activation == "never":
        return "--no-activate"
    return f"held-out Dice {after:.3f} is below the parent's {before:.3f}"


def evaluate_versions(store: ModelStore, parent: ModelVersion, adapted: ModelVersion,
                      cases: list[CaseRecord], device, fast: bool, reporter: Reporter) -> list[dict]:
    """Dice and HD95 of parent and adapted model on each case."""
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter

    segmenter = Segmenter(store, device=str(device))
    truths = {c.id: sitk.ReadImage(str(c.label_path)) for c in cases}
    results = {c.id: {"case": c.id} for c in cases}
    steps, done = 2 * len(cases), 0
    for key, version in (("before", parent), ("after", adapted)):
        for case in cases:
            reporter.check_cancelled()
            image = sitk.ReadImage(str(case.image_path))
            label = segmenter.segment(image, model=version, fast=fast).label
            truth = truths[case.id]
            results[case.id][key] = case_metrics(sitk.GetArrayViewFromImage(label) > 0,
                                                 sitk.GetArrayViewFromImage(truth) > 0,
                                                 list(truth.GetSpacing())[::-1])
            done += 1
            reporter.progress(done, steps, stage="evaluate")
    return [results[c.id] for c in cases]


def run_job(params: dict, reporter: Reporter) -> dict:
    """Entry point of the background worker for `adapt` jobs."""
    home = Home(Path(params["home"]))
    request = AdaptRequest(**params["request"])
    work_dir = Path(reporter.job_folder) / WORK_FOLDER
    try:
        return run_adaptation(home, request, reporter, work_dir)
    finally:
        # The work copy (preprocessed cases, checkpoints) is as large as the model: never kept,
        # whether the job ends in success, failure or a cancel.
        shutil.rmtree(work_dir, ignore_errors=True)


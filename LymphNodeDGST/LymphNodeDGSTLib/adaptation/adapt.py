"""The adaptation pipeline: site cases -> fine-tuned model version, checked before it is used.

1. Check everything that can be checked before any training (`check_request`).
2. Split the case library: held-out cases for evaluation, the rest for training. Under the
   automatic schedule the held-out cases are divided into schedule and gate cases (`gate`).
3. Preprocess the training cases with the foundation's own plans (no re-planning).
4. Fine-tune with the chosen method: the automatic schedule (`auto_schedule`: learning rate by
   probes, held-out checks, best checkpoint kept) or a fixed one (`trainer.fine_tune`).
5. Segment the gate cases with the parent and the adapted weights; Dice and HD95.
6. Publish the adapted weights as the next version of the model, with report and figure.
7. Activate it if the gate passes (or as the user says).

Only step 6 and 7 touch the model store, each with one atomic rename: a worker killed at any
earlier moment leaves the store and the active version exactly as they were.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.adaptation import schedule_messages as say
from LymphNodeDGSTLib.adaptation.gate import (GateCases, divide_held_out, gate_passes, gate_rule_text,
                                              why_not_activated)
from LymphNodeDGSTLib.adaptation.methods import DEFAULT_METHOD, SPARSE_METHODS
from LymphNodeDGSTLib.adaptation import schedule as schedule_rules
from LymphNodeDGSTLib.adaptation.schedule import (AUTO, AUTO_OPTIONS, FIXED_OPTIONS, AutoSchedule,
                                                  parse_budget, parse_rates, resolve_schedule)
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
    """What `lndgst adapt` and the Slicer module ask for.

    `schedule` None means `auto` unless a fixed-schedule number (iterations, learning_rate,
    iterations_per_epoch) is given; the rules and defaults are in `schedule`.
    """

    model: str | None = None
    method: str = DEFAULT_METHOD
    gamma: int = 2
    schedule: str | None = None     # auto (default) or fixed
    iterations: int | None = None   # fixed: default FIXED_ITERATIONS
    iterations_per_epoch: int | None = None  # fixed: iterations between pseudo-Dice checks
    learning_rate: float | None = None       # fixed: default per method
    budget: str | float | None = None        # auto: "20m", "90s" (or seconds)
    rates: list[float] | None = None         # auto: the learning-rate grid
    probe_iterations: int | None = None
    check_every: int | None = None
    patience: int | None = None
    max_iterations: int | None = None
    device: str = "auto"
    activation: str = "auto"        # auto: only if the gate passes; never; force
    foundation_l2: float = 0.0
    seed: int = 0
    holdout: int | None = None      # held-out cases; None: a quarter, at least one from 3 cases
    evaluate_fast: bool = True      # held-out evaluation without mirroring (8x faster on CPU)
    nproc: int = 1                  # > 1: DDP training on this many processes (torchrun)
    selection_only: bool = False    # sparse methods: only the selected convolution entries move

    def schedule_kind(self) -> str:
        """`auto` or `fixed`; a UserInputError for contradicting options."""
        given = [name for name in FIXED_OPTIONS + AUTO_OPTIONS if getattr(self, name) is not None]
        return resolve_schedule(self.schedule, given)

    def settings(self) -> FineTuneSettings:
        """The fixed schedule's settings (and the method's, for either schedule)."""
        return FineTuneSettings(method=self.method, gamma=self.gamma,
                                iterations=_or(self.iterations, schedule_rules.FIXED_ITERATIONS),
                                iterations_per_epoch=_or(self.iterations_per_epoch,
                                                         schedule_rules.FIXED_ITERATIONS_PER_EPOCH),
                                learning_rate=self.learning_rate, foundation_l2=self.foundation_l2,
                                seed=self.seed, selection_only=self.selection_only).validate()

    def auto_schedule(self) -> AutoSchedule:
        defaults = AutoSchedule()
        return AutoSchedule(
            rates=parse_rates(self.rates) or defaults.rates,
            probe_iterations=_or(self.probe_iterations, defaults.probe_iterations),
            check_every=_or(self.check_every, defaults.check_every),
            patience=_or(self.patience, defaults.patience),
            max_iterations=_or(self.max_iterations, defaults.max_iterations),
            budget_s=parse_budget(self.budget)).validate()


def _or(value, default):
    return default if value is None else value


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
    if request.schedule_kind() == AUTO:
        request.auto_schedule()
        if request.nproc > 1:
            raise UserInputError("the automatic schedule trains on one process: use --schedule "
                                 "fixed (with --iterations, --lr) for --nproc, or drop --nproc")
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

    parent, split = check_request(home, request)
    automatic = request.schedule_kind() == AUTO and split.held_out
    gate = divide_held_out(split.evaluation, automatic)
    device = choose_device(request.device)
    store = ModelStore(home.models)
    if not split.held_out:
        reporter.log(f"only {len(split.training)} case(s): no case can be held out, so the "
                     "evaluation uses the training cases (marked as such in the report)")
    fallback = None
    if request.schedule_kind() == AUTO and not split.held_out:
        fallback = say.fallback_text(len(split.training), request.settings().iterations,
                                     request.settings().lr)
        reporter.log(fallback)
    reporter.log(f"adapting {parent.ref} with {request.method} on {len(split.training)} case(s), "
                 f"evaluating on {len(gate.gate)}, device {device}")
    if automatic:
        reporter.log(f"automatic schedule chosen on {len(gate.schedule)} held-out case(s); "
                     f"gate: {gate_rule_text(gate)}")

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

    if automatic:
        result, schedule = _train_automatic(request, parent, gate, foundation, dataset, fold,
                                            work_dir, device, reporter)
    else:
        result, schedule = _train_fixed(request, parent, foundation, checkpoint_path, dataset, fold,
                                        work_dir, device, reporter, fallback)

    staged = ModelVersion(parent.name, 0, result.results_folder, {"labels": parent.metadata.get("labels")})
    evaluation = evaluate_versions(store, parent, staged, gate.gate, device,
                                   request.evaluate_fast, reporter)
    before = float(np.mean([e["before"]["dice"] for e in evaluation]))
    after = float(np.mean([e["after"]["dice"] for e in evaluation]))
    reporter.metric("dice_before", before)
    reporter.metric("dice_after", after)
    passed = gate_passes(before, after, gate.margin)
    gate_record = {**gate.describe(), "rule": gate_rule_text(gate), "passed": passed}

    settings = result.settings
    gamma = settings["gamma"] if settings["method"] in SPARSE_METHODS else None
    report = {
        "parent": parent.ref,
        "parent_checkpoint_sha256": parent.metadata.get("checkpoint_sha256", {}).get(fold),
        "method": settings["method"],
        "gamma": gamma,
        "iterations": schedule["published_iteration"],
        "learning_rate": schedule["learning_rate"],
        "schedule": schedule,
        "settings": settings,
        "device": str(device),
        "processes": request.nproc,
        # the automatic schedule's probes and checks count: they are what it costs
        "training_seconds": round(schedule.get("seconds", result.seconds), 2),
        "training_cases": [c.id for c in split.training],
        "evaluation_cases": [c.id for c in gate.gate],
        "evaluation_is_held_out": split.held_out,
        "evaluation_mode": "fast (no mirroring)" if request.evaluate_fast else "accurate (mirroring)",
        "gate": gate_record,
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
        {"kind": "adapted", "parent": parent.version, "parent_fold": fold, "method": settings["method"],
         "gamma": gamma, "iterations": schedule["published_iteration"],
         "learning_rate": schedule["learning_rate"], "schedule": schedule, "gate": gate_record,
         "device": str(device),
         # flat numbers only: `metrics` travels in site adapters, whose header allows no more
         "metrics": {"dice_before": before, "dice_after": after,
                     "evaluation_is_held_out": split.held_out, "gate_passed": passed,
                     "gate_margin": gate.margin},
         "trusted_checkpoint": parent.metadata.get("trusted_checkpoint", False)},
        activate_if_first=False, extra_files=(REPORT_FILE, FIGURE_FILE, STATS_FILE))
    activated = request.activation == "force" or (request.activation == "auto" and passed)
    if activated:
        store.activate(parent.name, version.version)
    reporter.log(f"published {version.ref}" + (" and activated it" if activated else
                                               " (not activated: " + _why_not(request, before, after, gate) + ")"))
    shutil.rmtree(work_dir / "preprocessed", ignore_errors=True)
    return {"version": version.ref, "parent": parent.ref, "activated": activated,
            "dice_before": before, "dice_after": after, "evaluation_is_held_out": split.held_out,
            "recommended": passed, "gate_margin": gate.margin, "schedule": schedule["kind"],
            "learning_rate": schedule["learning_rate"], "iterations": schedule["published_iteration"],
            "schedule_text": say.schedule_summary(schedule),
            "report": str(version.path / REPORT_FILE), "figure": str(version.path / FIGURE_FILE)}


def _train_fixed(request: AdaptRequest, parent: ModelVersion, foundation: dict, checkpoint_path: Path,
                 dataset, fold: str, work_dir: Path, device, reporter: Reporter,
                 fallback: str | None):
    """`fine_tune` (or its DDP launch) with the fixed schedule; its result and schedule record."""
    from LymphNodeDGSTLib.adaptation.trainer import fine_tune

    settings = request.settings()

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
    schedule = {"kind": "fixed", "reason": fallback and "too few cases to hold one out",
                "reason_text": fallback, "iterations": settings.iterations,
                "iterations_per_epoch": settings.iterations_per_epoch, "learning_rate": settings.lr,
                "published_iteration": settings.iterations, "stop_reason": say.STOP_FIXED,
                "stop_text": say.stop_text(say.STOP_FIXED)}
    return result, schedule


def _train_automatic(request: AdaptRequest, parent: ModelVersion, gate: GateCases, foundation: dict,
                     dataset, fold: str, work_dir: Path, device, reporter: Reporter):
    """The automatic schedule on the gate's schedule cases; its result and schedule record."""
    from LymphNodeDGSTLib.adaptation.auto_schedule import auto_fine_tune

    result, record = auto_fine_tune(foundation, parent, dataset, work_dir, request.settings(),
                                    request.auto_schedule(),
                                    [(c.id, c.image_path, c.label_path) for c in gate.schedule],
                                    device, reporter, fold)
    schedule = {**record, "schedule_cases": [c.id for c in gate.schedule],
                "learning_rate": record["chosen_rate"], "published_iteration": record["best_iteration"]}
    return result, schedule


def adaptation_fold(parent: ModelVersion) -> tuple[str, Path]:
    """The fold a multi-fold model is adapted from: fold 0 if it has one, else its first.

    Only that fold is fine-tuned, and the new version holds only it (one network, no ensemble):
    fine-tuning every fold on the same few cases would cost k times the time and would not keep
    the folds' diversity, which came from their different training data.
    """
    checkpoints = find_checkpoints(parent.path)
    fold = "0" if "0" in checkpoints else sorted(checkpoints)[0]
    return fold, checkpoints[fold]


def _why_not(request: AdaptRequest, before: float, after: float, gate: GateCases) -> str:
    if request.activation == "never":
        return "--no-activate"
    return why_not_activated(before, after, gate.margin)


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


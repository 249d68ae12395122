"""The adaptation benchmark: DGST against every comparison method, on phantoms and real labels.

Protocol (one for all methods; docs/benchmarks.md gives the reasons):
- Foundation: the bundled demo model (a 4-stage PlainConvUNet trained on site-A phantoms).
- Part 1, phantom domain shift. Per seed, a pool of site-B phantoms is drawn (seed s: phantoms
  2000 + 100 s, 2000 + 100 s + 1, ...); shot count k adapts on the first k of them (nested:
  1 shot is in 3, 3 are in 5), and the seed is also the training seed. Every adapted model is
  tested on the same unseen site-B phantoms (3000, 3001, ...) and, for forgetting, on unseen
  site-A phantoms (6000, 6001, ...). "none" is the unadapted model, tested once.
- Part 2, real labels. The soft-tissue-sarcoma CTs of ../shared/data/sts: adapt on a fixed five
  (STS_TRAIN), test on the other five (STS_TEST); the site-A phantoms again measure forgetting.
- Every method gets the same iterations (one epoch, nnU-Net's PolyLR per iteration, SGD 0.99
  Nesterov, deep supervision, batch and patch of the foundation's plans) and the same learning
  rate (default 1e-2; `learning_rate=None` gives each method its authors' rate instead).
- Each run (fine-tune, then evaluation) is a fresh Python process: its peak RSS, read with
  getrusage right after fine-tuning, is the fine-tune's own peak (augmentation runs in-process,
  nnUNet_n_proc_DA=0), never one inherited from an earlier run. Evaluation is nnU-Net's sliding
  window without mirroring (`segment --fast`).
- Each finished run is appended to runs.jsonl at once, so an interrupted benchmark keeps what it
  measured (and `resume` skips it next time); tables, figure and results.json come at the end.

The child process entry point is `python -m LymphNodeDGSTLib.demo.bench_adapt RUN_SPEC.json`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from LymphNodeDGSTLib.errors import UserInputError

METHODS = ("none", "full", "bias", "norm", "lora", "random", "static", "dgst",
           "dgst-ema", "dgst-split", "dgst-budget")
SPARSE = ("random", "static", "dgst", "dgst-ema", "dgst-split", "dgst-budget")
SHIFTS = ("B", "C")           # phantom site adapted to: B (scanner + contrast), C (the harder shift)
TUNE_POOL_SEED = 7000         # + j: the held-out training-site cases learning rates are tuned on
VALIDATION_SEED = 4000        # + i: held-out training-site phantoms that score each tuning run
SITE_B_POOL_SEED = 2000       # + 100 * seed + j: the site-B cases seed `seed` adapts on
SITE_B_POOL_STRIDE = 100
SITE_B_TEST_SEED = 3000       # unseen site-B test phantoms (the same for every run)
SITE_A_TEST_SEED = 6000       # unseen site-A phantoms: forgetting (demo model: 1000.. and 5000..)
STS_TRAIN = ("STS_002", "STS_008", "STS_012", "STS_019", "STS_024")  # the first five, sorted
STS_TEST = ("STS_025", "STS_032", "STS_035", "STS_041", "STS_042")
RUNS_FILE = "runs.jsonl"
CONFIG_FILE = "config.json"
TABLE_FILE = "results.md"
RESULTS_FILE = "results.json"
FIGURE_FILE = "bench_adapt.png"
PHANTOM_TARGET, STS_TARGET = "siteB", "sts"   # PHANTOM_TARGET: the default shift's name


def phantom_target(shift: str) -> str:
    return f"site{shift}"

Say = Callable[[str], None]


@dataclass
class BenchConfig:
    """What to run. The defaults are sized for about an hour on a quiet 2-core CPU (estimated from
    the per-run costs measured in docs/benchmarks.md, whose table used 50 iterations and 3 + 2
    test phantoms: about 80 minutes there)."""

    methods: tuple[str, ...] = METHODS
    shots: tuple[int, ...] = (1, 3, 5)
    seeds: int = 2
    iterations: int = 40
    learning_rate: float | None = 1e-2   # None: each method's authors' rate (trainer.DEFAULT_LEARNING_RATES)
    gamma: int = 2
    site_b_tests: int = 2
    site_a_tests: int = 1
    phantoms: bool = True                # part 1 (False: only the real-label part)
    sts: bool = True
    sts_folder: str | None = None        # None: $LNDGST_SHARED_DATA/sts or ../shared/data/sts
    sts_train_cases: int = len(STS_TRAIN)
    sts_test_cases: int = len(STS_TEST)
    crop_zyx: tuple[int, int, int] | None = None   # centre-crop every image (smoke runs only)
    device: str = "cpu"
    run_timeout_s: float = 1800.0
    shift: str = "B"                     # phantom site to adapt to (SHIFTS)
    selection_only: bool = False         # sparse methods: freeze norms, biases and head
    attribution: bool = False            # sparse methods: Dice with conv / always-trained changes undone
    tune_lrs: tuple[float, ...] = ()     # per method, pick the best of these on validation phantoms
    tune_shots: int = 3                  # training-site cases each tuning run adapts on
    validation_cases: int = 2            # held-out training-site phantoms scoring a tuning run

    def validate(self) -> "BenchConfig":
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise UserInputError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                                 f"choose from {', '.join(METHODS)}")
        if not self.shots or min(self.shots) < 1:
            raise UserInputError("--shots: give one or more shot counts >= 1")
        if max(self.shots) >= SITE_B_POOL_STRIDE:
            raise UserInputError(f"--shots: at most {SITE_B_POOL_STRIDE - 1} cases per seed")
        for name in ("seeds", "iterations", "gamma", "site_b_tests", "site_a_tests"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name.replace('_', '-')} must be at least 1")
        if not 1 <= self.sts_train_cases <= len(STS_TRAIN) or not 1 <= self.sts_test_cases <= len(STS_TEST):
            raise UserInputError(f"STS: 1 to {len(STS_TRAIN)} training and test cases")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise UserInputError("--lr must be positive")
        if self.shift not in SHIFTS:
            raise UserInputError(f"--shift: choose one of {', '.join(SHIFTS)}, not {self.shift!r}")
        if any(lr <= 0 for lr in self.tune_lrs):
            raise UserInputError("--tune-lr: learning rates must be positive")
        if self.tune_shots < 1 or self.validation_cases < 1:
            raise UserInputError("tuning needs at least one training and one validation case")
        if self.selection_only and not any(m in SPARSE for m in self.methods):
            raise UserInputError(f"--selection-only needs a sparse method among --methods ({', '.join(SPARSE)})")
        return self

    def learning_rate_wording(self) -> str:
        if self.tune_lrs:
            return ("per method, the best of " + ", ".join(f"{lr:g}" for lr in self.tune_lrs)
                    + f" on {self.validation_cases} held-out site-{self.shift} validation phantoms")
        if self.learning_rate is None:
            return "each method's authors' rate"
        return f"{self.learning_rate:g} for every method"

    @property
    def adapting_methods(self) -> list[str]:
        return [m for m in self.methods if m != "none"]


def smoke_config() -> BenchConfig:
    """Tiny: two methods, one shot value, one seed, four iterations, cropped images (< 90 s)."""
    return BenchConfig(methods=("none", "dgst"), shots=(1,), seeds=1, iterations=4,
                       site_b_tests=1, site_a_tests=1, sts_train_cases=1, sts_test_cases=1,
                       crop_zyx=(24, 80, 80))


@dataclass
class CaseFile:
    case_id: str
    image: str
    label: str


@dataclass
class RunSpec:
    """One run, as the child process receives it."""

    run_id: str
    part: str                        # "phantom" or "sts"
    method: str
    shots: int
    seed: int
    foundation: str                  # results folder of the foundation model
    train: list[CaseFile]
    evaluate: dict[str, list[CaseFile]]
    settings: dict                   # FineTuneSettings fields
    work: str
    result_path: str
    device: str = "cpu"
    attribution: bool = False        # also Dice with conv / always-trained changes undone


@dataclass
class BenchOutputs:
    output: Path
    rows: list[dict]
    table: Path
    figure: Path | None
    results: Path
    sts_skipped: str | None = None
    failed: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Data

def shared_data_folder() -> Path:
    """$LNDGST_SHARED_DATA, else ../shared/data beside the repository."""
    explicit = os.environ.get("LNDGST_SHARED_DATA")
    if explicit:
        return Path(explicit)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def sts_cases(config: BenchConfig) -> tuple[list[CaseFile], list[CaseFile]] | str:
    """The fixed STS split (training, test), or the reason it cannot be used."""
    folder = Path(config.sts_folder) if config.sts_folder else shared_data_folder() / "sts"
    train_ids, test_ids = STS_TRAIN[:config.sts_train_cases], STS_TEST[:config.sts_test_cases]
    missing = [case for case in train_ids + test_ids
               if not (folder / case / "image.nii.gz").is_file() or not (folder / case / "label.nii.gz").is_file()]
    if missing:
        return f"real-label part skipped: {folder} lacks {', '.join(missing)} (image.nii.gz + label.nii.gz)"

    def files(ids: Iterable[str]) -> list[CaseFile]:
        return [CaseFile(case, str(folder / case / "image.nii.gz"), str(folder / case / "label.nii.gz"))
                for case in ids]

    return files(train_ids), files(test_ids)


def cropped(image, crop_zyx: tuple[int, int, int] | None):
    """Centre crop (SimpleITK image) to at most crop_zyx voxels; the image itself when None."""
    if crop_zyx is None:
        return image
    size = image.GetSize()
    want = [min(s, c) for s, c in zip(size, crop_zyx[::-1])]
    start = [(s - w) // 2 for s, w in zip(size, want)]
    return image[start[0]:start[0] + want[0], start[1]:start[1] + want[1], start[2]:start[2] + want[2]]


def write_phantom_case(folder: Path, site: str, seed: int, crop_zyx) -> CaseFile:
    """Generate (once) and write one phantom as a NIfTI pair."""
    import SimpleITK as sitk

    from LymphNodeDGSTLib.demo.phantom import generate_phantom

    case_id = f"site{site}_{seed:05d}"
    image_path, label_path = folder / f"{case_id}_ct.nii.gz", folder / f"{case_id}_label.nii.gz"
    if not (image_path.is_file() and label_path.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        phantom = generate_phantom(site, seed)
        sitk.WriteImage(cropped(phantom.label, crop_zyx), str(label_path), True)
        sitk.WriteImage(cropped(phantom.image, crop_zyx), str(image_path), True)
    return CaseFile(case_id, str(image_path), str(label_path))


def crop_case(case: CaseFile, folder: Path, crop_zyx) -> CaseFile:
    """A cropped copy of a real case (smoke runs); the case itself when no crop is asked."""
    if crop_zyx is None:
        return case
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    image_path, label_path = folder / f"{case.case_id}_ct.nii.gz", folder / f"{case.case_id}_label.nii.gz"
    sitk.WriteImage(cropped(sitk.ReadImage(case.image), crop_zyx), str(image_path), True)
    sitk.WriteImage(cropped(sitk.ReadImage(case.label), crop_zyx), str(label_path), True)
    return CaseFile(case.case_id, str(image_path), str(label_path))


# --------------------------------------------------------------------------------------------
# Planning

def run_settings(config: BenchConfig, method: str, seed: int, learning_rate: float | None) -> dict:
    """FineTuneSettings fields of one run (selection-only applies to the sparse methods)."""
    return {"method": method, "gamma": config.gamma, "iterations": config.iterations,
            "iterations_per_epoch": config.iterations, "val_iterations_per_epoch": 1,
            "learning_rate": learning_rate, "seed": seed,
            "selection_only": config.selection_only and method in SPARSE}


def run_suffix(config: BenchConfig, method: str) -> str:
    """Run-id infix naming the shift (when not B) and selection-only."""
    return ((f"-site{config.shift}" if config.shift != "B" else "")
            + ("-sel" if config.selection_only and method in SPARSE else ""))


def plan_tuning(config: BenchConfig, foundation: Path, work: Path) -> list[RunSpec]:
    """One run per (adapting method, learning rate): adapt on held-out training-site cases
    (TUNE_POOL_SEED ..), score on validation phantoms (VALIDATION_SEED ..), never on test cases."""
    phantoms = work / "phantoms"
    train = [write_phantom_case(phantoms, config.shift, TUNE_POOL_SEED + j, config.crop_zyx)
             for j in range(config.tune_shots)]
    validation = [write_phantom_case(phantoms, config.shift, VALIDATION_SEED + i, config.crop_zyx)
                  for i in range(config.validation_cases)]
    specs = []
    for method in config.adapting_methods:
        for lr in config.tune_lrs:
            run_id = f"tune{run_suffix(config, method)}-{method}-lr{lr:g}"
            specs.append(RunSpec(run_id, "tune", method, config.tune_shots, 0, str(foundation), train,
                                 {"validation": validation}, run_settings(config, method, 0, lr),
                                 str(work / "runs" / run_id), str(work / "runs" / f"{run_id}.result.json"),
                                 config.device))
    return specs


def chosen_learning_rates(rows: list[dict]) -> dict[str, float]:
    """Per method, the tuning learning rate with the best mean validation Dice (ties: smaller lr)."""
    best: dict[str, tuple[float, float]] = {}
    for row in rows:
        if row.get("part") != "tune" or row.get("status") != "ok":
            continue
        score, lr = row["dice_mean"]["validation"], row["learning_rate"]
        current = best.get(row["method"])
        if current is None or score > current[0] or (score == current[0] and lr < current[1]):
            best[row["method"]] = (score, lr)
    return {method: lr for method, (_, lr) in best.items()}


def plan_runs(config: BenchConfig, foundation: Path, work: Path,
              sts: tuple[list[CaseFile], list[CaseFile]] | None, say: Say,
              learning_rates: dict[str, float] | None = None) -> list[RunSpec]:
    """Every run, in an order that leaves every part measured if the benchmark is cut short:
    the unadapted baselines, all of seed 0, the real-label part, then the other seeds.
    `learning_rates` (from tuning) overrides the configured rate per method."""
    phantoms = work / "phantoms"
    say(f"writing phantoms to {phantoms}")
    shift = config.shift
    site_b_tests = [write_phantom_case(phantoms, shift, SITE_B_TEST_SEED + i, config.crop_zyx)
                    for i in range(config.site_b_tests)]
    site_a_tests = [write_phantom_case(phantoms, "A", SITE_A_TEST_SEED + i, config.crop_zyx)
                    for i in range(config.site_a_tests)]
    seeds = range(config.seeds) if config.phantoms else range(0)
    pools = {seed: [write_phantom_case(phantoms, shift, SITE_B_POOL_SEED + SITE_B_POOL_STRIDE * seed + j,
                                       config.crop_zyx) for j in range(max(config.shots))]
             for seed in seeds}
    learning_rates = learning_rates or {}

    def spec(part: str, method: str, shots: int, seed: int, train: list[CaseFile],
             evaluate: dict[str, list[CaseFile]]) -> RunSpec:
        run_id = f"{part}{run_suffix(config, method)}-{method}-k{shots}-s{seed}"
        settings = run_settings(config, method, seed, learning_rates.get(method, config.learning_rate))
        return RunSpec(run_id, part, method, shots, seed, str(foundation), train, evaluate, settings,
                       str(work / "runs" / run_id), str(work / "runs" / f"{run_id}.result.json"),
                       config.device, attribution=config.attribution and method in SPARSE)

    phantom_eval = {phantom_target(shift): site_b_tests, "siteA": site_a_tests}
    sts_eval = {STS_TARGET: sts[1], "siteA": site_a_tests} if sts else {}
    baselines, seed_runs, sts_runs = [], {seed: [] for seed in range(config.seeds)}, []
    if "none" in config.methods:
        if config.phantoms:
            baselines.append(spec("phantom", "none", 0, 0, [], phantom_eval))
        if sts:
            baselines.append(spec("sts", "none", 0, 0, [], sts_eval))
    for seed in seeds:
        for shots in config.shots:
            for method in config.adapting_methods:
                seed_runs[seed].append(spec("phantom", method, shots, seed, pools[seed][:shots], phantom_eval))
    if sts:
        for method in config.adapting_methods:
            sts_runs.append(spec("sts", method, len(sts[0]), 0, sts[0], sts_eval))
    first, *others = [seed_runs[seed] for seed in seeds] or [[]]
    return baselines + first + sts_runs + [run for runs in others for run in runs]


# --------------------------------------------------------------------------------------------
# The child: one fine-tune and its evaluation, in a fresh process

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
        result = fine_tune(checkpoint, dataset, work / "training", settings, device)
        row["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if device.type == "cuda":
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        row.update(seconds=round(result.seconds, 2), seconds_per_iteration=round(result.seconds / settings.iterations, 3),
                   weights_changed_share=result.weight_change["total"]["share"],
                   entries_updated_per_step_mean=result.step_summary.get("entries_updated_per_step_mean"),
                   learning_rate=settings.lr, iterations=settings.iterations,
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
    spec = RunSpec(**data)
    row = execute_run(spec)
    Path(spec.result_path).write_text(json.dumps(row, indent=1))
    return 0


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
            completed = subprocess.run([sys.executable, "-m", "LymphNodeDGSTLib.demo.bench_adapt", str(spec_path)],
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


# --------------------------------------------------------------------------------------------
# The parent: the whole benchmark

def benchmark_foundation() -> Path:
    """The shipped demo model zip every benchmark adapts; a usage error when it is missing."""
    from LymphNodeDGSTLib.demo.demo_model import locate_demo_model

    archive = locate_demo_model()
    if archive is None:
        raise UserInputError("the demo model is missing (LymphNodeDGST/Resources/DemoModel/lymphnode-demo.zip)")
    return archive


def same_settings(stored: dict, wanted: dict, extensible: tuple[str, ...] = ()) -> bool:
    """True when two config documents' "config" entries agree, keys in `extensible` aside (settings
    that only add or drop runs, so a resumed benchmark may change them)."""
    def measured(document: dict) -> dict:
        return {key: value for key, value in (document.get("config") or {}).items() if key not in extensible}
    return measured(stored) == measured(json.loads(json.dumps(wanted)))


def open_output(output: Path, document: dict, resume: bool, extensible: tuple[str, ...] = ()) -> Path:
    """Make `output` ready for a benchmark described by `document`: when resuming, refuse a folder
    measured with other settings and keep its runs; else start runs.jsonl afresh. Writes
    config.json; returns the path of runs.jsonl."""
    runs_path = output / RUNS_FILE
    if resume and (output / CONFIG_FILE).is_file():
        if not same_settings(json.loads((output / CONFIG_FILE).read_text()), document, extensible):
            raise UserInputError(f"--resume: {output} holds a benchmark with other settings; "
                                 "use another --output or drop --resume")
    elif runs_path.exists():
        runs_path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    (output / CONFIG_FILE).write_text(json.dumps(document, indent=1))
    return runs_path


def run_benchmark(config: BenchConfig, output: Path, resume: bool = False, say: Say = print) -> BenchOutputs:
    """Run every planned run (skipping those already in runs.jsonl when resuming); write
    results.md, results.json and the figure into `output`."""
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    config.validate()
    archive = benchmark_foundation()
    output = Path(output).resolve()
    work = output / "work"
    runs_path = open_output(output, {"config": asdict(config), "foundation": str(archive)}, resume)

    started = time.perf_counter()
    store_root = work / "store"
    shutil.rmtree(store_root, ignore_errors=True)
    foundation = ModelStore(store_root).install(archive, name="foundation", show_progress=False).path
    sts = None
    sts_skipped = None
    if config.sts:
        found = sts_cases(config)
        if isinstance(found, str):
            sts_skipped = found
            say(found)
        else:
            sts = ([crop_case(c, work / "sts", config.crop_zyx) for c in found[0]],
                   [crop_case(c, work / "sts", config.crop_zyx) for c in found[1]])
            say(f"real labels: adapting on {', '.join(c.case_id for c in sts[0])}; "
                f"testing on {', '.join(c.case_id for c in sts[1])}")
    else:
        sts_skipped = "real-label part skipped (--skip-sts)"
    done = {row["run_id"]: row for row in read_rows(runs_path) if row.get("status") == "ok"} if resume else {}
    tuning_rows: list[dict] = []
    learning_rates = None
    if config.tune_lrs and config.phantoms:
        tuning = plan_tuning(config, foundation, work)
        say(f"tuning: {len(tuning)} runs on held-out site-{config.shift} cases")
        tuning_rows = _run_specs(tuning, done, config, runs_path, started, say)
        learning_rates = chosen_learning_rates(tuning_rows)
        say("chosen learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in learning_rates.items()))
    plan = plan_runs(config, foundation, work, sts, say, learning_rates)
    rows = tuning_rows + _run_specs(plan, done, config, runs_path, started, say)

    outputs = write_reports(rows, config, output, sts_skipped, learning_rates)
    say(f"wrote {outputs.table}, {outputs.results}" + (f", {outputs.figure}" if outputs.figure else "")
        + f" ({_minutes(time.perf_counter() - started)} in all)")
    return outputs


def report_from_runs(output: Path) -> BenchOutputs:
    """Write results.md, results.json and the figure from the runs already in OUTPUT/runs.jsonl
    (an interrupted or cut-short benchmark); the tables say which runs exist."""
    output = Path(output).resolve()
    if not (output / CONFIG_FILE).is_file() or not (output / RUNS_FILE).is_file():
        raise UserInputError(f"--report-only: {output} holds no benchmark (config.json and runs.jsonl)")
    stored = json.loads((output / CONFIG_FILE).read_text())["config"]
    stored = {key: tuple(value) if isinstance(value, list) else value for key, value in stored.items()}
    config = BenchConfig(**stored)
    rows = read_rows(output / RUNS_FILE)
    learning_rates = chosen_learning_rates(rows) if config.tune_lrs else None
    skipped = None if config.sts else "real-label part skipped (--skip-sts)"
    return write_reports(rows, config, output, skipped, learning_rates)


def _run_specs(plan: list[RunSpec], done: dict[str, dict], config: BenchConfig, runs_path: Path,
               started: float, say: Say) -> list[dict]:
    """Run what is not already done; every row in plan order (done ones reused)."""
    rows = [done[spec.run_id] for spec in plan if spec.run_id in done]
    todo = [spec for spec in plan if spec.run_id not in done]
    say(f"{len(plan)} runs ({len(plan) - len(todo)} already measured), {config.iterations} iterations each, "
        f"learning rate {config.learning_rate_wording()}, "
        f"device {config.device}; rows go to {runs_path}")
    measured_seconds: list[float] = []
    for index, spec in enumerate(todo, 1):
        row = run_in_child(spec, config.run_timeout_s)
        with open(runs_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows.append(row)
        if spec.method != "none":
            measured_seconds.append(row["process_seconds"])
        remaining = sum(1 for s in todo[index:] if s.method != "none")
        eta = remaining * float(np.mean(measured_seconds)) if measured_seconds else 0.0
        say(f"[{index}/{len(todo)}] {describe_row(row)} | elapsed {_minutes(time.perf_counter() - started)}, "
            f"about {_minutes(eta)} left")
    return rows


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
    return rows


def describe_row(row: dict) -> str:
    what = f"{row['part']} {row['method']} shots={row['shots']} seed={row['seed']}"
    if row.get("status") != "ok":
        return f"{what}: FAILED ({row.get('error')}); see {row.get('log')}"
    dice = ", ".join(f"{name} Dice {value:.3f}" for name, value in row["dice_mean"].items())
    if row["method"] == "none":
        return f"{what}: {dice}"
    return (f"{what}: {dice}; {100 * row['weights_changed_share']:.2f} % of weights changed, "
            f"{row['seconds']:.0f} s, peak {row['peak_rss_mb']:.0f} MB")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


# --------------------------------------------------------------------------------------------
# Reports

def summarise(rows: list[dict], part: str, target: str) -> list[dict]:
    """One row per (method, shots): means over runs, and two spreads of the target Dice: over
    runs (seeds) and over test cases (pooled)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        if row.get("part") == part and row.get("status") == "ok":
            groups.setdefault((row["method"], row["shots"]), []).append(row)
    order = {method: index for index, method in enumerate(METHODS)}
    summary = []
    for (method, shots), group in sorted(groups.items(), key=lambda item: (item[0][1], order[item[0][0]])):
        means = [r["dice_mean"][target] for r in group]
        cases = [d for r in group for d in r["dice"][target]]
        adapted = method != "none"
        summary.append({
            "method": method,
            "shots": shots,
            "runs": len(group),
            f"dice_{target}_mean": float(np.mean(means)),
            f"dice_{target}_std": float(np.std(means, ddof=1)) if len(means) > 1 else float("nan"),
            f"dice_{target}_case_std": float(np.std(cases)),
            "dice_siteA_mean": float(np.mean([r["dice_mean"]["siteA"] for r in group])),
            "weights_changed_share": float(np.mean([r["weights_changed_share"] for r in group])),
            "seconds": float(np.mean([r["seconds"] for r in group])) if adapted else 0.0,
            "peak_rss_mb": float(np.mean([r["peak_rss_mb"] for r in group])) if adapted else float("nan"),
        })
    return summary


def table_columns(target: str) -> list[str]:
    return ["method", "shots", "runs", f"dice_{target}_mean", f"dice_{target}_std", f"dice_{target}_case_std",
            "dice_siteA_mean", "weights_changed_share", "seconds", "peak_rss_mb"]


def markdown_table(summary: list[dict], target: str) -> str:
    columns = table_columns(target)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in summary:
        lines.append("| " + " | ".join(_cell(column, row[column]) for column in columns) + " |")
    return "\n".join(lines)


def _cell(column: str, value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if column == "weights_changed_share":
        return f"{100 * value:.3g} %"
    if column == "seconds":
        return f"{value:.1f}"
    if column == "peak_rss_mb":
        return f"{value:.0f}"
    if column.startswith("dice"):
        return f"{value:.3f}"
    return str(value)


PAIRED_REFERENCES = ("norm", "random", "dgst")


def paired_table(rows: list[dict], part: str, target: str) -> str:
    """Per adapting method and shot count: paired Dice differences against norm, random and dgst
    (mean [95 % interval] over seeds x test cases), and the site-A Dice kept relative to none."""
    from LymphNodeDGSTLib.demo.bench_paired import format_interval, mean_interval, paired_differences

    ok = [r for r in rows if r.get("part") == part and r.get("status") == "ok"]
    baseline = [r["dice_mean"]["siteA"] for r in ok if r["method"] == "none" and "siteA" in r["dice_mean"]]
    present = {r["method"] for r in ok}
    references = [m for m in PAIRED_REFERENCES if m in present]
    lines = ["| method | shots | pairs | " + " | ".join(f"vs {m}" for m in references) + " | siteA kept |",
             "|---|---|---|" + "---|" * len(references) + "---|"]
    for shots in sorted({r["shots"] for r in ok if r["method"] != "none"}):
        for method in [m for m in METHODS if m in present and m != "none"]:
            group = [r for r in ok if r["method"] == method and r["shots"] == shots]
            if not group:
                continue
            cells = []
            pairs = 0
            for reference in references:
                differences = [] if reference == method else paired_differences(ok, part, target, method,
                                                                                 reference, shots)
                pairs = max(pairs, len(differences))
                cells.append(format_interval(*mean_interval(differences)) if differences else "-")
            kept = (float(np.mean([r["dice_mean"]["siteA"] for r in group])) / baseline[0]
                    if baseline and baseline[0] > 0 else float("nan"))
            lines.append(f"| {method} | {shots} | {pairs} | " + " | ".join(cells)
                         + f" | {'-' if math.isnan(kept) else f'{100 * kept:.1f} %'} |")
    return "\n".join(lines)


def attribution_table(rows: list[dict], part: str, target: str) -> str:
    """Per sparse method and shots (means over runs): Dice, Dice with the convolution changes
    undone, with the always-trained changes undone; share of the squared weight change per part;
    re-selection rate and picks per entry."""
    from LymphNodeDGSTLib.adaptation.weight_attribution import PARTS

    ok = [r for r in rows if r.get("part") == part and r.get("status") == "ok" and r.get("change_share")]
    lines = ["| method | shots | runs | Dice | conv undone | always-trained undone | "
             + " | ".join(f"{p} share" for p in PARTS) + " | re-selected | picks/entry |",
             "|---|---|---|---|---|---|" + "---|" * len(PARTS) + "---|---|"]

    def mean_of(values) -> str:
        values = [v for v in values if v is not None]
        return f"{np.mean(values):.3f}" if values else "-"

    for shots in sorted({r["shots"] for r in ok}):
        for method in [m for m in METHODS if m in SPARSE]:
            group = [r for r in ok if r["method"] == method and r["shots"] == shots]
            if not group:
                continue
            cells = [mean_of(r["dice_mean"].get(target) for r in group),
                     mean_of(r["dice_mean"].get(f"{target}_conv_reset") for r in group),
                     mean_of(r["dice_mean"].get(f"{target}_always_reset") for r in group)]
            cells += [f"{100 * np.mean([r['change_share'][p] for r in group]):.1f} %" for p in PARTS]
            cells += [mean_of(r.get("reselection_rate") for r in group),
                      mean_of(r.get("picks_per_entry") for r in group)]
            lines.append(f"| {method} | {shots} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning_table(rows: list[dict], chosen: dict[str, float]) -> str:
    """Validation Dice per method (rows) and learning rate (columns); the chosen rate in bold."""
    tune = [r for r in rows if r.get("part") == "tune" and r.get("status") == "ok"]
    rates = sorted({r["learning_rate"] for r in tune})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]
    for method in [m for m in METHODS if any(r["method"] == m for r in tune)]:
        cells = []
        for lr in rates:
            found = [r["dice_mean"]["validation"] for r in tune if r["method"] == method and r["learning_rate"] == lr]
            text = f"{found[0]:.3f}" if found else "-"
            cells.append(f"**{text}**" if chosen.get(method) == lr else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(rows: list[dict], config: BenchConfig, output: Path, sts_skipped: str | None,
                  learning_rates: dict[str, float] | None = None) -> BenchOutputs:
    target = phantom_target(config.shift)
    phantom = summarise(rows, "phantom", target)
    sts = summarise(rows, "sts", STS_TARGET)
    failed = [row["run_id"] for row in rows if row.get("status") != "ok"]
    run_seconds = sum(row.get("process_seconds") or 0.0 for row in rows)
    text = [
        "# Adaptation benchmark",
        "",
        f"Machine: {machine_description(config.device)}. Date: {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Protocol: {config.iterations} iterations per fine-tune, learning rate {config.learning_rate_wording()}, gamma {config.gamma}; "
        + (f"{config.seeds} seed(s) for the phantom part; " if config.phantoms else "")
        + "evaluation without mirroring"
        + (f"; images centre-cropped to {config.crop_zyx} (z, y, x) voxels" if config.crop_zyx else "") + ".",
        f"Run time: {len(rows)} run{'' if len(rows) == 1 else 's'}, {_minutes(run_seconds)} in all "
        "(sum over the runs' processes, setup excluded).",
        "",
        f"## Phantoms: site-A demo model adapted to site {config.shift} ({config.site_b_tests} site-{config.shift} "
        f"and {config.site_a_tests} site-A test phantoms)"
        + ("; sparse methods selection-only (norms, biases and head frozen)" if config.selection_only else ""),
        "",
        markdown_table(phantom, target) if phantom
        else ("phantom part skipped (--skip-phantoms)" if not config.phantoms else "(no phantom runs)"),
        "",
    ]
    if learning_rates is not None:
        text += ["### Learning rates chosen on held-out training-site cases",
                 "", f"Each method adapted on site-{config.shift} phantoms {TUNE_POOL_SEED}.. "
                 f"({config.tune_shots} cases) and was scored on validation phantoms {VALIDATION_SEED}.. "
                 f"({config.validation_cases}); never on the test phantoms.", "",
                 tuning_table(rows, learning_rates), ""]
    if phantom:
        text += ["### Paired differences in site-" + config.shift + " test Dice",
                 "", "Mean [95 % t-interval] of Dice(method) - Dice(reference) over (seed, test case) pairs; "
                 "siteA kept: mean site-A Dice relative to the unadapted model.", "",
                 paired_table(rows, "phantom", target), ""]
        if any(r.get("change_share") for r in rows if r.get("part") == "phantom"):
            text += ["### Attribution and selection persistence (sparse methods)", "",
                     attribution_table(rows, "phantom", target), ""]
    text += [
        "## Real labels: soft-tissue sarcoma CT (adapt on "
        + (", ".join(STS_TRAIN[:config.sts_train_cases]) + "; test on " + ", ".join(STS_TEST[:config.sts_test_cases]) + ")"),
        "",
        markdown_table(sts, STS_TARGET) if sts else (sts_skipped or "(no real-label runs)"),
        "",
        "dice_*_std: spread over seeds of each run's mean (sample standard deviation; '-' with one run); "
        "dice_*_case_std: spread over the test cases of all runs; dice_siteA_mean: Dice retained on "
        "unseen site-A phantoms (forgetting); weights_changed_share: share of the weights that differ "
        "bitwise from the foundation; seconds: fine-tune wall time; peak_rss_mb: peak resident memory of "
        "the fine-tuning process (fresh process per run).",
    ]
    if failed:
        text += ["", f"Failed runs (left out): {', '.join(failed)}"]
    table = output / TABLE_FILE
    table.write_text("\n".join(text) + "\n")
    figure = write_figure(phantom, sts, output / FIGURE_FILE, target) if phantom or sts else None
    results = output / RESULTS_FILE
    results.write_text(json.dumps({"config": asdict(config), "machine": machine_description(config.device),
                                   "phantom": phantom, "sts": sts, "sts_skipped": sts_skipped,
                                   "learning_rates": learning_rates, "failed": failed}, indent=1))
    return BenchOutputs(output, rows, table, figure, results, sts_skipped, failed)


def machine_description(device: str) -> str:
    cores = os.cpu_count() or 0
    text = f"{platform.machine()} {platform.system()}, {cores} CPU cores, device {device}"
    if device.startswith("cuda"):
        import torch
        if torch.cuda.is_available():
            text += f" ({torch.cuda.get_device_name(0)})"
    return text


METHOD_COLOURS = {"none": "#777777", "full": "#1f77b4", "bias": "#ff7f0e", "norm": "#2ca02c",
                  "lora": "#9467bd", "random": "#8c564b", "static": "#e377c2", "dgst": "#d62728",
                  "dgst-ema": "#17becf", "dgst-split": "#bcbd22", "dgst-budget": "#7f7f7f"}


def write_figure(phantom: list[dict], sts: list[dict], path: Path, target: str = PHANTOM_TARGET) -> Path:
    """Site-B Dice (error bars: spread over seeds) and site-A Dice retained against shots, per
    method; STS Dice per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (2 if phantom else 0) + (1 if sts else 0)
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), dpi=110, squeeze=False)
    axes = list(axes[0])
    if phantom:
        site_b = f"dice_{target}_mean"
        for axis, column, title in ((axes[0], site_b, f"held-out {target} phantoms"),
                                    (axes[1], "dice_siteA_mean", "site-A phantoms (retained)")):
            _plot_against_shots(axis, phantom, column, with_spread=column == site_b, target=target)
            axis.set_title(title, fontsize=10)
        axes[0].legend(fontsize=8, loc="best")
    if sts:
        _plot_sts_bars(axes[-1], sts)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _plot_against_shots(axis, summary: list[dict], column: str, with_spread: bool,
                        target: str = PHANTOM_TARGET) -> None:
    for method in METHODS:
        points = [r for r in summary if r["method"] == method]
        if not points:
            continue
        style = {"color": METHOD_COLOURS[method], "label": method, "linewidth": 2.6 if method == "dgst" else 1.4}
        if method == "none":
            axis.axhline(points[0][column], linestyle="--", **style)
            continue
        offset = 0.06 * (METHODS.index(method) - len(METHODS) / 2)  # keeps error bars apart
        spread = [r[f"dice_{target}_std"] if with_spread else 0.0 for r in points]
        axis.errorbar([r["shots"] + offset for r in points], [r[column] for r in points],
                      yerr=[0.0 if math.isnan(value) else value for value in spread],
                      marker="o", capsize=3, **style)
    axis.set_xlabel("site-B training cases (shots)")
    axis.set_ylabel("Dice")
    axis.grid(alpha=0.3)
    shots = sorted({r["shots"] for r in summary if r["method"] != "none"})
    if shots:
        axis.set_xticks(shots)


def _plot_sts_bars(axis, summary: list[dict]) -> None:
    methods = [r["method"] for r in summary]
    means = [r[f"dice_{STS_TARGET}_mean"] for r in summary]
    spreads = [r[f"dice_{STS_TARGET}_case_std"] for r in summary]
    axis.bar(range(len(summary)), means, yerr=spreads, capsize=3, color=[METHOD_COLOURS[m] for m in methods])
    for x, (value, spread) in enumerate(zip(means, spreads)):
        axis.text(x, value + spread + 0.01, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(summary)), methods, rotation=30)
    axis.set_ylim(0, max(0.1, max(m + s for m, s in zip(means, spreads)) * 1.15))
    axis.set_ylabel("Dice (error bars: spread over test cases)")
    axis.set_title(f"real CT, sarcoma GTV ({max(r['shots'] for r in summary)} training case(s))", fontsize=10)
    axis.grid(alpha=0.3, axis="y")


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))

"""Planning the adaptation benchmark: its settings, the phantom and real-label cases each run
trains and evaluates on, the rate-tuning runs and the method runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from LymphNodeDGSTLib.adaptation.schedule import AUTO_OPTIONS
from LymphNodeDGSTLib.errors import UserInputError


Say = Callable[[str], None]
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
# The automatic schedule's settings a benchmark may vary: `lndgst adapt`'s, except the time
# budget (a budget would make a run's result depend on the machine's speed).
AUTO_SETTINGS = tuple(name for name in AUTO_OPTIONS if name != "budget")
RUNS_FILE = "runs.jsonl"
CONFIG_FILE = "config.json"
TABLE_FILE = "results.md"
RESULTS_FILE = "results.json"
FIGURE_FILE = "bench_adapt.png"
PHANTOM_TARGET, STS_TARGET = "siteB", "sts"   # PHANTOM_TARGET: the default shift's name


def phantom_target(shift: str) -> str:
    return f"site{shift}"


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
    schedule: str = "fixed"              # fixed: `iterations` at the rate; auto: the product's default
                                         # path (held-out split, rate probes, early stop, best kept)
    auto_settings: dict = field(default_factory=dict)  # auto: AutoSchedule fields (AUTO_SETTINGS)
                                         # other than the product's defaults

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
        if self.schedule not in ("fixed", "auto"):
            raise UserInputError(f"--schedule: choose auto or fixed, not {self.schedule!r}")
        if self.schedule == "auto" and (self.tune_lrs or self.attribution):
            raise UserInputError("--schedule auto chooses its own rate: drop --tune-lr and --attribution")
        if self.auto_settings:
            if self.schedule != "auto":
                raise UserInputError("--rates, --probe-iterations, --check-every, --patience and "
                                     "--max-iterations need --schedule auto")
            auto_schedule(self.auto_settings)
        if self.selection_only and not any(m in SPARSE for m in self.methods):
            raise UserInputError(f"--selection-only needs a sparse method among --methods ({', '.join(SPARSE)})")
        return self

    def learning_rate_wording(self) -> str:
        if self.schedule == "auto" and self.auto_settings:
            changed = ", ".join(f"{key} {value}" for key, value in sorted(self.auto_settings.items()))
            return ("chosen per run by the automatic schedule on the site's own held-out case(s), "
                    f"with {changed} instead of the product's defaults (fewer than 3 cases: the fixed fallback)")
        if self.schedule == "auto":
            return ("chosen per run by the automatic schedule on the site's own held-out case(s) "
                    "(the product's default path; fewer than 3 cases: the fixed fallback)")
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
    schedule_cases: list[CaseFile] | None = None  # auto schedule: the held-out cases choosing it
    auto_settings: dict | None = None   # auto schedule: AutoSchedule fields other than the defaults


@dataclass
class BenchOutputs:
    output: Path
    rows: list[dict]
    table: Path
    figure: Path | None
    results: Path
    sts_skipped: str | None = None
    failed: list[str] = field(default_factory=list)


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


def run_settings(config: BenchConfig, method: str, seed: int, learning_rate: float | None) -> dict:
    """FineTuneSettings fields of one run (selection-only applies to the sparse methods)."""
    if config.schedule == "auto" and method != "none":   # the product's request (its fixed fallback)
        from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest
        from dataclasses import asdict as fields_of
        request = AdaptRequest(method=method, gamma=config.gamma, seed=seed,
                               selection_only=config.selection_only and method in SPARSE)
        return fields_of(request.settings())
    return {"method": method, "gamma": config.gamma, "iterations": config.iterations,
            "iterations_per_epoch": config.iterations, "val_iterations_per_epoch": 1,
            "learning_rate": learning_rate, "seed": seed,
            "selection_only": config.selection_only and method in SPARSE}


def auto_schedule(settings: dict | None):
    """The AutoSchedule of a run, made as `lndgst adapt` makes it from its request: the product's
    defaults with `settings` (AUTO_SETTINGS) in their place; a UserInputError for a setting not
    in AUTO_SETTINGS or a value the schedule refuses."""
    from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest

    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(AUTO_SETTINGS))
    if unknown:
        raise UserInputError(f"automatic schedule: no setting {', '.join(unknown)}")
    return AdaptRequest(**settings).auto_schedule()


def auto_split(config: BenchConfig, train: list[CaseFile], seed: int) -> tuple[list[CaseFile], list[CaseFile] | None]:
    """(training cases, schedule cases) as the product splits a site's cases for the automatic
    schedule (adapt.split_cases, then gate.divide_held_out); schedule cases None: too few cases,
    the fixed fallback. The fixed schedule trains on every case."""
    if config.schedule != "auto" or not train:
        return train, None
    from types import SimpleNamespace

    from LymphNodeDGSTLib.adaptation.adapt import split_cases
    from LymphNodeDGSTLib.adaptation.gate import divide_held_out

    records = [SimpleNamespace(id=case.case_id, case=case) for case in train]
    split = split_cases(records, None, seed)
    if not split.held_out:
        return train, None
    return [r.case for r in split.training], [r.case for r in divide_held_out(split.evaluation, True).schedule]


def run_suffix(config: BenchConfig, method: str) -> str:
    """Run-id infix naming the shift (when not B), selection-only and the automatic schedule."""
    return (("-auto" if config.schedule == "auto" else "")
            + (f"-site{config.shift}" if config.shift != "B" else "")
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
        run_id = f"{part}{run_suffix(config, method) if method != 'none' else ''}-{method}-k{shots}-s{seed}"
        settings = run_settings(config, method, seed, learning_rates.get(method, config.learning_rate))
        train, schedule_cases = auto_split(config, train, seed)
        return RunSpec(run_id, part, method, shots, seed, str(foundation), train, evaluate, settings,
                       str(work / "runs" / run_id), str(work / "runs" / f"{run_id}.result.json"),
                       config.device, attribution=config.attribution and method in SPARSE,
                       schedule_cases=schedule_cases,
                       auto_settings=dict(config.auto_settings) if schedule_cases else None)

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

"""The automatic schedule (issue 23): rate probes, held-out checks, early stop, budget, cancel,
the one-case fallback, and the options that choose a schedule.

Most tests replace the held-out scorer by a scripted one (the test decides where the held-out
Dice peaks) and train the tiny random-weight model for a few iterations; the probe test scores
real segmentations of the demo model on cropped phantoms.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import tree_snapshot
from test_adapt import blob_case

from LymphNodeDGSTLib.adaptation import auto_schedule, held_out_dice, schedule
from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest, run_adaptation
from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
from LymphNodeDGSTLib.cli import main as cli
from LymphNodeDGSTLib.engine.store.adapter_header import RECORD_FIELDS
from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
from LymphNodeDGSTLib.engine.store.models import ModelStore
from LymphNodeDGSTLib.engine.store.results_folders import find_checkpoints
from LymphNodeDGSTLib.engine.store.state_dicts import weights_sha256
from LymphNodeDGSTLib.errors import Cancelled, UserInputError
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.jobs.events import Reporter


class FakeClock:
    """Seconds that pass only when the scripted scorer says so (a scoring 'takes' its time)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scripted_scorer(scores: list[float], clock: FakeClock | None = None, seconds_per_score: float = 0.0):
    """A HeldOutScorer stand-in returning `scores` in order; `seen` holds each scored checkpoint's
    weights_sha256, so a test can tell which checkpoint was published."""

    class ScriptedScorer:
        seen: list[str] = []

        def __init__(self, parent, cases, device, before_each_case=None):
            self.before_each_case = before_each_case or (lambda: None)

        def _spend(self) -> None:
            self.before_each_case()
            if clock is not None:
                clock.now += seconds_per_score

        def score_loaded(self) -> float:
            self._spend()
            return 0.1

        def score(self, weights: dict) -> float:
            self._spend()
            ScriptedScorer.seen.append(weights_sha256(weights))
            return scores[len(ScriptedScorer.seen) - 1]

    return ScriptedScorer


@pytest.fixture
def four_case_home(installed_home) -> Home:
    """The tiny model and four blob cases: three train, one held out (schedule and gate case)."""
    library = CaseLibrary(installed_home / "cases")
    for seed in range(4):
        library.add(*blob_case(seed))
    return Home(installed_home)


def published_sha(home: Home, ref: str) -> str:
    version = ModelStore(home.models).resolve(ref)
    path = next(iter(find_checkpoints(version.path).values()))
    return weights_sha256(load_checkpoint(path)["network_weights"])


def run(home: Home, request: AdaptRequest, tmp_path, reporter: Reporter | None = None) -> dict:
    job = tmp_path / "job"
    job.mkdir(exist_ok=True)
    return run_adaptation(home, request, reporter or Reporter(job, min_interval_s=0), job / "work")


def log_lines(tmp_path) -> list[str]:
    events = (tmp_path / "job" / "events.ndjson").read_text().splitlines()
    return [json.loads(line)["message"] for line in events if json.loads(line)["type"] == "log"]


def test_an_early_peak_stops_training_after_patience_and_publishes_the_peak(four_case_home, tmp_path,
                                                                           monkeypatch):
    """Held-out Dice 0.2, 0.5 (peak), 0.4, 0.45, then higher ones that must never be reached.
    Catches: publishing the last checkpoint instead of the best; patience counted against the
    previous check instead of the best (0.45 > 0.4 would reset it); not stopping at all."""
    scorer = scripted_scorer([0.2, 0.5, 0.4, 0.45, 0.3, 0.9, 0.95])
    monkeypatch.setattr(auto_schedule, "HeldOutScorer", scorer)
    request = AdaptRequest(device="cpu", rates=[1e-2], check_every=1, patience=2, max_iterations=20)
    summary = run(four_case_home, request, tmp_path)

    record = json.loads(open(summary["report"]).read())["schedule"]
    assert [c["iteration"] for c in record["curve"]] == [1, 2, 3, 4]  # peak at check 2, +2 checks
    assert record["stop_reason"] == "no_improvement" and record["best_iteration"] == 2
    assert "has not improved for 2 checks" in record["stop_text"]
    assert len(set(scorer.seen)) == 4  # every check scored different weights
    assert published_sha(four_case_home, summary["version"]) == scorer.seen[1]
    assert summary["iterations"] == 2 and summary["schedule"] == "auto"
    metadata = ModelStore(four_case_home.models).resolve(summary["version"]).metadata
    assert metadata["schedule"]["best_iteration"] == 2 and metadata["iterations"] == 2
    assert RECORD_FIELDS["metrics"](metadata["metrics"])  # still travels in a site adapter
    assert any("held-out Dice 0.500 at 2 iterations (best so far)" in m for m in log_lines(tmp_path))


def test_a_budget_stops_training_and_publishes_the_best_check(four_case_home, tmp_path, monkeypatch):
    """Each scoring 'takes' 10 s of a 25 s budget: the parent at 10, checks at 20 and 30, then the
    budget stops the next iteration. Catches a budget that is not checked during training, and
    the last check published instead of the best one (0.6 before 0.4)."""
    clock = FakeClock()
    scorer = scripted_scorer([0.6, 0.4, 0.8, 0.9], clock, seconds_per_score=10)
    monkeypatch.setattr(auto_schedule, "HeldOutScorer", scorer)
    monkeypatch.setattr(auto_schedule, "CLOCK", clock)
    request = AdaptRequest(device="cpu", rates=[1e-2], check_every=1, patience=100,
                           max_iterations=1000, budget="25s")
    summary = run(four_case_home, request, tmp_path)

    record = json.loads(open(summary["report"]).read())["schedule"]
    assert record["stop_reason"] == "budget" and record["budget_s"] == 25
    assert [c["dice"] for c in record["curve"]] == [0.6, 0.4]
    assert published_sha(four_case_home, summary["version"]) == scorer.seen[0]
    assert "time budget of 25 s is spent" in record["stop_text"]


def test_a_budget_spent_before_any_check_publishes_nothing(four_case_home, tmp_path, monkeypatch):
    """A real 2 s budget and a first check 1000 iterations away. Catches publishing unscored
    weights (the last ones) when the budget ends, and a budget that never stops training."""
    monkeypatch.setattr(auto_schedule, "HeldOutScorer", scripted_scorer([0.5]))
    before = tree_snapshot(four_case_home.models)
    request = AdaptRequest(device="cpu", rates=[1e-2], check_every=1000, max_iterations=1000,
                           budget="2s")
    started = time.monotonic()
    with pytest.raises(auto_schedule.NothingScored, match="ran out before the first held-out check"):
        run(four_case_home, request, tmp_path)
    assert time.monotonic() - started < 120  # 1000 iterations would take far longer
    assert tree_snapshot(four_case_home.models) == before


class CancelInFirstProbe(Reporter):
    """Asks for a cancel as soon as the first probe has trained one iteration."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe_progress: list[int] = []

    def progress(self, done, total, stage=None, **extra):
        if stage == "probe" and extra.get("detail", "").startswith("choosing the learning rate"):
            self.probe_progress.append(done)
            if done >= 1:
                self.cancel_event.set()
        super().progress(done, total, stage, **extra)


def test_cancel_during_the_probe_publishes_nothing(four_case_home, tmp_path):
    """Catches a probe that does not see the cancel (it would train all 40 of its iterations and
    go on to the second rate) and anything published from a cancelled probe."""
    before = tree_snapshot(four_case_home.models)
    (tmp_path / "job").mkdir()
    reporter = CancelInFirstProbe(tmp_path / "job", min_interval_s=0)
    request = AdaptRequest(device="cpu", rates=[1e-3, 1e-2], probe_iterations=40)
    with pytest.raises(Cancelled):
        run(four_case_home, request, tmp_path, reporter)
    assert max(reporter.probe_progress) < 5  # stopped within the first probe
    assert not any("2 of 2" in m for m in log_lines(tmp_path))
    assert tree_snapshot(four_case_home.models) == before


def test_one_case_uses_the_documented_fixed_schedule_and_says_so(installed_home, tmp_path, monkeypatch):
    """Catches the automatic schedule running without a held-out case (it would choose on the
    training case), and a fallback that is not reported in the report, the record and the log."""
    monkeypatch.setattr(schedule, "FIXED_ITERATIONS", 3)  # the documented 250, shortened
    CaseLibrary(installed_home / "cases").add(*blob_case(0))
    home = Home(installed_home)
    summary = run(home, AdaptRequest(device="cpu"), tmp_path)

    report = json.loads(open(summary["report"]).read())
    assert report["schedule"]["kind"] == "fixed" and report["iterations"] == 3
    assert report["schedule"]["reason"] == "too few cases to hold one out"
    assert summary["schedule"] == "fixed" and "too few cases" in summary["schedule_text"]
    assert ModelStore(home.models).resolve(summary["version"]).metadata["schedule"]["kind"] == "fixed"
    assert any("documented fixed schedule is used (3 iterations" in m for m in log_lines(tmp_path))


def cropped_phantom(site: str, seed: int) -> tuple[sitk.Image, sitk.Image]:
    """A phantom cut to 16 x 80 x 80 voxels around its nodes: one sliding-window tile of the demo
    model (whose spacing it shares)."""
    from LymphNodeDGSTLib.demo.phantom import generate_phantom

    phantom = generate_phantom(site, seed)
    truth = sitk.GetArrayFromImage(phantom.label)
    centre = np.argwhere(truth > 0).mean(axis=0).astype(int)[::-1]  # x, y, z
    size = np.minimum([80, 80, 16], phantom.image.GetSize())
    start = np.clip(centre - size // 2, 0, np.array(phantom.image.GetSize()) - size)
    crop = [int(v) for v in size], [int(v) for v in start]
    return (sitk.RegionOfInterest(phantom.image, *crop), sitk.RegionOfInterest(phantom.label, *crop))


def test_the_probe_picks_the_rate_that_keeps_the_model_good(tmp_path):
    """The demo model segments site-A phantoms well; one iteration at a rate of 3 or 10 wrecks
    it (or diverges), 1e-4 keeps it. The good rate sits between the two bad ones. Catches a probe that
    keeps the first or the last rate, the worst score, or that trains every probe at one rate."""
    from LymphNodeDGSTLib.adaptation.adapt import adaptation_fold
    from LymphNodeDGSTLib.adaptation.nnunet_dataset import TrainingCase, prepare_dataset
    from LymphNodeDGSTLib.adaptation.trainer import FineTuneSettings
    from LymphNodeDGSTLib.demo.demo_model import ensure_default_model
    from LymphNodeDGSTLib.engine.store.architectures import read_json

    store = ModelStore(tmp_path / "models")
    parent = store.resolve(ensure_default_model(store))
    library = CaseLibrary(tmp_path / "cases")
    training = library.add(*cropped_phantom("A", 7101))
    held_out = library.add(*cropped_phantom("A", 7102))
    fold, path = adaptation_fold(parent)
    foundation = load_checkpoint(path)
    dataset = prepare_dataset([TrainingCase(training.id, training.image_path, training.label_path)],
                              read_json(parent.path / "plans.json"),
                              read_json(parent.path / "dataset.json"),
                              foundation["init_args"]["configuration"], tmp_path / "preprocessed")
    (tmp_path / "job").mkdir()
    reporter = Reporter(tmp_path / "job", min_interval_s=0)
    scorer = held_out_dice.HeldOutScorer(parent, [(held_out.id, held_out.image_path,
                                                    held_out.label_path)], "cpu")
    auto = schedule.AutoSchedule(rates=(10.0, 1e-4, 3.0), probe_iterations=1, check_every=1,
                                 patience=1, max_iterations=1)
    outcome = auto_schedule.run_auto_schedule(foundation, dataset, tmp_path / "work",
                                              FineTuneSettings(method="full"), auto, scorer,
                                              torch.device("cpu"), reporter,
                                              reference=scorer.score_loaded)
    probes = {p["rate"]: p["dice"] for p in outcome.record["probes"]}
    assert outcome.learning_rate == 1e-4, outcome.record["probes"]
    assert probes[1e-4] > 0.7 and outcome.record["reference_dice"] > 0.7
    assert all(probes[rate] is None or probes[rate] < probes[1e-4] - 0.3 for rate in (10.0, 3.0)), probes


@pytest.mark.parametrize("options, message", [
    (["--schedule", "auto", "--iterations", "50"], "--schedule auto chooses the learning rate"),
    (["--schedule", "auto", "--lr", "0.01"], "drop --lr, or use --schedule fixed"),
    (["--iterations", "50", "--budget", "5m"], "set a fixed schedule and --budget the automatic"),
    (["--schedule", "fixed", "--patience", "2"], "--patience only apply to --schedule auto"),
    (["--budget", "20"], "--budget must be a time budget such as 90s"),
    (["--budget", "0s"], "--budget must be above 0"),
    (["--budget", "5x"], "--budget must be a time budget"),
    (["--rates", "1e-2,fast"], "--rates must be learning rates separated by commas"),
    (["--rates", "1e-2,-1"], "--rates: every rate must be a finite number above 0"),
    (["--check-every", "50", "--max-iterations", "10"], "--max-iterations (10) must be at least"),
])
def test_contradicting_or_bad_schedule_options_exit_2(installed_home, capsys, options, message):
    """Catches a fixed-schedule number silently ignored by the automatic schedule (or the
    reverse), and budgets that could mean seconds or minutes."""
    CaseLibrary(installed_home / "cases").add(*blob_case(0))
    before = tree_snapshot(installed_home)
    status = cli.main(["--home", str(installed_home), "adapt", *options])
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert tree_snapshot(installed_home) == before


def test_schedule_rules_read_the_options_given():
    """Catches --iterations alone not meaning the fixed schedule (old scripts would suddenly
    run the automatic one) and budgets parsed in the wrong unit."""
    assert AdaptRequest().schedule_kind() == "auto"
    assert AdaptRequest(iterations=40).schedule_kind() == "fixed"
    assert AdaptRequest(learning_rate=1e-2).schedule_kind() == "fixed"
    assert AdaptRequest(budget="20m").schedule_kind() == "auto"
    assert schedule.parse_budget("20m") == 1200 and schedule.parse_budget("90s") == 90
    assert schedule.parse_budget("1h30m") == 5400 and schedule.parse_budget(" 2 h ") == 7200
    with pytest.raises(UserInputError):
        schedule.parse_budget("30m1h")

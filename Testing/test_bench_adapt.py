"""The adaptation benchmark: a smoke run end to end (CLI), resume, the tables, the STS split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, run_cli
from LymphNodeDGSTLib.cli import main as cli
from LymphNodeDGSTLib.demo.bench_adapt.plan import (FIGURE_FILE, CaseFile, RUNS_FILE, STS_TEST, STS_TRAIN, TABLE_FILE, BenchConfig, plan_runs, sts_cases)
from LymphNodeDGSTLib.demo.bench_adapt.tables import markdown_table, summarise, table_columns, write_reports


def table_rows(markdown: str, header_starts: str) -> tuple[list[str], list[dict]]:
    """The columns and rows of the first Markdown table whose header starts with `header_starts`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_starts))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(columns), line
        rows.append(dict(zip(columns, cells)))
    return columns, rows


@pytest.fixture(scope="session")  # not module: xdist interleaves modules (re-ran it)
def smoke_run(tmp_path_factory) -> tuple[Path, str]:
    """`lndgst bench adapt --smoke` with no shared data (so the real-label part must be skipped)."""
    import os

    work = tmp_path_factory.mktemp("bench")
    empty = work / "no-shared-data"
    empty.mkdir()
    previous = os.environ.get("LNDGST_SHARED_DATA")
    os.environ["LNDGST_SHARED_DATA"] = str(empty)
    try:
        completed = run_cli("bench", "adapt", "--smoke", "--output", str(work / "out"),
                            home=work / "home", timeout=300)
    finally:
        if previous is None:
            os.environ.pop("LNDGST_SHARED_DATA")
        else:
            os.environ["LNDGST_SHARED_DATA"] = previous
    assert completed.returncode == 0, (completed.stdout, completed.stderr)
    return work / "out", completed.stdout


def test_smoke_run_writes_the_table_with_all_columns(smoke_run):
    output, stdout = smoke_run
    columns, rows = table_rows((output / TABLE_FILE).read_text(), "| method |")
    assert columns == table_columns("siteB")
    for required in ("method", "shots", "dice_siteB_mean", "dice_siteB_std", "dice_siteA_mean",
                     "weights_changed_share", "seconds", "peak_rss_mb"):
        assert required in columns
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"none", "dgst"}
    none, dgst = by_method["none"], by_method["dgst"]
    assert none["shots"] == "0" and dgst["shots"] == "1"
    for row in rows:
        assert 0.0 <= float(row["dice_siteB_mean"]) <= 1.0
        assert 0.0 <= float(row["dice_siteA_mean"]) <= 1.0
        assert row["dice_siteB_std"] == "-"  # one seed: no spread over seeds
    assert none["weights_changed_share"] == "0 %" and none["peak_rss_mb"] == "-"
    share = float(dgst["weights_changed_share"].rstrip(" %"))
    assert 0.0 < share < 5.0  # sparse: a few entries per kernel plus norms, biases and head
    assert float(dgst["seconds"]) > 0 and float(dgst["peak_rss_mb"]) > 100
    assert "real-label part skipped" in stdout and "real-label part skipped" in (output / TABLE_FILE).read_text()
    run_time = next(line for line in (output / TABLE_FILE).read_text().splitlines() if line.startswith("Run time:"))
    assert run_time.startswith("Run time: 2 runs, ") and " 0.0 min " not in run_time


def test_smoke_run_keeps_every_run_and_draws_the_figure(smoke_run):
    output, _ = smoke_run
    runs = [json.loads(line) for line in (output / RUNS_FILE).read_text().splitlines()]
    assert [(r["method"], r["status"]) for r in runs] == [("none", "ok"), ("dgst", "ok")]
    dgst = runs[1]
    assert dgst["iterations"] == 4 and dgst["learning_rate"] == pytest.approx(1e-2)
    assert len(dgst["train_cases"]) == 1 and len(dgst["dice"]["siteB"]) == 1
    assert dgst["peak_rss_mb"] >= dgst["rss_before_training_mb"] > 0
    assert (output / FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((output / "results.json").read_text())
    assert [row["method"] for row in results["phantom"]] == ["none", "dgst"] and results["sts"] == []


def test_resume_measures_nothing_twice(smoke_run, monkeypatch):
    output, _ = smoke_run
    monkeypatch.setenv("LNDGST_SHARED_DATA", str(output.parent / "no-shared-data"))
    before = (output / RUNS_FILE).read_text()
    completed = run_cli("bench", "adapt", "--smoke", "--resume", "--output", str(output),
                        home=output.parent / "home", timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "2 runs (2 already measured)" in completed.stdout
    assert (output / RUNS_FILE).read_text() == before
    other = ["--home", str(output.parent / "home"), "bench", "adapt", "--smoke", "--iterations", "5",
             "--resume", "--output", str(output)]
    assert cli.main(other) == cli.EXIT_USAGE  # other settings: refuse to mix the rows
    assert (output / RUNS_FILE).read_text() == before


def test_summary_spreads_over_seeds_and_cases():
    def row(method, shots, seed, site_b, share):
        return {"part": "phantom", "status": "ok", "method": method, "shots": shots, "seed": seed,
                "dice": {"siteB": site_b, "siteA": [0.9, 0.8]},
                "dice_mean": {"siteB": sum(site_b) / len(site_b), "siteA": 0.85},
                "weights_changed_share": share, "seconds": 10.0 + seed, "peak_rss_mb": 1000.0}

    rows = [row("dgst", 3, 0, [0.6, 0.8], 0.01), row("dgst", 3, 1, [0.8, 1.0], 0.03),
            row("none", 0, 0, [0.5, 0.5], 0.0), {"part": "phantom", "status": "failed", "method": "full"}]
    summary = summarise(rows, "phantom", "siteB")
    assert [(s["method"], s["shots"], s["runs"]) for s in summary] == [("none", 0, 1), ("dgst", 3, 2)]
    dgst = summary[1]
    assert dgst["dice_siteB_mean"] == pytest.approx(0.8)
    assert dgst["dice_siteB_std"] == pytest.approx(0.1414, abs=1e-3)       # seed means 0.7 and 0.9
    assert dgst["dice_siteB_case_std"] == pytest.approx(0.1414, abs=1e-3)  # cases 0.6, 0.8, 0.8, 1.0
    assert dgst["weights_changed_share"] == pytest.approx(0.02) and dgst["seconds"] == pytest.approx(10.5)
    columns, parsed = table_rows(markdown_table(summary, "siteB"), "| method |")
    assert columns == table_columns("siteB") and parsed[1]["weights_changed_share"] == "2 %"
    assert parsed[0]["dice_siteB_std"] == "-" and parsed[1]["dice_siteB_std"] == "0.141"


def test_real_label_only_report_says_the_phantom_part_was_skipped(tmp_path):
    config = BenchConfig(methods=("none", "dgst"), phantoms=False, iterations=250)
    sts_row = {"part": "sts", "status": "ok", "method": "dgst", "shots": 5, "seed": 0,
               "dice": {"sts": [0.1, 0.3], "siteA": [0.5]}, "dice_mean": {"sts": 0.2, "siteA": 0.5},
               "weights_changed_share": 0.14, "seconds": 148.0, "peak_rss_mb": 1713.0, "process_seconds": 240.0}
    outputs = write_reports([sts_row], config, tmp_path, sts_skipped=None)
    text = outputs.table.read_text()
    assert "phantom part skipped (--skip-phantoms)" in text and "seed(s)" not in text
    assert "Run time: 1 run, 4.0 min in all" in text
    _, parsed = table_rows(text, "| method |")
    assert [(row["method"], row["dice_sts_mean"], row["weights_changed_share"]) for row in parsed] == [
        ("dgst", "0.200", "14 %")]


def test_sts_split_is_fixed_disjoint_and_skipped_without_data(tmp_path):
    assert not set(STS_TRAIN) & set(STS_TEST) and len(STS_TRAIN) == len(STS_TEST) == 5
    reason = sts_cases(BenchConfig(sts_folder=str(tmp_path)))
    assert isinstance(reason, str) and "skipped" in reason and "STS_002" in reason
    if not (SHARED_DATA / "sts").is_dir():
        pytest.skip(f"shared test data not available: {SHARED_DATA / 'sts'}")
    train, test = sts_cases(BenchConfig(sts_folder=str(SHARED_DATA / "sts")))
    assert [c.case_id for c in train] == list(STS_TRAIN) and [c.case_id for c in test] == list(STS_TEST)
    assert all(Path(c.image).is_file() and Path(c.label).is_file() for c in train + test)


def test_plan_order_keeps_every_part_measured_early_and_phantoms_can_be_skipped(tmp_path):
    config = BenchConfig(methods=("none", "bias", "dgst"), shots=(1, 2), seeds=2, site_b_tests=1,
                         site_a_tests=1, crop_zyx=(8, 32, 32))
    sts = ([CaseFile("STS_002", "i", "l")], [CaseFile("STS_025", "i", "l")])
    plan = plan_runs(config, tmp_path / "model", tmp_path / "work", sts, say=lambda _: None)
    assert [r.run_id for r in plan] == [
        "phantom-none-k0-s0", "sts-none-k0-s0",
        "phantom-bias-k1-s0", "phantom-dgst-k1-s0", "phantom-bias-k2-s0", "phantom-dgst-k2-s0",
        "sts-bias-k1-s0", "sts-dgst-k1-s0",
        "phantom-bias-k1-s1", "phantom-dgst-k1-s1", "phantom-bias-k2-s1", "phantom-dgst-k2-s1"]
    by_id = {r.run_id: r for r in plan}
    one, two = by_id["phantom-dgst-k1-s1"].train, by_id["phantom-dgst-k2-s1"].train
    assert two[:1] == one and len(two) == 2  # nested shots within a seed
    assert not {c.case_id for c in two} & {c.case_id for c in by_id["phantom-dgst-k2-s0"].train}
    assert {c.case_id for c in two}.isdisjoint(c.case_id for c in by_id["phantom-dgst-k2-s1"].evaluate["siteB"])
    assert by_id["phantom-dgst-k2-s1"].settings["seed"] == 1
    config.phantoms = False
    assert [r.run_id for r in plan_runs(config, tmp_path / "model", tmp_path / "work", sts, lambda _: None)] == [
        "sts-none-k0-s0", "sts-bias-k1-s0", "sts-dgst-k1-s0"]


def test_auto_schedule_runs_split_the_site_cases_as_the_product_does(tmp_path):
    """Catches a benchmark of the automatic schedule that is not the product's default path: held-out
    cases also trained on (or taken from the test phantoms), a split other than `lndgst adapt`'s,
    or one case probed instead of the product's fixed fallback."""
    from types import SimpleNamespace

    from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest, split_cases
    from LymphNodeDGSTLib.adaptation.schedule import FIXED_ITERATIONS

    config = BenchConfig(methods=("none", "dgst"), shots=(1, 3, 5), seeds=2, site_b_tests=1,
                         site_a_tests=1, crop_zyx=(8, 32, 32), schedule="auto").validate()
    plan = {r.run_id: r for r in plan_runs(config, tmp_path / "model", tmp_path / "work", None, lambda _: None)}
    assert sorted(plan) == sorted(["phantom-none-k0-s0"] + [f"phantom-auto-dgst-k{k}-s{s}"
                                                           for k in (1, 3, 5) for s in (0, 1)])
    one = plan["phantom-auto-dgst-k1-s0"]
    assert one.schedule_cases is None and len(one.train) == 1  # the product's fallback: fixed
    assert one.settings["iterations"] == FIXED_ITERATIONS and one.settings["method"] == "dgst"
    assert one.settings == {**AdaptRequest(method="dgst", seed=0).settings().__dict__}
    for shots, trained in ((3, 2), (5, 4)):
        for seed in (0, 1):
            run = plan[f"phantom-auto-dgst-k{shots}-s{seed}"]
            pool = plan[f"phantom-auto-dgst-k5-s{seed}"].train + plan[f"phantom-auto-dgst-k5-s{seed}"].schedule_cases
            ids = [c.case_id for c in run.train + run.schedule_cases]
            assert len(run.train) == trained and len(run.schedule_cases) == 1
            assert not {c.case_id for c in run.train} & {c.case_id for c in run.schedule_cases}
            tests = {c.case_id for cases in run.evaluate.values() for c in cases}
            assert not tests & set(ids)
            product = split_cases([SimpleNamespace(id=i) for i in ids], None, seed)
            assert [c.case_id for c in run.schedule_cases] == [r.id for r in product.evaluation]
            assert run.settings["seed"] == seed and len(pool) == 5


@pytest.mark.parametrize("arguments, message", [
    (["--schedule", "auto", "--iterations", "5"], "drop --iterations"),
    (["--schedule", "auto", "--tune-lr", "1e-2"], "drop --tune-lr"),
    (["--crop", "32,96"], "--crop"),
    (["--methods", "dgst,magic"], "unknown method"),
    (["--shots", "0"], "--shots"),
    (["--shots", "one"], "whole numbers"),
    (["--lr", "fast"], "--lr"),
    (["--iterations", "0"], "--iterations"),
    (["--shift", "D"], "--shift"),
    (["--tune-lr", "1e-2,x"], "--tune-lr"),
    (["--tune-lr", "1e-2", "--lr", "1e-2"], "exclude each other"),
    (["--selection-only", "--methods", "none,norm"], "--selection-only"),
    (["--report-only"], "holds no benchmark"),
    (["--rates", "1e-2,3e-2"], "need --schedule auto"),
    (["--schedule", "auto", "--rates", "1e-2,x"], "--rates"),
    (["--schedule", "auto", "--patience", "0"], "--patience"),
    (["--schedule", "auto", "--probe-iterations", "30", "--max-iterations", "20"], "--max-iterations"),
])
def test_bad_options_exit_2_before_any_work(arguments, message, tmp_path, capsys):
    output = tmp_path / "out"
    assert cli.main(["--home", str(tmp_path / "home"), "bench", "adapt", "--output", str(output)]
                    + arguments) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_more_seeds_on_resume_keep_the_measured_runs(tmp_path):
    """Catches a benchmark extended by --seeds on --resume whose earlier seeds would change (cases or
    settings that depend on the number of seeds, so old and new rows mix), or a resume that refuses
    the extension or accepts a change that alters measurements (--iterations)."""
    from dataclasses import asdict

    from LymphNodeDGSTLib.demo.bench_adapt import EXTENSIBLE_SETTINGS, open_output
    from LymphNodeDGSTLib.errors import UserInputError

    def planned(seeds: int) -> tuple[BenchConfig, dict]:
        config = BenchConfig(methods=("none", "dgst"), shots=(3,), seeds=seeds, site_b_tests=1,
                             site_a_tests=1, crop_zyx=(8, 32, 32), schedule="auto").validate()
        runs = plan_runs(config, tmp_path / "model", tmp_path / f"work{seeds}", None, lambda _: None)
        return config, {r.run_id: ([c.case_id for c in r.train + (r.schedule_cases or [])], r.settings,
                                   {k: [c.case_id for c in v] for k, v in r.evaluate.items()}) for r in runs}

    one, runs_one = planned(1)
    two, runs_two = planned(2)
    assert set(runs_one) < set(runs_two)
    assert all(runs_two[run_id] == runs_one[run_id] for run_id in runs_one)
    output = tmp_path / "out"
    runs_path = open_output(output, {"config": asdict(one)}, resume=False, extensible=EXTENSIBLE_SETTINGS)
    runs_path.write_text('{"run_id": "phantom-none-k0-s0", "status": "ok"}\n')
    open_output(output, {"config": asdict(two)}, resume=True, extensible=EXTENSIBLE_SETTINGS)
    assert "phantom-none-k0-s0" in runs_path.read_text()
    two.iterations = 41
    with pytest.raises(UserInputError, match="other settings"):
        open_output(output, {"config": asdict(two)}, resume=True, extensible=EXTENSIBLE_SETTINGS)


def test_auto_settings_reach_the_schedule_of_every_auto_run(tmp_path, monkeypatch):
    """Catches a variant of the automatic schedule (--rates, --probe-iterations, ...) that is lost
    on the way to the child, so the child runs the product's defaults while the tables say
    otherwise; and the fixed fallback (1 case) given schedule settings it does not use."""
    from LymphNodeDGSTLib.adaptation import auto_schedule as auto_module
    from LymphNodeDGSTLib.adaptation.schedule import AutoSchedule
    from LymphNodeDGSTLib.demo.bench_adapt.runs import fine_tune_automatically

    variant = {"rates": [1e-2, 3e-2], "probe_iterations": 5, "patience": 2}
    config = BenchConfig(methods=("none", "dgst"), shots=(1, 3), seeds=1, site_b_tests=1, site_a_tests=1,
                         crop_zyx=(8, 32, 32), schedule="auto", auto_settings=variant).validate()
    plan = {r.run_id: r for r in plan_runs(config, tmp_path / "model", tmp_path / "work", None, lambda _: None)}
    assert plan["phantom-auto-dgst-k1-s0"].auto_settings is None
    run = plan["phantom-auto-dgst-k3-s0"]
    assert run.auto_settings == variant
    assert "patience 2" in config.learning_rate_wording()

    used = []

    def fake_auto_fine_tune(checkpoint, parent, dataset, work_dir, base, auto, cases, device):
        used.append(auto)
        return "result", {"chosen_rate": auto.rates[0], "probes": [], "curve": [], "iterations_run": 5,
                          "best_iteration": 5, "best_dice": 0.5, "stop_reason": "no_improvement", "seconds": 1.0}

    monkeypatch.setattr(auto_module, "auto_fine_tune", fake_auto_fine_tune)
    result, schedule = fine_tune_automatically(run, {}, None, None, "cpu")
    assert used[-1] == AutoSchedule(rates=(1e-2, 3e-2), probe_iterations=5, patience=2)
    assert schedule["settings"]["rates"] == [1e-2, 3e-2] and schedule["settings"]["check_every"] == 20
    default = BenchConfig(methods=("dgst",), shots=(3,), seeds=1, site_b_tests=1, site_a_tests=1,
                          crop_zyx=(8, 32, 32), schedule="auto").validate()
    fine_tune_automatically(plan_runs(default, tmp_path / "model", tmp_path / "w2", None, lambda _: None)[0],
                            {}, None, None, "cpu")
    assert used[-1] == AutoSchedule()


def test_folders_measured_before_a_setting_existed_resume_only_at_its_default(tmp_path):
    """Catches a resume that refuses every folder measured before `auto_settings` existed (their
    config.json lacks the key), or one that lets a schedule variant resume such a folder."""
    import json
    from dataclasses import asdict

    from LymphNodeDGSTLib.demo.bench_adapt import EXTENSIBLE_SETTINGS, open_output
    from LymphNodeDGSTLib.errors import UserInputError

    config = BenchConfig(methods=("none", "dgst"), shots=(3,), seeds=1, schedule="auto").validate()
    output = tmp_path / "out"
    open_output(output, {"config": asdict(config)}, resume=False, extensible=EXTENSIBLE_SETTINGS)
    stored = json.loads((output / "config.json").read_text())
    del stored["config"]["auto_settings"]           # as written before the setting existed
    (output / "config.json").write_text(json.dumps(stored))
    open_output(output, {"config": asdict(config)}, resume=True, extensible=EXTENSIBLE_SETTINGS)
    (output / "config.json").write_text(json.dumps(stored))
    config.auto_settings = {"patience": 2}
    with pytest.raises(UserInputError, match="other settings"):
        open_output(output, {"config": asdict(config)}, resume=True, extensible=EXTENSIBLE_SETTINGS)


def test_the_package_does_not_import_the_childs_entry_point():
    """Catches `bench_adapt/__init__.py` importing `runs` at import time: the child is started as
    `python -m ...bench_adapt.runs`, and runpy then writes a RuntimeWarning into every run log."""
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-c", "import sys, LymphNodeDGSTLib.demo.bench_adapt; "
                                "print('LymphNodeDGSTLib.demo.bench_adapt.runs' in sys.modules)"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"

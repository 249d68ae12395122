"""The Slicer panel's logic without Qt (LymphNodeDGSTLib.slicer_bridge: state, job following, sections) and the first-use dependency plan
(LymphNodeDGSTLib.slicer_bridge.dependencies): state machine, job following with real worker processes, tables,
training cases, background segmentation and installs, and the scene side with slicer-core."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, make_ct
from LymphNodeDGSTLib.slicer_bridge import (adapt_section, cases_section, dependencies, environment, job_following, model_section, panel_state, segment_section)
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.jobs.manager import JobManager
from LymphNodeDGSTLib.slicer_bridge.panel_state import PanelState

# Workers import this file for the fake_training job kind: torch-importing core modules
# (models, cases' callers) are imported inside the tests to keep those workers quick.

TESTING = Path(__file__).resolve().parent
TEST_ENV = {"PYTHONPATH": str(TESTING)}  # workers import jobkinds_for_tests and this file's jobs
S = PanelState


# --------------------------------------------------------------------------- job kinds
def fake_training(params: dict, reporter) -> dict:
    """Job kind "test_panel:fake_training": what an adaptation reports, with known numbers."""
    epochs, per_epoch = int(params["epochs"]), int(params["per_epoch"])
    total = epochs * per_epoch
    reporter.log("fake training")
    for done in range(1, total + 1):
        reporter.check_cancelled()
        time.sleep(float(params.get("interval", 0.02)))
        reporter.progress(done, total, stage="train", loss=1.0 - done / (2 * total))
        if done % per_epoch == 0:
            epoch = done // per_epoch
            reporter.metric("train_loss", 1.0 / epoch, epoch=epoch)
            reporter.metric("pseudo_dice", epoch / 10, epoch=epoch)
    reporter.metric("dice_before", 0.5)
    return {"trained": total}


def follow_to_end(follower: job_following.JobFollower, timeout: float = 120.0, poll: float = 0.05):
    """Poll like the widget's QTimer until the job ends: (all events, every summary seen)."""
    events, summaries = [], []
    deadline = time.monotonic() + timeout
    while True:
        new, summary = follower.poll()
        events += new
        summaries.append(summary)
        if summary.finished:
            return events, summaries
        assert time.monotonic() < deadline, f"job still running: {summary.status_text()}"
        time.sleep(poll)


@pytest.fixture
def manager(tmp_path) -> JobManager:
    return JobManager(tmp_path / "jobs")


# --------------------------------------------------------------------------- state machine
@pytest.mark.parametrize("start", list(S))
@pytest.mark.parametrize("target", list(S))
def test_only_the_allowed_transitions_happen(start, target):
    machine = panel_state.PanelStateMachine()
    machine.state = start
    if target in panel_state.ALLOWED_TRANSITIONS[start]:
        machine._go(target)
        assert machine.state is target
    else:
        with pytest.raises(panel_state.InvalidTransition):
            machine._go(target)
        assert machine.state is start


def test_apply_turns_into_cancel_then_cancelling_then_back():
    machine = panel_state.PanelStateMachine()
    idle = machine.controls()
    assert (idle.apply_text, idle.apply_enabled, idle.adapt_text, idle.adapt_enabled) == (
        "Apply", True, "Adapt to my site", True)
    assert idle.inputs_enabled and idle.model_actions_enabled and not idle.segment_progress_visible

    machine.start("segment")
    assert machine.state is S.SEGMENTING and machine.job_kind == "segment" and machine.busy
    running = machine.controls()
    assert (running.apply_text, running.apply_enabled) == ("Cancel", True)
    assert not running.adapt_enabled and not running.install_enabled
    assert not running.inputs_enabled and not running.model_actions_enabled
    assert running.segment_progress_visible and not running.adapt_progress_visible
    assert running.apply_tooltip == "Stop the segmentation"
    with pytest.raises(panel_state.InvalidTransition):
        machine.start("adapt")  # one job at a time

    machine.cancel()
    assert machine.state is S.CANCELLING and machine.job_kind == "segment"
    cancelling = machine.controls()
    assert (cancelling.apply_text, cancelling.apply_enabled) == ("Cancelling...", False)
    assert cancelling.segment_progress_visible and not cancelling.adapt_enabled
    with pytest.raises(panel_state.InvalidTransition):
        machine.cancel()

    machine.finish()
    assert machine.state is S.IDLE and machine.job_kind is None and machine.cancelling_from is None


def test_adapt_and_install_buttons_turn_into_cancel_too():
    machine = panel_state.PanelStateMachine()
    machine.start("adapt")
    controls = machine.controls()
    assert (controls.adapt_text, controls.adapt_enabled) == ("Cancel", True)
    assert (controls.apply_text, controls.apply_enabled) == ("Apply", False)
    assert controls.adapt_progress_visible and not controls.segment_progress_visible
    machine.finish()
    machine.start("install")
    controls = machine.controls()
    assert (controls.install_text, controls.install_enabled) == ("Cancel", True)
    assert not controls.apply_enabled and not controls.adapt_enabled
    machine.cancel()
    assert machine.controls().install_text == "Cancelling..."
    with pytest.raises(ValueError):
        panel_state.PanelStateMachine().start("train")


def test_blockers_disable_the_buttons_and_say_why():
    assert panel_state.segment_blocker(has_input=True, has_model=True) is None
    assert "install one" in panel_state.segment_blocker(has_input=True, has_model=False)
    assert "Select the CT" in panel_state.segment_blocker(has_input=False, has_model=True)
    assert panel_state.adapt_blocker(has_model=True, case_count=1) is None
    assert "case library is empty" in panel_state.adapt_blocker(has_model=True, case_count=0)
    controls = panel_state.PanelStateMachine().controls(
        panel_state.segment_blocker(False, True), panel_state.adapt_blocker(True, 0))
    assert not controls.apply_enabled and controls.apply_tooltip == "Select the CT volume to segment."
    assert not controls.adapt_enabled and "case library is empty" in controls.adapt_tooltip
    assert controls.install_enabled  # installing a model is what unblocks the others


# --------------------------------------------------------------------------- following jobs
def test_follower_reads_the_events_file_incrementally(manager, monkeypatch):
    """Issue 22, defect 6. Catches the poll re-reading the whole events.ndjson every 500 ms (a
    long adaptation writes thousands of lines): after the first poll, every read starts where the
    last one stopped."""
    from LymphNodeDGSTLib.jobs import manager as manager_module

    reads = []
    real = manager_module.read_events

    def recording(path, offset=0):
        reads.append(offset)
        return real(path, offset)

    monkeypatch.setattr(manager_module, "read_events", recording)
    job = manager.submit("test_panel:fake_training", {"epochs": 3, "per_epoch": 10}, env=TEST_ENV)
    follower = job_following.JobFollower(manager, job.id)
    reads.clear()  # from here on: the panel's polls only
    events, summaries = follow_to_end(follower)
    assert summaries[-1].state == "done" and len(summaries) > 3 and len(events) > 10
    assert len(reads) == len(summaries)  # one read per poll, none of the whole file besides
    assert reads == sorted(reads) and reads[-1] > 0  # each read starts where the last one stopped


def test_follower_ends_once_when_the_events_cannot_be_read(manager):
    """Issue 22, defect 7. Catches an OSError (events.ndjson replaced by a folder, a disk gone)
    escaping the poll at every tick: the job ends as failed, once, with the reason."""
    job = manager.submit("test_panel:fake_training", {"epochs": 1, "per_epoch": 200, "interval": 0.05},
                         env=TEST_ENV)
    follower = job_following.JobFollower(manager, job.id)
    follower.poll()
    manager.cancel(job.id)
    events = job.folder / "events.ndjson"
    events.unlink()
    events.mkdir()
    events_seen, summary = follower.poll()
    assert summary.finished and summary.state == "failed" and "cannot read" in summary.error
    assert events_seen == []


def test_follower_gives_progress_eta_loss_and_the_live_curve(manager):
    job = manager.submit("test_panel:fake_training", {"epochs": 3, "per_epoch": 4}, env=TEST_ENV)
    follower = job_following.JobFollower(manager, job.id)
    events, summaries = follow_to_end(follower)

    assert events == manager.events(job.id)[0]  # each event delivered once, none lost
    final = summaries[-1]
    assert final.state == "done" and final.result == {"trained": 12} and final.error is None
    assert final.kind == "test_panel:fake_training"
    assert final.curve == [(1, 1.0, 0.1), (2, 0.5, 0.2), (3, 1 / 3, 0.3)]
    assert final.stage == "train" and (final.done, final.total) == (12, 12)
    assert final.loss == pytest.approx(0.5) and final.percent == 100
    assert final.last_log == "fake training" and final.status_text() == "Done."
    running = [s for s in summaries if s.state == "running" and s.total]
    assert running, "the job was never seen running"
    fractions = [s.fraction for s in running]
    assert fractions == sorted(fractions) and all(0 < f <= 1 for f in fractions)
    with_eta = [s for s in running if s.eta_s is not None]
    assert with_eta and all(s.eta_text.endswith("left") for s in with_eta)
    assert with_eta[-1].status_text().startswith(f"train {with_eta[-1].done}/12 - ")
    assert " - loss " in with_eta[-1].status_text()


def test_cancel_returns_at_once_and_the_poll_sees_the_job_cancelled(manager):
    job = manager.submit("jobkinds_for_tests:count", {"steps": 400, "interval": 0.05}, env=TEST_ENV)
    follower = job_following.JobFollower(manager, job.id)
    deadline = time.monotonic() + 15
    while not (follower.poll()[1].done or 0) >= 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.perf_counter()
    thread = follower.cancel(timeout=10.0)
    assert time.perf_counter() - started < 0.2  # the GUI thread is not held
    _, summaries = follow_to_end(follower, timeout=20)
    thread.join(5)
    assert summaries[-1].state == "cancelled" and summaries[-1].status_text() == "Cancelled."
    assert summaries[-1].done < 400


def test_failures_out_of_memory_and_a_vanished_job(manager):
    crashed = job_following.JobFollower(manager, manager.submit("jobkinds_for_tests:crash", {}, env=TEST_ENV).id)
    summary = follow_to_end(crashed)[1][-1]
    assert summary.state == "failed" and "ZeroDivisionError" in summary.error
    assert summary.status_text().startswith("Failed: ZeroDivisionError")
    assert job_following.failure_text("segment", summary).startswith("The segmentation failed: ZeroDivision")
    assert not summary.out_of_memory

    oom = job_following.JobFollower(manager, manager.submit("jobkinds_for_tests:out_of_memory", {},
                                                    env=TEST_ENV).id)
    summary = follow_to_end(oom)[1][-1]
    assert summary.state == "failed" and summary.out_of_memory
    assert "fewer iterations or the CPU" in job_following.failure_text("adapt", summary)

    import shutil
    shutil.rmtree(oom.manager.root / oom.job_id)
    events, gone = oom.poll()
    assert events == [] and gone.state == "failed" and "no job" in gone.error


def test_running_job_finds_a_job_started_earlier(manager):
    kind = "jobkinds_for_tests:count"
    assert job_following.running_job(manager, (kind,)) is None
    job = manager.submit(kind, {"steps": 400, "interval": 0.05}, env=TEST_ENV)
    assert job_following.running_job(manager, (kind,)).id == job.id
    assert job_following.running_job(manager, ("adapt",)) is None
    manager.cancel(job.id)
    assert job_following.running_job(manager, (kind,)) is None


@pytest.mark.parametrize("seconds, text", [
    (None, ""), (float("nan"), ""), (-1, ""), (0.2, "1 s left"), (44.6, "45 s left"),
    (60, "about 1 min left"), (185, "about 3 min left"), (3599, "about 1 h 00 min left"),
    (3900, "about 1 h 05 min left")])
def test_eta_text(seconds, text):
    assert job_following.format_eta(seconds) == text


def test_live_curve_png_has_the_asked_size(tmp_path):
    from PIL import Image

    path = job_following.write_curve_png([(1, 0.9, None), (2, 0.7, 0.4), (3, None, 0.5)], tmp_path / "c" / "curve.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (360, 180)
        colours = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 10  # something was drawn
    with Image.open(job_following.write_curve_png([], tmp_path / "empty.png", 200, 100)) as image:
        assert image.size == (200, 100)


# --------------------------------------------------------------------------- tables
def test_model_rows_mark_the_active_version_and_show_adapted_ones(installed_home, tiny_model_folder):
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    store = ModelStore(installed_home / "models")
    store.add_version("tiny", tiny_model_folder, {
        "kind": "adapted", "parent": 1, "method": "dgst",
        "metrics": {"dice_before": 0.5, "dice_after": 0.6125, "evaluation_is_held_out": True}},
        activate_if_first=False)
    rows = model_section.model_rows(store)
    assert [(r.ref, r.active, r.parent, r.method, r.dice) for r in rows] == [
        ("tiny@1", True, "", "", ""), ("tiny@2", False, "@1", "dgst", "0.500 -> 0.613")]
    assert rows[0].cells()[:2] == ["*", "tiny@1"] and rows[1].cells()[0] == ""
    assert len(rows[0].cells()) == len(model_section.MODEL_COLUMNS)
    assert len(rows[1].cells()[5]) == 16  # "YYYY-MM-DD HH:MM"
    store.activate("tiny", 2)
    assert [r.active for r in model_section.model_rows(store)] == [False, True]
    assert model_section.dice_text({"dice_before": 0.5, "dice_after": 0.4, "evaluation_is_held_out": False}) \
        == "0.500 -> 0.400 (training cases)"

    assert model_section.selected_model_name(rows, None) == "tiny"
    assert model_section.selected_model_name(rows, 1) == "tiny"
    store.install(tiny_model_folder, name="other", show_progress=False)
    rows = model_section.model_rows(store)
    with pytest.raises(UserInputError, match="Several models"):
        model_section.selected_model_name(rows, None)
    assert model_section.selected_model_name(rows, 0) == "other"
    with pytest.raises(UserInputError, match="No model installed"):
        model_section.selected_model_name([], None)


def test_training_case_from_a_mask_and_its_row(tmp_path):
    from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary

    library = CaseLibrary(tmp_path / "cases")
    ct = make_ct(origin=(10.0, -20.0, 5.0))
    mask = np.zeros(sitk.GetArrayViewFromImage(ct).shape, dtype=bool)
    mask[10:14, 20:30, 25:35] = True
    record = cases_section.save_training_case(library, ct, mask, case_id="neck-1")
    assert record.id == "neck-1" and record.metadata["label_voxels"] == 400
    stored = sitk.ReadImage(str(record.label_path))
    assert np.array_equal(sitk.GetArrayFromImage(stored), mask.astype(np.uint8))
    assert stored.GetOrigin() == pytest.approx(ct.GetOrigin())
    assert stored.GetSpacing() == pytest.approx(ct.GetSpacing())
    with pytest.raises(UserInputError, match="grid"):
        cases_section.save_training_case(library, make_ct(seed=1), mask[:, :, :10])

    (row,) = cases_section.case_rows(library)
    assert (row.id, row.size, row.spacing) == ("neck-1", "64x64x24", "1.50x1.50x3.00")
    assert row.node_volume_ml == f"{400 * 1.5 * 1.5 * 3.0 / 1000:.2f}"
    assert len(row.added) == 16 and len(row.cells()) == len(cases_section.CASE_COLUMNS)


def test_training_segment_choice():
    choose = cases_section.choose_training_segment
    segments = [("Segment_1", "lymph node"), ("Segment_2", "vessel")]
    assert choose(segments, "Segment_2") == "Segment_2"         # selected in the editor
    assert choose(segments, None) == "Segment_1"                # the one named "lymph node"
    assert choose(segments, "gone") == "Segment_1"
    assert choose([("S", "my nodes")], None) == "S"             # the only one
    with pytest.raises(UserInputError, match="several segments"):
        choose([("A", "a"), ("B", "b")], None)
    with pytest.raises(UserInputError, match="no segment"):
        choose([], None)


def test_node_report_csv_round_trip_ras_centroid_and_cells(tmp_path):
    from LymphNodeDGSTLib.engine.segmentation.nodes import node_report, write_node_csv

    ct = make_ct(origin=(30.0, -40.0, 12.0))
    label = sitk.Cast(sitk.BinaryThreshold(ct, 60, 200), sitk.sitkUInt8)
    report = node_report(label, ct)
    rows = segment_section.read_node_csv(write_node_csv(report, tmp_path / "nodes.csv"))
    assert len(rows) == len(report) > 0
    for row, expected in zip(rows, report):
        assert row["id"] == expected.id and isinstance(row["id"], int)
        assert row["enlarged"] is expected.enlarged
        assert row["volume_mm3"] == pytest.approx(expected.volume_mm3, abs=0.006)
        assert segment_section.node_centroid_ras(row) == pytest.approx(
            (-expected.centroid_x_mm, -expected.centroid_y_mm, expected.centroid_z_mm), abs=6e-4)
    cells = segment_section.node_table_cells(rows + [{"id": 9, "mean_hu": None, "enlarged": False}])
    assert cells[0][0] == str(report[0].id) and cells[0][1] == f"{report[0].volume_mm3:.0f}"
    assert cells[-1] == ["9", "", "", "", "", ""]
    assert len(cells[0]) == len(segment_section.NODE_TABLE_COLUMNS)


# --------------------------------------------------------------------------- jobs the panel starts
def test_background_segmentation_with_the_tiny_model(installed_home):
    home = Home(installed_home)
    manager = JobManager(home.jobs)
    files = segment_section.new_segmentation_files(home)
    assert files.folder.parent == home.scratch / "slicer"
    with pytest.raises(UserInputError, match="not written"):
        segment_section.submit_segmentation(manager, home, files)
    ct = make_ct()
    sitk.WriteImage(ct, str(files.input), False)
    job = segment_section.submit_segmentation(manager, home, files, model="tiny", device="cpu", fast=True)
    assert job.spec["params"] == {**segment_section.segment_job_params(files, home, "tiny", "cpu", True),
                                  "model": "tiny"}
    events, summaries = follow_to_end(job_following.JobFollower(manager, job.id))
    final = summaries[-1]
    assert final.state == "done", final.error
    assert final.result["model"] == "tiny@1" and final.result["device"] == "cpu"
    assert "predict" in {e.get("stage") for e in events if e["type"] == "progress"}
    label = sitk.ReadImage(str(files.output))
    assert label.GetSize() == ct.GetSize()
    assert len(segment_section.read_node_csv(files.nodes_csv)) == final.result["nodes"]
    files.remove()
    assert not files.folder.exists()


def test_model_install_job_from_a_folder_and_a_bad_source(home, tiny_model_folder, tmp_path):
    from LymphNodeDGSTLib.jobs.events import Reporter, read_events
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    home = Home(home)
    manager = JobManager(home.jobs)
    with pytest.raises(UserInputError, match="Give a model"):
        model_section.install_job_params(home, "  ")
    params = model_section.install_job_params(home, str(tiny_model_folder), name="mine")
    job = manager.submit(model_section.INSTALL_JOB_KIND, params)
    summary = follow_to_end(job_following.JobFollower(manager, job.id))[1][-1]
    assert summary.state == "done", summary.error
    assert summary.result == {"version": "mine@1", "active": True}
    assert ModelStore(home.models).active_version("mine") == 1

    # The job function itself, in this process (a worker each would cost seconds of imports).
    (tmp_path / "direct").mkdir()
    reporter = Reporter(tmp_path / "direct")
    (tmp_path / "refused").mkdir()
    with pytest.raises(UserInputError, match="already installed as mine@1; choose that version"):
        model_section.install_model(params, Reporter(tmp_path / "refused"))
    assert model_section.install_model({**params, "force": True}, reporter) == {"version": "mine@2", "active": False}
    progress = [e for e in read_events(tmp_path / "direct" / "events.ndjson")[0] if e["type"] == "progress"]
    assert [(e["stage"], e["done"], e["total"]) for e in progress] == [("install", 0, 1), ("install", 1, 1)]
    with pytest.raises(UserInputError, match="not found"):
        model_section.install_model(model_section.install_job_params(home, str(home.root / "nowhere.zip")), reporter)


def test_adaptation_is_checked_pinned_and_never_activated_by_the_job(installed_home):
    from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    home = Home(installed_home)
    manager = JobManager(home.jobs)
    request = adapt_section.adapt_request("tiny", iterations=3, device="cpu", iterations_per_epoch=1)
    from LymphNodeDGSTLib.adaptation.methods import DEFAULT_METHOD

    assert (request.method, request.gamma, request.activation) == (DEFAULT_METHOD, 2, "never")
    with pytest.raises(ValueError):
        adapt_section.adapt_request("tiny", activation="auto")
    with pytest.raises(UserInputError, match="case library is empty"):
        adapt_section.submit_adaptation(manager, home, request)
    assert manager.list() == []  # nothing started

    ct = make_ct()
    cases_section.save_training_case(CaseLibrary(home.cases), ct, sitk.GetArrayFromImage(ct) == 80)
    job = adapt_section.submit_adaptation(manager, home, request)
    spec = job.spec
    assert spec["kind"] == "adapt" and spec["exclusive_device"] and spec["device"] == "cpu"
    assert spec["params"]["home"] == str(home.root)
    assert spec["params"]["request"]["model"] == "tiny@1"  # the parent is pinned
    assert spec["params"]["request"]["activation"] == "never"
    assert request.model == "tiny"  # the caller's request is left as it was
    follower = job_following.JobFollower(manager, job.id)
    follower.cancel().join(30)
    assert follow_to_end(follower, timeout=30)[1][-1].state == "cancelled"
    assert [v.version for v in ModelStore(home.models).versions("tiny")] == [1]


def test_adaptation_outcome_offers_the_choice():
    result = {"version": "demo@3", "parent": "demo@2", "activated": False, "dice_before": 0.61,
              "dice_after": 0.7, "evaluation_is_held_out": True,
              "report": "/x/adaptation_report.json", "figure": "/x/adaptation_report.png"}
    outcome = adapt_section.adaptation_outcome(result)
    assert outcome.recommended and outcome.name_and_version() == ("demo", 3)
    assert outcome.figure == Path("/x/adaptation_report.png")
    assert outcome.text() == ("demo@3 (adapted from demo@2): Dice on held-out cases 0.610 -> 0.700 "
                              "(+0.090). The adapted model is no worse: using it is recommended.")
    worse = adapt_section.adaptation_outcome({**result, "dice_after": 0.5, "evaluation_is_held_out": False,
                                      "figure": None})
    assert not worse.recommended and worse.figure is None
    assert "training cases" in worse.text() and "keeping the current model" in worse.text()
    assert "demo@2" in worse.kept_text() and "demo@3" in worse.kept_text()


def test_worker_python_prefers_slicers_own_and_home_setting(tmp_path, monkeypatch):
    assert environment.worker_python(lambda name: "/slicer/bin/PythonSlicer") == "/slicer/bin/PythonSlicer"
    assert environment.worker_python(lambda name: None, "/usr/bin/python3") == "/usr/bin/python3"
    assert environment.worker_python(lambda name: None) == sys.executable
    monkeypatch.setenv("LNDGST_HOME", str(tmp_path / "env-home"))
    assert environment.home_from_setting("").root == tmp_path / "env-home"
    assert environment.home_from_setting(None).root == tmp_path / "env-home"
    assert environment.home_from_setting(str(tmp_path / "chosen")).root == tmp_path / "chosen"


def test_constants_match_the_core():
    from LymphNodeDGSTLib.engine.segmentation.devices import DEVICE_CHOICES
    from LymphNodeDGSTLib.adaptation.dgst import POLICY_NAMES

    assert segment_section.DEVICE_CHOICES == DEVICE_CHOICES
    from LymphNodeDGSTLib.adaptation.methods import DEFAULT_METHOD, METHODS, SPARSE_METHODS
    from LymphNodeDGSTLib.adaptation.dgst import SPARSE_POLICY_NAMES

    assert set(METHODS) == set(POLICY_NAMES) and METHODS[0] == DEFAULT_METHOD  # the panel's choices
    assert set(SPARSE_METHODS) == set(SPARSE_POLICY_NAMES)
    assert model_section.device_text("cpu").startswith("Device: CPU (")
    assert "No GPU will be used" in model_section.device_text("cpu")


# --------------------------------------------------------------------------- scene side (slicer-core)
def test_scene_side_segment_import_and_save_case(installed_home, tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML library) is not installed")
    import vtk
    from LymphNodeDGSTLib.slicer_bridge import mrml
    from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
    from LymphNodeDGSTLib.engine.store.models import ModelStore
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
    from LymphNodeDGSTLib.engine.segmentation.nodes import node_report

    scene = slicer.vtkMRMLScene()
    ct = make_ct(origin=(30.0, -40.0, 12.0))
    volume = mrml.sitk_image_to_volume_node(ct, scene, "CT")

    # Input written for a job is the CT exactly as SimpleITK would read it.
    files = segment_section.new_segmentation_files(Home(installed_home))
    written = sitk.ReadImage(str(segment_section.write_segmentation_input(volume, files)))
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(ct))
    assert written.GetOrigin() == pytest.approx(ct.GetOrigin())

    # A finished job's files come into the scene as a segment and a table.
    mask = (sitk.GetArrayFromImage(ct) > 60) & (sitk.GetArrayFromImage(ct) < 200)
    label = sitk.GetImageFromArray(mask.astype(np.uint8))
    label.CopyInformation(ct)
    sitk.WriteImage(label, str(files.output))
    from LymphNodeDGSTLib.engine.segmentation.nodes import write_node_csv
    write_node_csv(node_report(label, ct), files.nodes_csv)
    segmentation, table, rows = segment_section.import_segmentation_result(files, volume, scene)
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(segment_section.LYMPH_NODE_SEGMENT)
    assert segment_id and segmentation.GetName() == "CT lymph nodes"
    terminology = vtk.reference("")
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetTag("TerminologyEntry", terminology)
    assert str(terminology) == mrml.LYMPH_NODE_TERMINOLOGY
    assert table.GetNumberOfRows() == len(rows) > 0 and table.GetName() == "CT lymph node report"
    assert table.GetColumnUnitLabel("volume_mm3") == "mm3"
    exported = mrml.segmentation_to_label_array(segmentation, segment_id, volume)
    assert np.array_equal(exported, mask.astype(np.uint8))

    # A correction (another mask into the same nodes), then "Save as training case".
    corrected = np.zeros_like(mask)
    corrected[8:16, 20:28, 30:40] = True
    again, same_table = segment_section.show_segmentation_result(corrected, volume, scene, rows[:1],
                                                       segmentation, table)
    assert again is segmentation and same_table is table and table.GetNumberOfRows() == 1
    library = CaseLibrary(tmp_path / "cases")
    record = cases_section.save_case_from_segmentation(library, volume, segmentation, None, "fixed")
    assert record.id == "fixed"
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(record.label_path))), corrected)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(record.image_path))),
                          sitk.GetArrayFromImage(ct))

    # In-process segmentation (the self-test's path) gives the report's rows and the table.
    segmenter = Segmenter(ModelStore(installed_home / "models"), device="cpu")
    segmentation2, table2, rows2 = segment_section.segment_in_process(segmenter, volume, scene, "tiny", fast=True)
    expected = [asdict(r) for r in node_report(sitk.ReadImage(str(files.output)), ct)]
    assert segmentation2 is not segmentation and table2.GetNumberOfRows() == len(rows2)
    assert all(set(row) == set(expected[0]) for row in rows2)
    files.remove()


# --------------------------------------------------------------------------- dependencies
def _fake_find_spec(present: set[str]):
    def find_spec(module: str):
        if module == "broken":
            raise ValueError("half-installed")
        return object() if module in present else None
    return find_spec


ALL_MODULES = {r.module for r in dependencies.REQUIREMENTS}


def test_python_version_check():
    assert dependencies.python_problem((3, 12, 4)) is None
    assert dependencies.python_problem((3, 10, 0)) is None
    message = dependencies.python_problem((3, 9, 10))
    assert "3.9.10" in message and "Python 3.10 or later" in message and "5.10" in message
    plan = dependencies.plan_installation(True, _fake_find_spec(ALL_MODULES), (3, 9, 10))
    assert not plan.ready and plan.blocker() == message


def test_missing_packages_and_the_install_plan():
    find_spec = _fake_find_spec(ALL_MODULES - {"torch", "nnunetv2", "peft"})
    missing = dependencies.missing_requirements(find_spec)
    assert [r.module for r in missing] == ["torch", "nnunetv2", "peft"]
    assert [r.module for r in dependencies.missing_requirements(find_spec, include_optional=False)] \
        == ["torch", "nnunetv2"]
    assert dependencies.missing_requirements(lambda m: (_ for _ in ()).throw(ValueError())) \
        == list(dependencies.REQUIREMENTS)  # a broken package counts as missing

    plan = dependencies.plan_installation(True, find_spec, (3, 12, 0))
    assert plan.install_torch and not plan.ready and plan.blocker() is None
    assert plan.pip_requirements == ["nnunetv2==2.8.1"]  # peft: on its own, when LoRA is chosen
    assert plan.pip_arguments("/tmp/c.txt") == ["--constraint", "/tmp/c.txt", "nnunetv2==2.8.1"]
    assert plan.manual_command("/tmp/c.txt") == (
        "PythonSlicer -m pip install --constraint /tmp/c.txt nnunetv2==2.8.1")
    text = plan.confirmation_text()
    assert "torch" in text and "nnunetv2" in text and "PyTorch extension" in text
    assert "SimpleITK and numpy are kept" in text
    assert "Missing Python packages: torch, nnunetv2." in plan.status_text()

    no_extension = dependencies.plan_installation(False, find_spec, (3, 12, 0))
    assert "Extensions Manager" in no_extension.blocker()
    only_optional = dependencies.plan_installation(False, _fake_find_spec(ALL_MODULES - {"peft"}))
    assert only_optional.ready and not only_optional.nothing_to_do and only_optional.blocker() is None
    assert only_optional.status_text().startswith("Ready. Optional")
    no_sitk = dependencies.plan_installation(True, _fake_find_spec(ALL_MODULES - {"SimpleITK"}))
    assert "reinstall 3D Slicer" in no_sitk.blocker() and no_sitk.pip_requirements == []
    assert dependencies.plan_installation(True).nothing_to_do  # this environment has everything
    assert dependencies.plan_installation(True).status_text().startswith("All required")


def test_pins_agree_with_the_projects_requirements():
    pins = {line.split("==")[0].split(">=")[0]: line.strip()
            for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    for requirement in dependencies.REQUIREMENTS:
        if requirement.source == "pip":
            assert pins[requirement.module] == requirement.specifier


def test_constraints_pin_slicers_packages_and_pip_accepts_them(tmp_path):
    text = dependencies.constraints_text({"numpy": "1.26.4", "SimpleITK": "2.4.0",
                                          "torch": "2.5.1+cu121"})
    assert text.splitlines()[1:] == ["numpy==1.26.4", "SimpleITK==2.4.0", "torch==2.5.1+cu121"]
    with pytest.raises(ValueError):
        dependencies.constraints_text({"numpy": "1.0; rm -rf /"})

    installed = dependencies.installed_versions()
    for name in ("numpy", "SimpleITK", "torch"):
        assert installed[name] == importlib.metadata.version(name)
    assert dependencies.installed_versions(("surely-not-installed-lndgst",)) == {}
    path = dependencies.write_constraints(tmp_path / "constraints.txt")
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert f"numpy=={installed['numpy']}" in lines and f"SimpleITK=={installed['SimpleITK']}" in lines
    # pip reads the file and finds everything pinned already satisfied (offline, nothing changes).
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--disable-pip-version-check",
         "--constraint", str(path), "numpy", "SimpleITK"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "already satisfied" in completed.stdout and "Would install" not in completed.stdout


@pytest.mark.parametrize("output, expected", [
    ("WARNING: Retrying ... NewConnectionError('<...>: Failed to establish a new connection: "
     "[Errno -3] Temporary failure in name resolution')", "seems to be offline"),
    ("ProxyError('Cannot connect to proxy.', OSError('Tunnel connection failed: 407 Proxy "
     "Authentication Required'))", "HTTPS_PROXY"),
    ("SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
     "failed: self signed certificate in certificate chain'))", "PIP_CERT"),
    ("ERROR: Cannot install nnunetv2 because these package versions have conflicting dependencies.\n"
     "ERROR: ResolutionImpossible", "never replaces"),
    ("ERROR: No matching distribution found for nnunetv2==2.8.1", "found no version"),
    ("something else\nERROR: disk full\n", "failed: ERROR: disk full"),
    # uv (newer Slicer's installer)
    ("error: Failed to fetch: `https://pypi.org/simple/nnunetv2/`\n  Caused by: error sending request "
     "for url\n  Caused by: dns error: failed to lookup address information: Temporary failure in "
     "name resolution", "seems to be offline"),
    ("Caused by: invalid peer certificate: UnknownIssuer", "PIP_CERT"),
    ("  x No solution found when resolving dependencies:\n  `-> Because nnunetv2==2.8.1 depends on "
     "numpy>=3 ...", "never replaces"),
])
def test_install_failures_are_explained(output, expected):
    message = dependencies.explain_install_failure(output, "PythonSlicer -m pip install x")
    assert expected in message
    if expected in ("seems to be offline", "HTTPS_PROXY"):
        assert "--no-index --find-links FOLDER" in message


def test_installer_output_is_taken_from_the_exception():
    error = subprocess.CalledProcessError(1, ["pip"], output="stdout text", stderr=b"stderr text")
    assert dependencies.failure_output(error) == "stdout text\nstderr text"
    assert dependencies.failure_output(RuntimeError("plain")) == "plain"


def test_gpu_advice():
    assert dependencies.gpu_advice("cuda", "12.4") is None
    assert "CPU-only build" in dependencies.gpu_advice("cpu", None)
    assert "CUDA 12.4" in dependencies.gpu_advice("cpu", "12.4") and "nvidia-smi" in \
        dependencies.gpu_advice("cpu", "12.4")


def test_node_centroids_land_on_the_node_in_world_ras_and_the_editor_node_is_a_singleton():
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML library) is not installed")
    import vtk
    from LymphNodeDGSTLib.slicer_bridge import mrml
    from LymphNodeDGSTLib.engine.segmentation.nodes import node_report

    scene = slicer.vtkMRMLScene()
    ct = make_ct(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1), origin=(80.0, 60.0, -30.0))
    volume = mrml.sitk_image_to_volume_node(ct, scene, "CT")
    label = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    label.CopyInformation(ct)
    label[40, 10, 5] = 1  # one voxel: index (i, j, k)
    (row,) = [asdict(r) for r in node_report(label, ct)]
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    expected = ijk_to_ras.MultiplyPoint((40, 10, 5, 1))[:3]
    assert segment_section.node_centroid_world(row, volume) == pytest.approx(expected, abs=1e-3)

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 5.0)
    shift.SetElement(2, 3, -2.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    moved = (expected[0] + 5.0, expected[1], expected[2] - 2.0)
    assert segment_section.node_centroid_world(row, volume) == pytest.approx(moved, abs=1e-3)
    assert segment_section.node_centroid_world(row, None) == pytest.approx(expected, abs=1e-3)

    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())  # Slicer registers it at startup
    editor = segment_section.segment_editor_node(scene)
    assert segment_section.segment_editor_node(scene) is editor and editor.GetSingletonTag() == "LymphNodeDGST"
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == 1


def test_model_section_exports_and_installs_site_adapters_and_fold_checkpoints(installed_home, tmp_path):
    """The panel's adapter actions use the same store calls as the CLI. Catches: exporting the
    wrong table row, the install job ignoring 'adapter' (it would try to install the file as a
    model), several ';'-separated fold checkpoints taken as one path."""
    import json

    from LymphNodeDGSTLib.engine.store.architectures import write_results_folder
    from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
    from LymphNodeDGSTLib.engine.store.models import ModelStore
    from LymphNodeDGSTLib.jobs.events import Reporter
    from test_checkpoint_install import nnunet_checkpoint

    home = Home(installed_home)
    store = ModelStore(home.models)
    tiny = store.resolve("tiny@1")
    weights = load_checkpoint(tiny.path / "fold_0" / "checkpoint_final.pth")["network_weights"]
    weights["decoder.seg_layers.2.bias"] += 1.0
    adapted = write_results_folder(tmp_path / "adapted", json.loads((tiny.path / "plans.json").read_text()),
                                   json.loads((tiny.path / "dataset.json").read_text()), weights)
    store.add_version("tiny", adapted, {"kind": "adapted", "parent": 1}, activate_if_first=False)
    rows = model_section.model_rows(store)
    with pytest.raises(UserInputError, match="Select an adapted version"):
        model_section.export_adapter_for_row(store, rows, None, tmp_path / "a.safetensors")
    with pytest.raises(UserInputError, match="no parent"):
        model_section.export_adapter_for_row(store, rows, [r.ref for r in rows].index("tiny@1"), tmp_path / "a.safetensors")
    text = model_section.export_adapter_for_row(store, rows, [r.ref for r in rows].index("tiny@2"), tmp_path / "a.safetensors")
    assert "Wrote tiny@2 as a site adapter" in text

    other = Home(tmp_path / "other")
    ModelStore(other.models).install(tiny.path, name="base", show_progress=False)
    (tmp_path / "job").mkdir()
    reporter = Reporter(tmp_path / "job")
    params = model_section.install_job_params(other, str(tmp_path / "a.safetensors"), adapter=True)
    assert model_section.install_model(params, reporter) == {"version": "base@2", "active": False}

    folds = [str(nnunet_checkpoint(tmp_path / f"f{f}" / "checkpoint_final.pth", fold=f, seed=f)) for f in (0, 1)]
    result = model_section.install_model(model_section.install_job_params(other, ";".join(folds), name="folds"), reporter)
    assert result == {"version": "folds@1", "active": True}
    assert ModelStore(other.models).resolve("folds").metadata["folds"] == ["0", "1"]

"""Background jobs: real detached worker processes, events, cancel, kill -9, device locks, CLI,
and the segment job end to end with the tiny model."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_ct, run_cli, wait_for
from LymphNodeDGSTLib.jobs import device_lock, process_tree
from LymphNodeDGSTLib.jobs import events as job_events
from LymphNodeDGSTLib.jobs import manager as jobs, segment_job
from LymphNodeDGSTLib.errors import Cancelled, UserInputError
from LymphNodeDGSTLib.jobs.device_lock import (DeviceBusy, acquire_device_lock, device_lock_path, read_device_lock)
from LymphNodeDGSTLib.jobs.manager import JobManager
from LymphNodeDGSTLib.jobs.events import Reporter, read_events
from LymphNodeDGSTLib.jobs.process_tree import worker_environment
from LymphNodeDGSTLib.jobs.follow import follow_job

TESTING = Path(__file__).resolve().parent
TEST_ENV = {"PYTHONPATH": str(TESTING)}  # so workers can import jobkinds_for_tests
LONG = {"steps": 400, "interval": 0.05}  # 20 s: always stopped before it ends


@pytest.fixture
def manager(tmp_path) -> JobManager:
    return JobManager(tmp_path / "jobs")


def submit(manager: JobManager, name: str, params: dict | None = None, **options) -> job_events.JobInfo:
    return manager.submit(f"jobkinds_for_tests:{name}", params or {}, env=TEST_ENV, **options)


def wait_for_progress(manager: JobManager, job_id: str, done: int = 2) -> None:
    def reached():
        progress = manager.get(job_id).last_progress
        return progress is not None and progress["done"] >= done
    wait_for(reached, what=f"progress {done} of job {job_id}")


def all_events(manager: JobManager, job_id: str) -> list[dict]:
    return manager.events(job_id)[0]


# --------------------------------------------------------------------------- a job's life
def test_job_runs_to_done_with_ordered_events_files_and_a_progress_bar(manager, tmp_path):
    output = tmp_path / "out" / "count.txt"
    output.parent.mkdir()
    info = submit(manager, "count", {"steps": 10, "interval": 0.05, "output": str(output)})
    assert info.state == "running" and info.kind == "jobkinds_for_tests:count"
    assert job_events.JOB_ID_PATTERN.match(info.id)
    assert (info.folder / "job.json").is_file() and (info.folder / "worker.pid").is_file()

    shown = io.StringIO()
    assert follow_job(manager, info.id, file=shown, poll=0.05) == 0

    final = manager.get(info.id)
    assert final.state == "done" and final.error is None
    assert final.result == {"counted": 10, "output": str(output)}
    assert output.read_text() == "counted to 10\n"
    spec = json.loads((info.folder / "job.json").read_text())
    assert {"id", "kind", "created", "device", "params"} <= set(spec)
    assert spec["id"] == info.id and spec["device"] == "cpu" and spec["params"]["steps"] == 10
    assert int((info.folder / "worker.pid").read_text()) == final.pid
    wait_for(lambda: not process_tree.pid_alive(final.pid), timeout=5, what="the worker to exit")

    events = all_events(manager, info.id)
    assert events[0]["type"] == "log" and events[-1]["type"] == "done"
    assert [e["type"] for e in events].count("done") == 1
    assert not any(e["type"] == "error" for e in events)
    times = [dt.datetime.fromisoformat(e["time"]) for e in events]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    progress = [e for e in events if e["type"] == "progress"]
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert progress[0]["done"] == 0 and progress[-1]["done"] == progress[-1]["total"] == 10
    assert all(p["stage"] == "count" for p in progress)
    assert 0 <= progress[-2]["eta_s"] < 5
    metrics = [e for e in events if e["type"] == "metric"]
    assert [(m["name"], m["epoch"]) for m in metrics] == [("loss", 1), ("loss", 2)]

    text = shown.getvalue()
    assert "count" in text and "10/10" in text and "ETA" in text
    assert "loss = 0.2 (epoch 1)" in text and "counting to 10" in text
    assert f"job {info.id} done" in text


def test_reporter_computes_eta_from_iterations_and_throttles(tmp_path):
    now = [100.0]
    reporter = Reporter(tmp_path, clock=lambda: now[0], min_interval_s=1.0)
    reporter.progress(0, 10, stage="train")
    for done in range(1, 5):
        now[0] += 2.0  # 2 s per iteration
        reporter.progress(done, 10, stage="train")
    now[0] += 0.5
    reporter.progress(5, 10, stage="train")  # within min_interval_s of the last one: skipped
    now[0] += 1.5
    reporter.progress(10, 10, stage="train")  # the last is always written
    reporter.progress(0, 3, stage="validate")  # a new stage is always written
    events, _ = read_events(tmp_path / job_events.EVENTS_FILE)
    assert [(e["stage"], e["done"]) for e in events] == [
        ("train", 0), ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("train", 10),
        ("validate", 0)]
    assert events[4]["eta_s"] == pytest.approx(12.0)  # 6 left at 2 s each
    assert events[5]["eta_s"] == 0 and "eta_s" not in events[0] and "eta_s" not in events[6]


def test_events_are_read_incrementally_and_a_partial_line_waits(tmp_path):
    path = tmp_path / "events.ndjson"
    writer = job_events.EventWriter(path)
    writer.write("log", message="one")
    writer.write("metric", name="dice", value=np.float32(0.5), epoch=np.int64(1))
    first, offset = read_events(path)
    assert [e["type"] for e in first] == ["log", "metric"] and first[1]["value"] == 0.5
    with open(path, "a") as handle:
        handle.write('{"type": "progress", "done": 1')
    assert read_events(path, offset) == ([], offset)
    with open(path, "a") as handle:
        handle.write(', "total": 2, "time": "x"}\n')
    later, end = read_events(path, offset)
    assert later == [{"type": "progress", "done": 1, "total": 2, "time": "x"}]
    assert end == path.stat().st_size
    with pytest.raises(ValueError):
        writer.write("finished")


def test_unknown_and_malformed_ids_are_user_errors(manager):
    for job_id in ("20990101-000000-abcd", "../../etc", ""):
        with pytest.raises(UserInputError, match="no job"):
            manager.get(job_id)
    with pytest.raises(UserInputError, match="unknown job kind"):
        manager.submit("no-such-kind", {})
    with pytest.raises(UserInputError, match="JSON"):
        manager.submit("segment", {"input": object()})
    assert manager.list() == []


# --------------------------------------------------------------------------- cancel and kill
def test_cancel_stops_a_running_job_quickly_and_publishes_nothing(manager, tmp_path):
    output = tmp_path / "never.txt"
    info = submit(manager, "count", {**LONG, "output": str(output)})
    wait_for_progress(manager, info.id)
    started = time.monotonic()
    cancelled = manager.cancel(info.id, timeout=10)
    assert time.monotonic() - started < 3
    assert cancelled.state == "cancelled" and cancelled.error == "cancelled on request"
    assert not process_tree.pid_alive(info.pid)
    assert not output.exists() and list(tmp_path.glob(".never.txt*")) == []
    terminal = [e for e in all_events(manager, info.id) if e["type"] in ("done", "error")]
    assert terminal == [terminal[0]] and terminal[0]["cancelled"] is True
    assert manager.cancel(info.id).state == "cancelled"  # again: unchanged, no second event
    assert len(all_events(manager, info.id)) == len(manager.events(info.id)[0])


def test_a_stopped_worker_is_shown_and_the_follower_says_what_to_do(manager, tmp_path):
    """Issue 26, item 23. Catches: a SIGSTOPped worker shown as "running" forever and a follower
    (`rank`, `adapt --wait`) waiting forever without a word."""
    import threading

    from LymphNodeDGSTLib.cli.jobs import print_job, print_job_list
    from LymphNodeDGSTLib.jobs.follow import follow_job

    info = submit(manager, "count", {**LONG, "output": str(tmp_path / "out.txt")})
    wait_for_progress(manager, info.id)
    os.kill(info.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: manager.get(info.id).stopped, 10, "the worker seen stopped")
        listing, shown = io.StringIO(), io.StringIO()
        print_job_list(manager.list(), file=listing)
        print_job(manager.get(info.id), file=shown)
        assert f"{info.id}" in listing.getvalue() and "stopped" in listing.getvalue()
        assert f"kill -CONT {info.pid}" in shown.getvalue()
        followed = io.StringIO()
        follower = threading.Thread(target=follow_job, args=(manager, info.id), kwargs={"file": followed},
                                    daemon=True)
        follower.start()
        wait_for(lambda: "is stopped" in followed.getvalue(), 10, "the follower's message")
    finally:
        os.kill(info.pid, signal.SIGCONT)
    assert not manager.get(info.id).stopped
    manager.cancel(info.id, timeout=10)
    follower.join(10)


def test_cancel_kills_a_worker_that_does_not_listen(manager):
    info = submit(manager, "ignore_cancel", {"seconds": 30})
    wait_for_progress(manager, info.id, done=0)
    started = time.monotonic()
    cancelled = manager.cancel(info.id, timeout=1)
    assert time.monotonic() - started < 4
    assert cancelled.state == "cancelled" and "killed after 1 s" in cancelled.error
    assert not process_tree.pid_alive(info.pid)


def test_sigkilled_worker_is_failed_its_lock_recovered_its_output_absent(manager, tmp_path):
    output = tmp_path / "adapted.txt"
    info = submit(manager, "count", {**LONG, "output": str(output)}, exclusive_device=True)
    wait_for_progress(manager, info.id)
    holder = read_device_lock(manager.root, "cpu")
    assert holder is not None and (holder.job, holder.pid) == (info.id, info.pid)

    os.kill(info.pid, signal.SIGKILL)
    failed = wait_for(lambda: (i := manager.get(info.id)).state != "running" and i,
                      what="the killed job to end")
    assert failed.state == "failed" and failed.error == jobs.WORKER_STOPPED
    assert not output.exists() and list(tmp_path.glob(".adapted.txt*")) == []
    assert device_lock_path(manager.root, "cpu").exists()  # left behind, but stale
    assert read_device_lock(manager.root, "cpu") is None

    second = submit(manager, "count", {"steps": 3, "interval": 0.01}, exclusive_device=True)
    assert manager.wait(second.id, poll=0.05, timeout=30).state == "done"
    assert not device_lock_path(manager.root, "cpu").exists()  # released at the end


# --------------------------------------------------------------------------- device locks
def test_exclusive_jobs_one_per_device(manager, tmp_path):
    first = submit(manager, "count", LONG, exclusive_device=True)
    # Refused even before the first worker has taken the lock (it may still be starting).
    with pytest.raises(DeviceBusy):
        submit(manager, "count", LONG, exclusive_device=True)
    wait_for(lambda: read_device_lock(manager.root, "cpu"), what="the lock")
    with pytest.raises(UserInputError) as refused:
        submit(manager, "count", LONG, exclusive_device=True)
    assert str(refused.value) == (
        f"a 'jobkinds_for_tests:count' job is already running on cpu (job {first.id}); wait for "
        f"it or cancel it with 'lndgst jobs cancel {first.id}'")
    holder = read_device_lock(manager.root, "cpu")
    assert "an adaptation is already running on cpu" in device_lock.busy_message(
        device_lock.DeviceLock(holder.path, "cpu", holder.pid, holder.job, "adapt"))
    from LymphNodeDGSTLib.engine.segmentation.devices import choose_device
    if choose_device("auto").type == "cpu":  # then "auto" shares the cpu's lock
        with pytest.raises(DeviceBusy):
            submit(manager, "count", LONG, device="auto", exclusive_device=True)
    assert len(manager.list()) == 1  # nothing created for the refused ones

    # Another device, or a job that is not exclusive, still runs.
    other = submit(manager, "count", {"steps": 2, "interval": 0.01}, device="cuda:1",
                   exclusive_device=True)
    shared = submit(manager, "count", {"steps": 2, "interval": 0.01})
    assert manager.wait(other.id, poll=0.05, timeout=30).state == "done"
    assert manager.wait(shared.id, poll=0.05, timeout=30).state == "done"

    # A worker that loses the race (its job slipped past submit's check) fails cleanly.
    racer = manager._create("jobkinds_for_tests:count", {"steps": 2}, "cpu", True)
    completed = subprocess.run([sys.executable, "-m", "LymphNodeDGSTLib.jobs.worker", str(racer)],
                               env=worker_environment(TEST_ENV), capture_output=True, timeout=60)
    assert completed.returncode == 1
    lost = manager.get(racer.name)
    assert lost.state == "failed" and f"already running on cpu (job {first.id})" in lost.error
    assert read_device_lock(manager.root, "cpu").job == first.id  # the loser did not remove it

    assert manager.cancel(first.id).state == "cancelled"
    assert not device_lock_path(manager.root, "cpu").exists()
    assert [i.id for i in manager.list()] == sorted((i.id for i in manager.list()), reverse=True)


def test_stale_locks_are_recovered(manager, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = device_lock_path(manager.root, "cuda")
    assert lock == device_lock_path(manager.root, "cuda:0")
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": dead.pid, "job": "20200101-000000-dead", "kind": "adapt",
                                "device": "cuda"}))
    assert read_device_lock(manager.root, "cuda:0") is None
    job = submit(manager, "count", {"steps": 2, "interval": 0.01}, device="cuda",
                 exclusive_device=True)
    assert manager.wait(job.id, poll=0.05, timeout=30).state == "done"
    assert not lock.exists()

    # An empty lock file left by a process that died while writing it.
    lock.write_text("")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    taken = acquire_device_lock(manager.root, "cuda", "20200101-000000-aaaa", "adapt")
    assert taken.pid == os.getpid() and read_device_lock(manager.root, "cuda").job == taken.job
    device_lock.release_device_lock(taken)
    assert not lock.exists()

    if Path("/proc/self/cmdline").exists():
        # A recycled pid: alive, but not the worker of the job named in the lock.
        lock.write_text(json.dumps({"pid": os.getpid(), "job": "20200101-000000-beef",
                                    "kind": "adapt", "device": "cuda"}))
        taken = acquire_device_lock(manager.root, "cuda", "20200101-000000-cccc", "adapt")
        assert taken.job == "20200101-000000-cccc"
        device_lock.release_device_lock(taken)


# --------------------------------------------------------------------------- failures
def test_failing_kinds_end_failed_with_their_message(manager):
    submitted = {name: submit(manager, name) for name in ("bad_input", "crash", "out_of_memory")}
    submitted["missing"] = manager.submit("no_such_module_anywhere:run", {}, env=TEST_ENV)
    ended = {name: manager.wait(info.id, poll=0.05, timeout=30) for name, info in submitted.items()}
    assert {info.state for info in ended.values()} == {"failed"}
    assert ended["bad_input"].error == ("the case library is empty; add cases with "
                                        "'lndgst cases add'")
    crash = ended["crash"]
    assert crash.error.startswith("ZeroDivisionError: division by zero in step 2 (traceback in")
    log = (crash.folder / job_events.LOG_FILE).read_text()
    assert "Traceback" in log and "jobkinds_for_tests.py" in log
    assert crash.last_progress["done"] == 1
    assert "--device cpu" in ended["out_of_memory"].error
    assert all_events(manager, ended["out_of_memory"].id)[-1]["out_of_memory"] is True
    assert "not available" in ended["missing"].error
    assert all(all_events(manager, info.id)[-1]["type"] == "error" for info in ended.values())


def test_worker_runs_with_an_explicit_python_and_a_clean_environment(manager, monkeypatch):
    for name in list(os.environ):
        if name not in ("PATH", "HOME", "TMPDIR", "LANG"):
            monkeypatch.delenv(name)
    bare = Path(getattr(sys, "_base_executable", sys.executable))
    bare_sees_package = subprocess.run(
        [str(bare), "-c", "import LymphNodeDGSTLib"], capture_output=True).returncode == 0
    pythons = {"bare": str(bare), "ours": sys.executable}
    infos = {name: submit(manager, "environment", python=python)
             for name, python in pythons.items()}
    for name, info in infos.items():
        done = manager.wait(info.id, poll=0.05, timeout=30)
        assert done.state == "done", (name, done.error)
        paths = done.result["PYTHONPATH"].split(os.pathsep)
        assert paths[:2] == [str(process_tree.PACKAGE_PARENT), str(TESTING)]
        assert done.result["nnUNet_n_proc_DA"] == "0" and int(done.result["nnUNet_def_n_proc"]) >= 1
    # A bare interpreter finds the package only through the PYTHONPATH the manager gives it.
    assert not bare_sees_package or bare == Path(sys.executable)

    with pytest.raises(UserInputError, match="could not start a worker"):
        manager.submit("segment", {}, python="/no/such/python")
    assert manager.list()[0].state == "failed"


# --------------------------------------------------------------------------- command line
def test_cli_jobs_list_show_cancel(home):
    assert run_cli("jobs", "list", home=home, check_rc=0).stdout.strip() == "no jobs"
    manager = JobManager(home / "jobs")
    finished = submit(manager, "count", {"steps": 2, "interval": 0.01})
    assert manager.wait(finished.id, poll=0.05, timeout=30).state == "done"
    running = submit(manager, "count", LONG)
    wait_for_progress(manager, running.id, done=1)

    listed = run_cli("jobs", "list", home=home, check_rc=0).stdout.splitlines()
    assert listed[0].split()[:4] == ["ID", "KIND", "STATE", "PROGRESS"]
    assert listed[1].split()[:3] == [running.id, "count", "running"]
    assert listed[2].split()[:4] == [finished.id, "count", "done", "100%"]

    shown = run_cli("jobs", "show", finished.id, "--events", home=home, check_rc=0).stdout
    assert f"job {finished.id}: jobkinds_for_tests:count, done" in shown
    assert '"counted": 2' in shown and "events:" in shown
    assert sum('"type": "done"' in line for line in shown.splitlines()) == 1

    cancelled = run_cli("jobs", "cancel", running.id, home=home, check_rc=0)
    assert f"job {running.id} cancelled" in cancelled.stdout
    assert manager.get(running.id).state == "cancelled"
    again = run_cli("jobs", "cancel", running.id, home=home, check_rc=0)
    assert "already cancelled" in again.stdout

    for command in ("show", "cancel"):
        missing = run_cli("jobs", command, "20990101-000000-abcd", home=home, check_rc=2)
        assert missing.stderr.count("\n") == 1 and "no job '20990101-000000-abcd'" in missing.stderr


# --------------------------------------------------------------------------- the segment job
def test_segment_job_writes_a_label_on_the_input_grid(installed_home, tmp_path):
    ct = make_ct(shape_zyx=(20, 56, 60), spacing_xyz=(0.9, 1.2, 3.0), origin=(-10.0, 25.0, -300.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    manager = JobManager(installed_home / "jobs")
    params = {"input": str(tmp_path / "ct.nii.gz"), "output": str(tmp_path / "label.nrrd"),
              "nodes_csv": str(tmp_path / "nodes.csv"), "home": str(installed_home),
              "device": "cpu", "fast": True}
    info = manager.submit("segment", params)
    shown = io.StringIO()
    assert follow_job(manager, info.id, file=shown, poll=0.1) == 0, manager.get(info.id).error

    result = manager.get(info.id).result
    assert result["output"] == params["output"] and result["model"] == "tiny@1"
    label, ct = sitk.ReadImage(params["output"]), sitk.ReadImage(params["input"])
    assert label.GetSize() == ct.GetSize()
    for geometry in ("GetSpacing", "GetOrigin", "GetDirection"):  # NIfTI in, NRRD out: 1e-7 noise
        assert np.allclose(getattr(label, geometry)(), getattr(ct, geometry)(), atol=1e-6), geometry
    rows = (tmp_path / "nodes.csv").read_text().splitlines()
    assert result["nodes"] == len(rows) - 1
    predict = [e for e in all_events(manager, info.id)
               if e["type"] == "progress" and e.get("stage") == "predict"]
    assert predict and predict[-1]["done"] == predict[-1]["total"]
    assert "sliding window" in shown.getvalue()


class CancelOnFirstTile(Reporter):
    """Asks to cancel as soon as the first sliding-window tile is reported."""

    def progress(self, done, total, stage=None, **extra):
        super().progress(done, total, stage=stage, **extra)
        if stage == "predict":
            self.cancel_event.set()


def test_segment_job_cancelled_mid_run_writes_nothing(installed_home, tmp_path):
    sitk.WriteImage(make_ct(), str(tmp_path / "ct.nii.gz"))
    output = tmp_path / "label.nii.gz"
    reporter = CancelOnFirstTile(tmp_path)
    with pytest.raises(Cancelled):
        segment_job.run({"input": str(tmp_path / "ct.nii.gz"), "output": str(output),
                         "home": str(installed_home), "device": "cpu", "fast": True}, reporter)
    assert not output.exists() and list(tmp_path.glob(".label*")) == []
    with pytest.raises(UserInputError, match="no model named"):
        segment_job.run({"input": str(tmp_path / "ct.nii.gz"), "output": str(output),
                         "home": str(installed_home), "model": "absent"}, Reporter(tmp_path))

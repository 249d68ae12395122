"""Simultaneous commands in real processes, and the device lock's owner (issue 12: data loss 5,
concurrent `adapt`, the stale lock of a recycled pid, `jobs cancel` releasing the lock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import make_ct

import LymphNodeDGSTLib
from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
from LymphNodeDGSTLib.engine.processes import process_start_time
from LymphNodeDGSTLib.jobs import device_lock
from LymphNodeDGSTLib.jobs.manager import JobManager
from LymphNodeDGSTLib.jobs.device_lock import (acquire_device_lock, device_lock_path, read_device_lock, release_device_lock)

TESTING = Path(__file__).resolve().parent
RACERS = 4


def race(script: str, folder: Path, racers: int = RACERS) -> list[str]:
    """Run `script` in `racers` processes that start its body at the same moment (after their
    imports): each waits, spinning, for a `go` file. Returns each process's stdout."""
    go = folder / "go"
    body = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(TESTING)!r})
        {{imports}}
        open(sys.argv[1], "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:
            pass
        {{work}}
        """)
    imports, _, work = script.partition("\n---\n")
    code = body.replace("{imports}", imports.strip()).replace("{work}", work.strip())
    ready = [folder / f"ready{k}" for k in range(racers)]
    package_parent = Path(LymphNodeDGSTLib.__file__).resolve().parents[1]  # the copy under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(package_parent), str(TESTING), os.environ.get("PYTHONPATH", "")])}
    processes = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for r in ready]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):
        assert time.monotonic() < deadline, "racers did not get ready"
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        time.sleep(0.05)
    go.touch()
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        outputs.append(out.strip())
    return outputs


def test_simultaneous_adds_of_one_image_store_it_once(tmp_path):
    """Catches a duplicate check outside the lock (found: two simultaneous `cases add` of one
    image both succeeded in 2 of 3 trials, then sat in both training and held-out splits)."""
    ct = make_ct(shape_zyx=(10, 48, 48), seed=11)
    label = sitk.GetImageFromArray((sitk.GetArrayFromImage(ct) > 60).astype("uint8"))
    label.CopyInformation(ct)
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(label, str(tmp_path / "label.nrrd"))
    script = f"""
from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
from LymphNodeDGSTLib.errors import UserInputError
import SimpleITK as sitk
image, label = sitk.ReadImage({str(tmp_path / "ct.nrrd")!r}), sitk.ReadImage({str(tmp_path / "label.nrrd")!r})
library = CaseLibrary({str(tmp_path / "cases")!r})
---
try:
    print("added", library.add(image, label).id)
except UserInputError as error:
    print("refused", error)
"""
    for trial in range(2):
        folder = tmp_path / f"trial{trial}"
        folder.mkdir()
        outputs = race(script.replace(str(tmp_path / "cases"), str(folder / "cases")), folder)
        added = [o for o in outputs if o.startswith("added")]
        assert len(added) == 1, outputs
        assert all("already in the library" in o for o in outputs if o.startswith("refused"))
        assert len(CaseLibrary(folder / "cases").list()) == 1


def test_simultaneous_adapt_submissions_start_one_job(tmp_path):
    """Catches a busy check that is not atomic with creating the job (found: of four
    simultaneous `adapt` commands two got job ids; the second then failed in its worker)."""
    root = tmp_path / "jobs"
    script = f"""
from LymphNodeDGSTLib.jobs.manager import DeviceBusy, JobManager
manager = JobManager({str(root)!r})
---
try:
    job = manager.submit("jobkinds_for_tests:count", {{"steps": 400, "interval": 0.05}},
                         device="cpu", exclusive_device=True, env={{"PYTHONPATH": {str(TESTING)!r}}})
    print("started", job.id)
except DeviceBusy as error:
    print("refused", error)
"""
    outputs = race(script, tmp_path)
    started = [o.split()[1] for o in outputs if o.startswith("started")]
    try:
        assert len(started) == 1, outputs
        assert len(JobManager(root).list()) == 1
    finally:
        for job_id in started:
            JobManager(root).cancel(job_id, timeout=5)


# ---------------------------------------------------------------- the lock's owner
def _lock(root: Path, pid: int, job: str, **extra) -> Path:
    path = device_lock_path(root, "cuda:0")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "job": job, "kind": "adapt", "device": "cuda:0", **extra}))
    return path


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path):
    """Catches an owner identified by pid (and command line) only: the lock's pid now runs
    a process started later, even one whose command line names the job."""
    root = tmp_path / "jobs"
    job = "20200101-000000-0001"
    impostor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", job])
    try:
        time.sleep(0.3)
        started = process_start_time(impostor.pid)
        _lock(root, impostor.pid, job, pid_start=started - 1)  # the worker that held it was older
        assert read_device_lock(root, "cuda:0") is None
        taken = acquire_device_lock(root, "cuda:0", "20200101-000000-0002", "adapt")
        assert taken.job == "20200101-000000-0002" and taken.pid_start == process_start_time(os.getpid())
        release_device_lock(taken)
        # The real owner (same pid, same start time) keeps it.
        _lock(root, impostor.pid, job, pid_start=started)
        assert read_device_lock(root, "cuda:0").job == job
        with pytest.raises(device_lock.DeviceBusy):
            acquire_device_lock(root, "cuda:0", "20200101-000000-0003", "adapt")
    finally:
        impostor.kill()
        impostor.wait()


@pytest.mark.skipif(not Path("/proc/2/cmdline").exists(), reason="needs Linux /proc")
def test_a_legacy_lock_held_by_a_kernel_thread_pid_is_stale(tmp_path):
    """Catches an empty command line (a kernel thread given the dead worker's pid) counting as
    the worker forever: the lock blocked adaptation for good."""
    if Path("/proc/2/cmdline").read_bytes():
        pytest.skip("pid 2 is not a kernel thread here")
    root = tmp_path / "jobs"
    _lock(root, 2, "20200101-000000-0004")  # an old lock, without pid_start
    assert read_device_lock(root, "cuda:0") is None


def test_cancel_of_a_killed_worker_releases_its_lock_and_work_copy(tmp_path):
    """Catches `jobs cancel` reporting success while the SIGKILLed worker's lock stays (and its
    `work` checkpoint copy with it)."""
    manager = JobManager(tmp_path / "jobs")
    info = manager.submit("jobkinds_for_tests:ignore_cancel", {"seconds": 60}, exclusive_device=True,
                          env={"PYTHONPATH": str(TESTING)})
    deadline = time.monotonic() + 30
    while read_device_lock(manager.root, "cpu") is None:
        assert time.monotonic() < deadline, "the worker never took the lock"
        time.sleep(0.05)
    work = info.folder / "work"
    (work / "training").mkdir(parents=True)
    (work / "training" / "checkpoint.pth").write_bytes(b"\0" * 1000)
    cancelled = manager.cancel(info.id, timeout=1)
    assert cancelled.state == "cancelled" and "killed" in cancelled.error
    assert not device_lock_path(manager.root, "cpu").exists()
    assert not work.exists()

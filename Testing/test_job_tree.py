"""Cancel and force-kill end a job's whole process tree and reap its launcher.

Inside Slicer the worker runs under PythonSlicer, which is CTKAppLauncher: it starts python-real as
its child and waits for it, so worker.pid (written by python-real) is not the process the manager
launched. These tests launch workers through a stand-in launcher that does exactly that.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import psutil
import pytest

from conftest import wait_for
from LymphNodeDGSTLib.jobs import process_tree
from LymphNodeDGSTLib.jobs.manager import JobManager

TESTING = Path(__file__).resolve().parent
TEST_ENV = {"PYTHONPATH": str(TESTING)}


@pytest.fixture
def launcher(tmp_path) -> str:
    """A stand-in for PythonSlicer: runs the real Python with its arguments as a child, waits for
    it and exits with its status (CTKAppLauncher's behaviour)."""
    path = tmp_path / "PythonSlicer"
    path.write_text(f"#!{sys.executable}\n"
                    "import subprocess, sys\n"
                    f"sys.exit(subprocess.call([{sys.executable!r}, *sys.argv[1:]]))\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def gone(process: psutil.Process) -> bool:
    """Ended: no such process, or a zombie that is not ours (its parent, init, reaps it)."""
    try:
        return not process.is_running() or (process.status() == psutil.STATUS_ZOMBIE
                                            and process.ppid() != os.getpid())
    except psutil.NoSuchProcess:
        return True


def assert_tree_ended_and_launcher_reaped(processes: list[psutil.Process], launcher_pid: int):
    alive = [p.pid for p in processes if not gone(p)]
    assert alive == [], f"processes of the job still alive: {alive}"
    zombies = [c.pid for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE]
    assert launcher_pid not in zombies, "the launcher was never waited for (defunct)"
    if os.name != "nt":
        with pytest.raises(ChildProcessError):  # already reaped: nothing left to wait for
            os.waitpid(launcher_pid, os.WNOHANG)


def test_force_kill_ends_launcher_worker_and_grandchild(tmp_path, launcher):
    """Catches: killing only worker.pid (python-real), which leaves the worker's own child
    running and the launcher defunct (the old `_force_kill`: os.kill(pid) when the worker is not
    its group's leader, and no wait for the launcher)."""
    manager = JobManager(tmp_path / "jobs")
    info = manager.submit("jobkinds_for_tests:spawn_and_ignore_cancel", {"seconds": 60},
                          python=launcher, env=TEST_ENV)
    progress = wait_for(lambda: manager.get(info.id).last_progress, 30, "the worker's child")
    worker_pid = manager.get(info.id).pid
    processes = process_tree.job_processes(worker_pid, info.id)
    launcher_pid = processes[0].pid
    assert launcher_pid != worker_pid and launcher_pid in process_tree._CHILDREN  # launched: the launcher
    assert {worker_pid, progress["child"]} <= {p.pid for p in processes}

    cancelled = manager.cancel(info.id, timeout=1)
    assert cancelled.state == "cancelled" and "killed after 1 s" in cancelled.error
    assert_tree_ended_and_launcher_reaped(processes, launcher_pid)


def test_cancelled_adaptation_under_a_launcher_leaves_no_process(installed_home, launcher):
    """A real adaptation job (nnU-Net with one data-augmentation process, so the worker has
    children) started through the stand-in launcher, cancelled while it trains.
    Catches: a cancel that returns while nnU-Net's processes or the launcher live on, and a
    launcher left defunct because only python-real's pid was waited for."""
    from test_adapt import blob_case
    from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
    from LymphNodeDGSTLib.home import Home
    from LymphNodeDGSTLib.slicer_bridge.adapt_section import adapt_request, submit_adaptation

    library = CaseLibrary(installed_home / "cases")
    for seed in range(4):
        library.add(*blob_case(seed))
    home = Home(installed_home)
    manager = JobManager(home.jobs)
    job = submit_adaptation(manager, home, adapt_request("tiny", iterations=2000, device="cpu"),
                            python=launcher, env={"nnUNet_n_proc_DA": "1"})

    def training_with_children():
        info = manager.get(job.id)
        assert info.state == "running", info.error
        if not (info.last_progress and info.last_progress.get("stage") == "train"):
            return None
        processes = process_tree.job_processes(info.pid, job.id)
        return processes if len(processes) >= 3 else None  # launcher, worker, >= 1 loader

    processes = wait_for(training_with_children, 180, "training with data-loader processes")
    launcher_pid = processes[0].pid
    assert launcher_pid in process_tree._CHILDREN
    assert manager.cancel(job.id, timeout=20).state == "cancelled"
    assert_tree_ended_and_launcher_reaped(processes, launcher_pid)


def test_a_worker_still_running_at_exit_prints_no_resource_warning(tmp_path):
    """`lndgst demo` printed "ResourceWarning: subprocess N is still running" after its last line
    (`dice_before=... dice_after=...`) when the job's worker had not exited yet. Catches dropping
    the launched workers' Popen objects at interpreter exit without silencing that warning."""
    import subprocess

    script = (
        "import subprocess, sys\n"
        "from LymphNodeDGSTLib.jobs import process_tree\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3)'], start_new_session=True)\n"
        "process_tree._CHILDREN[child.pid] = child\n"
        "del child\n"
        "print('last line')\n")
    completed = subprocess.run([sys.executable, "-W", "default", "-c", script], capture_output=True,
                               text=True, timeout=60, cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "LymphNodeDGST")})
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "last line"
    assert "ResourceWarning" not in completed.stderr, completed.stderr

"""A worker's processes: are they alive, which belong to a job, and stopping them all (a
launcher such as torchrun and its children included), plus the environment a worker starts with.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping

from LymphNodeDGSTLib.engine.processes import process_start_time


# A job folder without worker.pid this long after creation never got a worker.
START_GRACE_S = 60.0
# A process whose command line is still empty this long after it started is not a worker.
EXEC_GRACE_S = 5.0
# The folder that holds the LymphNodeDGSTLib package: put on the worker's PYTHONPATH so that any
# interpreter (Slicer's own Python included) imports this very copy of the package.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
# Workers this process launched: polled so that finished ones are reaped, not left as zombies
# that still answer "alive" to a signal 0.
_CHILDREN: dict[int, subprocess.Popen] = {}
_CHILDREN_LOCK = threading.Lock()


@atexit.register
def _release_children() -> None:
    """Workers run in their own session and outlive the process that started them by design (a
    job keeps running when Slicer or `lndgst` exits). Dropping their Popen objects at exit would
    print "ResourceWarning: subprocess N is still running" after a command's last line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with _CHILDREN_LOCK:
            _CHILDREN.clear()


# --------------------------------------------------------------------------- processes
def pid_alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie is not). Never sends a real signal."""
    with _CHILDREN_LOCK:
        _reap_finished_children()
        if pid in _CHILDREN:
            return True
    if os.name == "nt":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _linux_process_state(pid) != "Z"


def worker_alive(pid: int, job_id: str) -> bool:
    """`pid` is alive and, where the OS tells (Linux /proc), it is the worker of `job_id`, not an
    unrelated process that was given a dead worker's recycled pid."""
    if not pid_alive(pid):
        return False
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    if not command_line:
        # Empty for a moment while a worker execs: cannot tell then. Empty for good in a kernel
        # thread, which may hold a dead worker's recycled pid: not ours once it is not new.
        return _started_within(pid, EXEC_GRACE_S)
    return job_id.encode() in command_line


def _started_within(pid: int, seconds: float) -> bool:
    """Whether `pid` started less than `seconds` ago (True when the OS does not tell)."""
    started = process_start_time(pid)
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return True
    return started is None or uptime - started / ticks < seconds


def worker_stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP, Ctrl+Z, a debugger): alive, yet never progressing."""
    return os.name != "nt" and _linux_process_state(pid) in ("T", "t")


def _linux_process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0] if ")" in stat else None


def _windows_pid_alive(pid: int) -> bool:
    # os.kill(pid, 0) would terminate the process on Windows; ask the kernel instead.
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() == 5  # access denied: exists, not ours
    try:
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _ask_to_stop(pid: int) -> None:
    if os.name == "nt":
        return  # no SIGTERM there (it would kill at once): the worker polls the cancel file
    if pid <= 1 or pid == os.getpid():  # 0 and -1 mean process groups: never ours to signal
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def _reap_finished_children() -> None:
    """Poll every worker process this process launched (call with _CHILDREN_LOCK held), so that a
    finished one is reaped. Under PythonSlicer the launched process is CTKAppLauncher, whose pid
    is not the worker's (worker.pid holds python-real's): it must be polled by its own pid."""
    for launched_pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            del _CHILDREN[launched_pid]


def job_processes(pid: int, job_id: str) -> list:
    """The processes of job `job_id` whose worker is `pid`: its launcher (PythonSlicer is
    CTKAppLauncher, which runs python-real as its child and waits for it), the worker and all its
    descendants (nnU-Net's data-loader processes), as psutil.Process objects; [] without psutil."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        worker = psutil.Process(pid)
        processes = [worker, *worker.children(recursive=True)]
    except psutil.Error:
        return []
    try:
        parent = worker.parent()
    except psutil.Error:
        parent = None
    if parent is not None and _is_launcher_of(parent, job_id):
        processes.insert(0, parent)
    return processes


def _is_launcher_of(process, job_id: str) -> bool:
    """Whether `process` launched the worker of `job_id`: a process this one started for a job,
    or one whose command line runs the worker on that job's folder. Never this process."""
    import psutil

    if process.pid == os.getpid():
        return False
    with _CHILDREN_LOCK:
        if process.pid in _CHILDREN:
            return True
    try:
        command_line = process.cmdline()
    except psutil.Error:
        return False
    return "LymphNodeDGSTLib.jobs.worker" in command_line and any(job_id in part for part in command_line)


def _force_kill(pid: int, job_id: str = "", known: list | None = None) -> list:
    """Kill the whole job at once: launcher, worker and every descendant (SIGKILL;
    TerminateProcess on Windows). `known`: processes seen earlier, so that a child orphaned
    meanwhile is not missed. Returns the processes it found, for `_end_leftovers` to reap."""
    if pid <= 1 or pid == os.getpid():
        return list(known or [])
    processes = list({p.pid: p for p in [*(known or []), *job_processes(pid, job_id)]}.values())
    for process in processes:
        try:
            process.kill()
        except Exception:  # psutil.NoSuchProcess, AccessDenied: gone, or not ours to kill
            pass
    if os.name != "nt":
        # The job's own process group (start_new_session: its leader is the process we launched,
        # the launcher under PythonSlicer) also catches descendants psutil could not list.
        try:
            group = os.getpgid(pid)
            if group != os.getpgid(0):
                os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    elif not processes:  # no psutil: Windows' own tree kill
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
    return processes


def _ended(process) -> bool:
    """Gone, or a zombie (dead; only its parent can reap it)."""
    try:
        return not process.is_running() or process.status() == "zombie"
    except Exception:  # psutil.NoSuchProcess
        return True


def _end_leftovers(known: list, pid: int, timeout: float) -> None:
    """After the worker ended: give its launcher and descendants `timeout` s to end by
    themselves, kill those that do not, and reap every process this process launched for the
    job (the launcher under PythonSlicer, else the worker), so none stays defunct."""
    if known and not _wait_until(lambda: all(_ended(p) for p in known), timeout):
        for process in known:
            if not _ended(process):
                try:
                    process.kill()
                except Exception:
                    pass
        _wait_until(lambda: all(_ended(p) for p in known), timeout)
    ours = {pid, *(p.pid for p in known)}
    with _CHILDREN_LOCK:
        launched = [(p, child) for p, child in _CHILDREN.items() if p in ours]
    for launched_pid, child in launched:
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        with _CHILDREN_LOCK:
            _CHILDREN.pop(launched_pid, None)


def _wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def nnunet_worker_caps() -> dict[str, str]:
    """nnU-Net's worker-process counts for a worker (the user's own settings win)."""
    from LymphNodeDGSTLib.engine.nnunet_env import worker_count_defaults

    return worker_count_defaults()


def worker_environment(extra: Mapping[str, str] | None = None,
                       base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a worker: `base` (default: ours) plus `extra`; PYTHONPATH starts with
    the package's folder, then `extra`'s PYTHONPATH, then the inherited one."""
    env = dict(os.environ if base is None else base)
    extra = dict(extra or {})
    paths = [str(PACKAGE_PARENT)]
    for raw in (extra.pop("PYTHONPATH", ""), env.get("PYTHONPATH", "")):
        paths += [p for p in raw.split(os.pathsep) if p]
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in nnunet_worker_caps().items():
        env.setdefault(name, value)
    return env

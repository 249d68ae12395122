"""The worker process of one background job: `python -m LymphNodeDGSTLib.jobs.worker JOB_FOLDER`.

It writes worker.pid, turns SIGTERM/SIGINT into a cancel request, takes the device lock when the
job is exclusive, runs the job's function `fn(params, reporter) -> dict` and ends with exactly
one terminal event: `done` with the result, or `error` (cancelled, bad input, out of memory, or
a failure whose traceback goes to worker.log). Exit status 0 for done, 1 otherwise.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

from LymphNodeDGSTLib.atomic import write_text_atomic
from LymphNodeDGSTLib.errors import Cancelled, OutOfMemory, UserInputError, WriteFailed, environment_problem
from LymphNodeDGSTLib.jobs.kinds import JOB_KINDS, check_kind_name
from LymphNodeDGSTLib.jobs.events import JOB_FILE, LOG_FILE, PID_FILE, Reporter, job_events_writer
from LymphNodeDGSTLib.jobs.device_lock import DeviceLock, acquire_device_lock, release_device_lock

JobFunction = Callable[[dict, Reporter], dict]


def resolve_kind(kind: str) -> JobFunction:
    """The function that runs `kind`, imported only now (so `adapt` may arrive later)."""
    check_kind_name(kind)
    module_name, _, function_name = JOB_KINDS.get(kind, kind).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise UserInputError(f"job kind '{kind}' is not available: "
                                 f"no module {module_name}") from None
        raise
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserInputError(f"job kind '{kind}': {module_name} has no function {function_name}")
    return function


def main(job_folder: str | os.PathLike) -> int:
    folder = Path(job_folder).resolve()
    write_text_atomic(folder / PID_FILE, f"{os.getpid()}\n")
    cancel_event = threading.Event()
    _install_signal_handlers(cancel_event)
    writer = job_events_writer(folder)
    reporter = Reporter(folder, writer, cancel_event)
    spec: dict = {}
    lock: DeviceLock | None = None
    terminal: tuple[str, dict[str, Any]]
    try:
        spec = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
        print(f"worker {os.getpid()} ({sys.executable}) running job {spec['id']} "
              f"kind {spec['kind']} on {spec.get('device', 'cpu')}", file=sys.stderr, flush=True)
        if spec.get("exclusive_device"):
            lock = acquire_device_lock(folder.parent, spec.get("device", "cpu"), spec["id"],
                                       spec["kind"])
        reporter.check_cancelled()
        function = resolve_kind(spec["kind"])
        result = function(dict(spec.get("params") or {}), reporter)
        terminal = ("done", {"result": result if result is not None else {}})
    except BaseException as error:  # noqa: BLE001 - every ending must become an event
        terminal = ("error", describe_failure(error, reporter, spec, folder))
    finally:
        # Released before the terminal event: whoever waits for it may start the next job.
        if lock is not None:
            release_device_lock(lock)
    writer.write(terminal[0], **terminal[1])
    return 0 if terminal[0] == "done" else 1


def describe_failure(error: BaseException, reporter: Reporter, spec: dict,
                     folder: Path) -> dict[str, Any]:
    """The error event's fields for `error` (and the traceback on stderr where it is a bug)."""
    if isinstance(error, Cancelled) or reporter.cancelled():
        return {"message": "cancelled on request", "cancelled": True}
    if isinstance(error, (UserInputError, WriteFailed)):
        return {"message": str(error), "user_error": True}
    problem = environment_problem(error)
    if problem is not None:  # a full or read-only disk: the user's to fix, like bad input
        return {"message": problem, "user_error": True}
    if isinstance(error, OutOfMemory):
        return {"message": str(error), "out_of_memory": True}
    device = spec.get("device", "cpu")
    if _is_torch_out_of_memory(error):
        return {"message": f"out of memory on {device}: try fewer iterations (or a smaller "
                           "batch), or run on the CPU with --device cpu", "out_of_memory": True}
    if isinstance(error, MemoryError):
        return {"message": "out of memory (RAM): close other programs or try fewer iterations",
                "out_of_memory": True}
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    sys.stderr.flush()
    detail = str(error).strip().splitlines()
    return {"message": f"{type(error).__name__}: {detail[0] if detail else 'no message'} "
                       f"(traceback in {folder / LOG_FILE})"}


def _is_torch_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    kind = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return kind is not None and isinstance(error, kind)


def _install_signal_handlers(cancel_event: threading.Event) -> None:
    def request_cancel(signum, frame) -> None:
        cancel_event.set()
        print(f"worker: signal {signum} received, cancelling", file=sys.stderr, flush=True)

    for name in ("SIGTERM", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), request_cancel)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m LymphNodeDGSTLib.jobs.worker JOB_FOLDER", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))

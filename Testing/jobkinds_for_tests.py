"""Job kinds for the job tests, run by real worker processes as "jobkinds_for_tests:NAME".

Only the standard library and LymphNodeDGSTLib's light modules: a worker started with a bare
interpreter (no numpy, no torch) must be able to run them.
"""

from __future__ import annotations

import time
from pathlib import Path

from LymphNodeDGSTLib.atomic import write_text_atomic
from LymphNodeDGSTLib.errors import OutOfMemory, UserInputError
from LymphNodeDGSTLib.jobs.events import Reporter


def count(params: dict, reporter: Reporter) -> dict:
    """`steps` steps of `interval` seconds, progress after each and a metric every 5; writes
    `output` (if given) only at the end, through a temporary file and a rename."""
    steps, interval = int(params.get("steps", 10)), float(params.get("interval", 0.05))
    reporter.log(f"counting to {steps}")
    reporter.progress(0, steps, stage="count")
    for step in range(1, steps + 1):
        reporter.check_cancelled()
        time.sleep(interval)
        reporter.progress(step, steps, stage="count")
        if step % 5 == 0:
            reporter.metric("loss", 1.0 / step, epoch=step // 5)
    if params.get("output"):
        write_text_atomic(Path(params["output"]), f"counted to {steps}\n")
    return {"counted": steps, "output": params.get("output")}


def ignore_cancel(params: dict, reporter: Reporter) -> dict:
    """Sleeps without ever looking at the cancel flag: only SIGKILL stops it."""
    reporter.progress(0, 1, stage="sleep")
    deadline = time.monotonic() + float(params.get("seconds", 30))
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return {"slept": True}


def bad_input(params: dict, reporter: Reporter) -> dict:
    raise UserInputError("the case library is empty; add cases with 'lndgst cases add'")


def crash(params: dict, reporter: Reporter) -> dict:
    reporter.progress(1, 3, stage="work")
    raise ZeroDivisionError("division by zero in step 2")


def out_of_memory(params: dict, reporter: Reporter) -> dict:
    raise OutOfMemory("out of memory on cuda:0 during adaptation; try fewer iterations, "
                      "or --device cpu")


def environment(params: dict, reporter: Reporter) -> dict:
    """What the worker sees: its interpreter, PYTHONPATH and nnU-Net's worker counts."""
    import os
    import sys

    names = ("PYTHONPATH", "nnUNet_n_proc_DA", "nnUNet_def_n_proc")
    return {"executable": sys.executable, **{name: os.environ.get(name) for name in names}}


def spawn_and_ignore_cancel(params: dict, reporter: Reporter) -> dict:
    """Starts a child process (as nnU-Net starts its data loaders), reports its pid, then sleeps
    without looking at the cancel flag: only killing the whole process tree ends both."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    reporter.progress(0, 1, stage="sleep", child=child.pid)
    deadline = time.monotonic() + float(params.get("seconds", 60))
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return {"slept": True}

"""Follow a background job on a terminal: a progress bar with the worker's ETA, metrics and logs.

Used by every command that waits for a job (`adapt --wait`, `lndgst demo`).
"""

from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm

from LymphNodeDGSTLib.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from LymphNodeDGSTLib.jobs.manager import JobManager
from LymphNodeDGSTLib.progress import STAGE_NAMES


def follow_job(manager: JobManager, job_id: str, file: IO[str] | None = None,
               poll: float = 0.5) -> int:
    """Follow a job to its end with a tqdm bar (ETA from the worker's own iteration rate),
    metric and log lines above it. 0 when it is done, 1 when it failed or was cancelled.
    Ctrl-C stops following, not the job."""
    file = file or sys.stderr
    bar: tqdm | None = None
    stage: object = object()

    def on_event(event: dict) -> None:
        nonlocal bar, stage
        kind = event.get("type")
        if kind == "progress":
            total = int(event.get("total") or 0)
            if bar is None or event.get("stage") != stage or total != bar.total:
                if bar is not None:
                    bar.close()
                stage = event.get("stage")
                bar = tqdm(total=total, desc=_stage_name(stage), unit="it", file=file,
                           dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                           "[{elapsed}{postfix}]")
            bar.n = int(event.get("done") or 0)
            eta = event.get("eta_s")
            bar.set_postfix_str(f"ETA {clock(eta)}" if eta is not None else "", refresh=False)
            bar.refresh()
        elif kind == "metric":
            epoch = f" (epoch {event['epoch']})" if "epoch" in event else ""
            tqdm.write(f"{event.get('name')} = {_number(event.get('value'))}{epoch}", file=file)
        elif kind == "log":
            tqdm.write(str(event.get("message", "")), file=file)

    started = time.monotonic()
    try:
        info = manager.wait(job_id, on_event=on_event, poll=poll,
                            on_stopped=lambda stopped: tqdm.write(stopped_text(stopped), file=file))
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"stopped following; job {job_id} keeps running (see 'lndgst jobs show {job_id}', "
              f"'lndgst jobs cancel {job_id}')", file=file)
        return 130
    if bar is not None:
        bar.close()
    if info.state == "done":
        print(f"job {job_id} done ({clock(time.monotonic() - started)})", file=file)
        return EXIT_OK
    print(f"job {job_id} {info.state}: {info.error}", file=file)
    return EXIT_USAGE if info.user_error else EXIT_FAILURE


def stopped_text(info) -> str:
    """What to do about a job whose worker is stopped (SIGSTOP, Ctrl+Z)."""
    return (f"job {info.id}: its worker (pid {info.pid}) is stopped and makes no progress; resume it "
            f"with 'kill -CONT {info.pid}', or cancel the job with 'lndgst jobs cancel {info.id}'")


def _stage_name(stage: object) -> str:
    return STAGE_NAMES.get(stage, str(stage)) if isinstance(stage, str) else "progress"


def clock(seconds: object) -> str:
    """h:mm:ss of a duration; "?" for what a damaged events file holds instead of seconds."""
    try:
        seconds = max(0, int(round(float(seconds))))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # "abc", None, NaN, inf
        return "?"
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}:" if hours else "") + f"{rest // 60:02d}:{rest % 60:02d}"


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

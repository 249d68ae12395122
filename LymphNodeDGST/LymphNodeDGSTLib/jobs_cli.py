"""`lndgst jobs list | show ID [--events] | cancel ID`, and `follow_job` for commands that wait."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import IO

from tqdm import tqdm

from LymphNodeDGSTLib import cli
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.jobs import EVENTS_FILE, JobInfo, JobManager
from LymphNodeDGSTLib.progress import STAGE_NAMES


def register(commands: argparse._SubParsersAction) -> None:
    jobs = commands.add_parser("jobs", help="background jobs: list, show, cancel")
    job_commands = jobs.add_subparsers(dest="jobs_command", parser_class=type(jobs))
    job_commands.add_parser("list", help="jobs, newest first")
    show = job_commands.add_parser("show", help="a job's spec, state, progress and result")
    show.add_argument("id")
    show.add_argument("--events", action="store_true", help="also print every event line")
    cancel = job_commands.add_parser("cancel", help="stop a running job")
    cancel.add_argument("id")
    cancel.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait before killing the worker (default 10)")


def handle(args: argparse.Namespace, home: Home) -> int:
    manager = JobManager(home.jobs)
    command = args.jobs_command
    if command == "list":
        print_job_list(manager.list())
    elif command == "show":
        info = manager.get(args.id)
        print_job(info)
        if args.events:
            print("events:")
            print((info.folder / EVENTS_FILE).read_text(encoding="utf-8"), end="")
    elif command == "cancel":
        before = manager.get(args.id)
        if before.state != "running":
            print(f"job {before.id} is already {before.state}")
            return cli.EXIT_OK
        info = manager.cancel(args.id, timeout=args.timeout)
        print(f"job {info.id} {info.state}" + (f": {info.error}" if info.error else ""))
    else:
        raise UserInputError("jobs: choose one of list, show, cancel")
    return cli.EXIT_OK


def format_progress(info: JobInfo) -> str:
    fraction = info.fraction_done
    if info.state == "done":
        return "100%"
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def print_job_list(infos: list[JobInfo], file: IO[str] | None = None) -> None:
    file = file or sys.stdout
    if not infos:
        print("no jobs", file=file)
        return
    print(f"{'ID':<22} {'KIND':<10} {'STATE':<10} {'PROGRESS':>8}  CREATED", file=file)
    for info in infos:
        print(f"{info.id:<22} {_short_kind(info.kind):<10} {info.state:<10} "
              f"{format_progress(info):>8}  {info.created}", file=file)


def print_job(info: JobInfo, file: IO[str] | None = None) -> None:
    file = file or sys.stdout
    print(f"job {info.id}: {info.kind}, {info.state}", file=file)
    print(f"created: {info.created}", file=file)
    print(f"folder: {info.folder}", file=file)
    print(f"pid: {info.pid if info.pid is not None else '-'}", file=file)
    print("spec: " + json.dumps(info.spec, indent=2), file=file)
    if info.last_progress:
        progress = info.last_progress
        stage = f"{progress['stage']} " if progress.get("stage") else ""
        eta = f", ETA {_clock(progress['eta_s'])}" if progress.get("eta_s") is not None else ""
        print(f"progress: {stage}{progress.get('done')}/{progress.get('total')}{eta}", file=file)
    if info.result is not None:
        print("result: " + json.dumps(info.result, indent=2), file=file)
    if info.error:
        print(f"error: {info.error}", file=file)


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
            bar.set_postfix_str(f"ETA {_clock(eta)}" if eta is not None else "", refresh=False)
            bar.refresh()
        elif kind == "metric":
            epoch = f" (epoch {event['epoch']})" if "epoch" in event else ""
            tqdm.write(f"{event.get('name')} = {_number(event.get('value'))}{epoch}", file=file)
        elif kind == "log":
            tqdm.write(str(event.get("message", "")), file=file)

    started = time.monotonic()
    try:
        info = manager.wait(job_id, on_event=on_event, poll=poll)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"stopped following; job {job_id} keeps running (see 'lndgst jobs show {job_id}', "
              f"'lndgst jobs cancel {job_id}')", file=file)
        return 130
    if bar is not None:
        bar.close()
    if info.state == "done":
        print(f"job {job_id} done ({_clock(time.monotonic() - started)})", file=file)
        return cli.EXIT_OK
    print(f"job {job_id} {info.state}: {info.error}", file=file)
    return cli.EXIT_FAILURE


def _stage_name(stage: object) -> str:
    return STAGE_NAMES.get(stage, str(stage)) if isinstance(stage, str) else "progress"


def _short_kind(kind: str) -> str:
    return kind.rpartition(":")[2] if ":" in kind else kind


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(float(seconds))))
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}:" if hours else "") + f"{rest // 60:02d}:{rest % 60:02d}"


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


cli.register_command(register, {"jobs": handle})

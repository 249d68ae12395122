"""`lndgst jobs list | show ID [--events] | cancel ID`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO

from LymphNodeDGSTLib.errors import EXIT_OK, UserInputError, printable
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.jobs.events import EVENTS_FILE, JobInfo
from LymphNodeDGSTLib.jobs.manager import JobManager
from LymphNodeDGSTLib.jobs.follow import clock, stopped_text

COMMAND = "jobs"


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
            # The worker writes UTF-8; a damaged byte is shown as U+FFFD rather than stopping.
            try:
                raw = (info.folder / EVENTS_FILE).read_bytes()
            except OSError:  # missing, or a folder in its place
                raw = b""
            for line in raw.decode("utf-8", errors="replace").splitlines():
                print(printable(line))
    elif command == "cancel":
        before = manager.get(args.id)
        if before.state != "running":
            manager.cancel(args.id)  # removes what a killed worker left behind
            print(f"job {before.id} is already {before.state}")
            return EXIT_OK
        info = manager.cancel(args.id, timeout=args.timeout)
        print(f"job {info.id} {info.state}" + (f": {printable(info.error)}" if info.error else ""))
    else:
        raise UserInputError("jobs: choose one of list, show, cancel")
    return EXIT_OK


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
        state = "stopped" if info.stopped else info.state  # running, but never progressing
        print(f"{info.id:<22} {printable(_short_kind(str(info.kind))):<10} {state:<10} "
              f"{format_progress(info):>8}  {printable(info.created)}", file=file)


def print_job(info: JobInfo, file: IO[str] | None = None) -> None:
    file = file or sys.stdout
    print(f"job {info.id}: {printable(info.kind)}, {info.state}", file=file)
    print(f"created: {printable(info.created)}", file=file)
    print(f"folder: {info.folder}", file=file)
    print(f"pid: {info.pid if info.pid is not None else '-'}", file=file)
    print("spec: " + json.dumps(info.spec, indent=2), file=file)
    if info.last_progress:
        progress = info.last_progress
        stage = f"{progress['stage']} " if progress.get("stage") else ""
        eta = f", ETA {clock(progress['eta_s'])}" if progress.get("eta_s") is not None else ""
        print(printable(f"progress: {stage}{progress.get('done')}/{progress.get('total')}{eta}"), file=file)
    if info.result is not None:
        print("result: " + json.dumps(info.result, indent=2), file=file)
    if info.error:
        print(f"error: {printable(info.error)}", file=file)
    if info.stopped:
        print(stopped_text(info), file=file)


def _short_kind(kind: str) -> str:
    return kind.rpartition(":")[2] if ":" in kind else kind


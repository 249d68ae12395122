"""`lndgst demo`: the whole loop on the demo model and phantoms."""

from __future__ import annotations

import argparse
from pathlib import Path

from LymphNodeDGSTLib.cli.options import add_device
from LymphNodeDGSTLib.home import Home

COMMAND = "demo"


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="the whole loop on the demo model and phantoms")
    demo.add_argument("--output", default="demo-output", help="folder for the demo's files")
    demo.add_argument("--iterations", type=int, default=None,
                      help="a fixed schedule of N iterations instead of the automatic schedule")
    add_device(demo)


def handle(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.demo.run_demo import run_demo

    return run_demo(home, Path(args.output), device=args.device, iterations=args.iterations)

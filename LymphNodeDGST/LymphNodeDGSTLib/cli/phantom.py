"""`lndgst phantom`: write synthetic neck CT phantoms with exact lymph-node labels."""

from __future__ import annotations

import argparse

from LymphNodeDGSTLib.errors import EXIT_OK
from LymphNodeDGSTLib.home import Home

COMMAND = "phantom"


def register(commands: argparse._SubParsersAction) -> None:
    phantom = commands.add_parser("phantom", help="write synthetic neck CT phantoms (site A or B)")
    phantom.add_argument("out_dir", help="folder to write the CT and label NIfTI files into")
    phantom.add_argument("--site", default="A", help="site profile: A (non-contrast, 3 mm), B "
                         "(contrast, 1.25 mm, larger and necrotic nodes) or C (B's scanner, rim-enhancing "
                         "flat nodes: the harder shift)")
    phantom.add_argument("--n", type=int, default=1, help="how many phantoms")
    phantom.add_argument("--seed", type=int, default=0, help="seed of the first phantom")


def handle(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.demo.phantom import write_phantoms

    for image, label in write_phantoms(args.out_dir, args.site, args.n, args.seed):
        print(f"{image}\t{label}")
    return EXIT_OK


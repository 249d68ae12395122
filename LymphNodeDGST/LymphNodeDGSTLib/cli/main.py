"""The `lndgst` command line (also `python -m LymphNodeDGSTLib`).

Exit status: 0 success; 2 bad input or usage (one clear line on stderr, nothing written);
1 unexpected failure.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from types import ModuleType
from typing import Sequence

from LymphNodeDGSTLib.cli import adapt, bench, cases, demo, jobs, models, phantom, rank, segment
from LymphNodeDGSTLib.cli.options import CommandParser
from LymphNodeDGSTLib.errors import (EXIT_FAILURE, EXIT_OK, EXIT_USAGE,  # noqa: F401 (re-exported)
                                     Cancelled, OutOfMemory, UserInputError)
from LymphNodeDGSTLib.home import resolve_home

# Each command group: a module with COMMAND, register(subparsers) and handle(args, home), in the
# order `lndgst --help` lists them.
COMMAND_GROUPS: tuple[ModuleType, ...] = (models, segment, cases, adapt, rank, jobs, phantom, bench, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="lndgst", description=__doc__.split("\n")[0])
    parser.add_argument("--home", help="home folder (default $LNDGST_HOME or ~/.lymphnode-dgst)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", parser_class=CommandParser)
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            from LymphNodeDGSTLib import __version__
            print(__version__)
            return EXIT_OK
        if not args.command:
            build_parser().print_help()
            return EXIT_USAGE
        home = resolve_home(args.home)
        handlers = {group.COMMAND: group.handle for group in COMMAND_GROUPS}
        return handlers[args.command](args, home)
    except UserInputError as error:
        print(f"lndgst: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Cancelled as error:
        print(f"lndgst: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except OutOfMemory as error:
        print(f"lndgst: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("lndgst: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - last resort: say it is a bug, keep the traceback
        traceback.print_exc()
        print("lndgst: unexpected failure (a bug: please report it with the lines above)",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

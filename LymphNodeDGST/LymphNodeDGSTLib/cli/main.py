"""The `lndgst` command line (also `python -m LymphNodeDGSTLib`).

Exit status: 0 success; 2 bad input or usage, or a file system the user must fix (full, read-only,
no permission): one clear line on stderr, nothing written; 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
import warnings
from types import ModuleType
from typing import Sequence

from LymphNodeDGSTLib.cli import adapt, bench, cases, cohort, demo, jobs, models, phantom, rank, segment
from LymphNodeDGSTLib.cli.options import CommandParser
from LymphNodeDGSTLib.errors import (EXIT_FAILURE, EXIT_OK, EXIT_USAGE,  # noqa: F401 (re-exported)
                                     Cancelled, OutOfMemory, UserInputError, WriteFailed,
                                     environment_problem, printable)
from LymphNodeDGSTLib.home import Home, home_problem, resolve_home

# Each command group: a module with COMMAND, register(subparsers) and handle(args, home), in the
# order `lndgst --help` lists them.
COMMAND_GROUPS: tuple[ModuleType, ...] = (models, segment, cohort, cases, adapt, rank, jobs, phantom, bench,
                                          demo)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="lndgst", description=__doc__.split("\n")[0])
    parser.add_argument("--home", help="home folder (default $LNDGST_HOME or ~/.lymphnode-dgst)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", parser_class=CommandParser)
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser


def _chosen_home(explicit: str | None) -> Home:
    """resolve_home, with what a user can get wrong said in one line: a blank $LNDGST_HOME (it
    would be a folder named " "), an unknown ~user, a symlink loop."""
    environment = os.environ.get("LNDGST_HOME")
    if explicit is None and environment is not None and environment and not environment.strip():
        raise UserInputError("$LNDGST_HOME is blank; set it to a folder, or unset it to use "
                             "~/.lymphnode-dgst")
    try:
        return resolve_home(explicit)
    except (RuntimeError, OSError) as error:  # "Could not determine home directory", loops
        raise UserInputError(f"cannot use home {explicit or environment}: {error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            from LymphNodeDGSTLib import __version__
            print(__version__)
            return EXIT_OK
        if not args.command:
            build_parser().print_help(sys.stderr)  # a usage error: help on stderr, stdout empty
            return EXIT_USAGE
        if args.home is not None and not args.home.strip():
            raise UserInputError("--home is empty; give a folder (or leave --home out to use "
                                 "$LNDGST_HOME or ~/.lymphnode-dgst)")
        home = _chosen_home(args.home)
        problem = home_problem(home)
        if problem:
            raise UserInputError(problem + " (--home DIR or $LNDGST_HOME)")
        handlers = {group.COMMAND: group.handle for group in COMMAND_GROUPS}
        # Libraries' warnings (torch's UserWarnings) are held back until the command has ended:
        # an exit-2 refusal stays one line; otherwise they follow, one line each.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                return handlers[args.command](args, home)
            except (UserInputError, WriteFailed):
                caught.clear()
                raise
            finally:
                for message in dict.fromkeys(one_line(str(w.message)) for w in caught):
                    print(f"lndgst: warning: {message}", file=sys.stderr)
    except UserInputError as error:
        print(f"lndgst: error: {one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except Cancelled as error:
        print(f"lndgst: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except OutOfMemory as error:
        print(f"lndgst: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except WriteFailed as error:  # a full disk is the user's to fix, like bad input: exit 2
        print(f"lndgst: error: {one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lndgst: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`lndgst jobs list | head -1`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError, AttributeError):  # a stdout that is not a file
            pass
        return EXIT_OK
    except Exception as error:  # noqa: BLE001 - last resort: say it is a bug, keep the traceback
        problem = environment_problem(error)
        if problem is not None:  # a full disk or read-only folder is the user's to fix
            print(f"lndgst: error: {one_line(problem)}", file=sys.stderr)
            return EXIT_USAGE
        traceback.print_exc()
        print("lndgst: unexpected failure (a bug: please report it with the lines above)",
              file=sys.stderr)
        return EXIT_FAILURE


def one_line(message: str) -> str:
    """The exit-2 contract is one line: text from outside (a server's reply, a file name, a
    header) may hold line breaks, and terminal escapes, which are shown as escapes."""
    return printable(re.sub(r"\s*[\r\n]+\s*", " ", message).strip())


if __name__ == "__main__":
    sys.exit(main())

"""`lndgst models install | list | activate | rollback | export`."""

from __future__ import annotations

import argparse

from LymphNodeDGSTLib.errors import EXIT_OK, UserInputError
from LymphNodeDGSTLib.home import Home

COMMAND = "models"


def register(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="install, list, activate, roll back, export models")
    model_commands = models.add_subparsers(dest="models_command", parser_class=type(models))
    install = model_commands.add_parser("install", help="install an nnU-Net results folder, zip or URL")
    install.add_argument("source", help="results folder, zip of one, or http(s) URL of a zip")
    install.add_argument("--name", help="model name (default: the dataset name in plans.json)")
    install.add_argument("--sha256", help="expected SHA-256 of the zip or download")
    install.add_argument("--trust-checkpoint", action="store_true",
                         help="allow checkpoints that need arbitrary unpickling (trusted sources only)")
    install.add_argument("--force", action="store_true",
                         help="install even if the same checkpoints are already installed")
    model_commands.add_parser("list", help="installed models and versions (* = active)")
    activate = model_commands.add_parser("activate", help="make NAME@VERSION the active version")
    activate.add_argument("spec", metavar="NAME@VERSION")
    rollback = model_commands.add_parser("rollback", help="re-activate the previously active version")
    rollback.add_argument("name")
    export = model_commands.add_parser("export", help="write a plain nnU-Net results folder")
    export.add_argument("spec", metavar="NAME@VERSION")
    export.add_argument("destination")


def handle(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.engine.models import ModelStore, format_version_line, parse_model_spec

    store = ModelStore(home.models)
    command = args.models_command
    if command == "install":
        version = store.install(args.source, name=args.name, sha256=args.sha256,
                                trust_checkpoint=args.trust_checkpoint, force=args.force)
        print(version.ref)
    elif command == "list":
        names = store.names()
        if not names:
            print("no models installed")
        for name in names:
            active, versions, problems = store.survey(name)
            print(name)
            for version in versions:
                print("  " + format_version_line(version, active))
            for problem in problems:  # listed, not fatal: `list` is where a user looks first
                print(f"  ! damaged: {problem}")
    elif command == "activate":
        name, number = parse_model_spec(args.spec)
        if number is None:
            raise UserInputError("activate needs NAME@VERSION")
        print(store.activate(name, number).ref)
    elif command == "rollback":
        print(store.rollback(args.name).ref)
    elif command == "export":
        _, number = parse_model_spec(args.spec)
        if number is None:
            args.spec = store.resolve(args.spec).ref
        print(store.export(args.spec, args.destination))
    else:
        raise UserInputError("models: choose one of install, list, activate, rollback, export")
    return EXIT_OK

"""`lndgst models install | list | activate | rollback | export | export-adapter | install-adapter`."""

from __future__ import annotations

import argparse

from LymphNodeDGSTLib.errors import EXIT_OK, UserInputError, printable
from LymphNodeDGSTLib.home import Home

COMMAND = "models"


def register(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="install, list, activate, roll back, export models")
    model_commands = models.add_subparsers(dest="models_command", parser_class=type(models))
    install = model_commands.add_parser(
        "install", help="install an nnU-Net results folder, zip, URL or bare checkpoint file(s)")
    install.add_argument("source", nargs="+",
                         help="results folder, zip of one, http(s) URL, or nnU-Net v2 checkpoint "
                              "file(s) (several: the folds of one model)")
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
    export_adapter = model_commands.add_parser(
        "export-adapter", help="write a version as a site adapter (delta over its parent)")
    export_adapter.add_argument("spec", metavar="NAME@VERSION")
    export_adapter.add_argument("file", help="adapter file to write (.safetensors)")
    export_adapter.add_argument("--force", action="store_true", help="replace an existing file")
    install_adapter = model_commands.add_parser(
        "install-adapter", help="add a site adapter as a new version of the base it was made from")
    install_adapter.add_argument("file")
    install_adapter.add_argument("--activate", action="store_true", help="activate the new version")


def handle(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.engine.store.models import ModelStore, format_version_line, parse_model_spec

    store = ModelStore(home.models)
    command = args.models_command
    if command == "install":
        if len(args.source) > 1:
            if args.sha256:
                raise UserInputError("--sha256 applies to one file or URL, not to several checkpoints")
            version = store.install_checkpoints(args.source, name=args.name,
                                                trust_checkpoint=args.trust_checkpoint, force=args.force)
        else:
            version = store.install(args.source[0], name=args.name, sha256=args.sha256,
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
                print(f"  ! damaged: {printable(problem)}")
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
    elif command == "export-adapter":
        from LymphNodeDGSTLib.engine.store.adapter_store import export_adapter
        print(export_adapter(store, args.spec, args.file, force=args.force))
    elif command == "install-adapter":
        from LymphNodeDGSTLib.engine.store.adapter_store import install_adapter
        print(install_adapter(store, args.file, activate=args.activate).ref)
    else:
        raise UserInputError("models: choose one of install, list, activate, rollback, export, "
                             "export-adapter, install-adapter")
    return EXIT_OK

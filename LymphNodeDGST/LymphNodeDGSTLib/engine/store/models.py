"""The model store: installed nnU-Net models, their numbered versions and the active one.

Layout under `home/models/NAME/`:
    versions/N/            an nnU-Net results folder (dataset.json, plans.json, fold_*/...)
    versions/N/version.json  what this version is (source, parent, method, hashes, metrics)
    state.json             {"active": N, "history": [earlier active versions]}

Every change is write-then-rename: a version folder appears complete or not at all, and the
active version switches atomically.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from LymphNodeDGSTLib.atomic import staging_folder, write_json_atomic
from LymphNodeDGSTLib.errors import ModelValidationError, UserInputError, printable
from LymphNodeDGSTLib.engine.store.fetch import (check_url, download, extract_zip_safely, is_url,
                                           verify_sha256)
from LymphNodeDGSTLib.engine.store.json_files import (BOOLEAN, OBJECT, OPTIONAL_NUMBER, OPTIONAL_OBJECT,
                                                OPTIONAL_POSITIVE_INT, OPTIONAL_TEXT, POSITIVE_INT,
                                                POSITIVE_INT_LIST, TEXT, check_fields,
                                                read_json_object)
from LymphNodeDGSTLib.engine.store.results_folders import (CHECKPOINT_NAME, ResultsFolderInfo, find_checkpoints,
                                                validate_results_folder)
from LymphNodeDGSTLib.engine.processes import owner_alive, owner_tag
from LymphNodeDGSTLib.engine.store.names import NAME_PATTERN, VERSION_PATTERN

URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
DOWNLOADS = ".downloads"
INSTALL_PREFIX, NEW_PREFIX = ".install-", ".new-"
# Version numbers tried when publishing before giving up (each taken one moves on to the next).
PUBLISH_TRIES = 100
VERSION_FILE, STATE_FILE = "version.json", "state.json"
STATE_FIELDS = {"active": OPTIONAL_POSITIVE_INT, "history": POSITIVE_INT_LIST}
# The fields of version.json that the store and its faces read.
VERSION_FIELDS = {"parent": OPTIONAL_POSITIVE_INT, "created": TEXT, "method": OPTIONAL_TEXT,
                  "metrics": OPTIONAL_OBJECT, "labels": OBJECT, "trusted_checkpoint": BOOLEAN,
                  "checkpoint_sha256": OBJECT, "configuration": TEXT, "version": POSITIVE_INT}
METRIC_FIELDS = {"dice_before": OPTIONAL_NUMBER, "dice_after": OPTIONAL_NUMBER}
RESULTS_FILES = ("dataset.json", "plans.json")


class AlreadyInstalled(UserInputError):
    """The checkpoints being installed are those of an installed version (`ref`)."""

    def __init__(self, ref: str):
        super().__init__(f"these checkpoints are already installed as {ref}; pass --force to "
                         "install them again as a new version")
        self.ref = ref


@dataclass(frozen=True)
class ModelVersion:
    """One installed version: a results folder nnU-Net can load, plus what we know about it."""

    name: str
    version: int
    path: Path
    metadata: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def parent(self) -> int | None:
        return self.metadata.get("parent")


def parse_model_spec(spec: str) -> tuple[str, int | None]:
    """'NAME' -> (NAME, None); 'NAME@3' -> (NAME, 3)."""
    name, _, version = spec.partition("@")
    if not NAME_PATTERN.fullmatch(name):
        raise UserInputError(f"invalid model name '{name}': use letters, digits, '_', '-', '.'")
    if not version:
        return name, None
    if not VERSION_PATTERN.fullmatch(version) or int(version) < 1:
        raise UserInputError(f"invalid version in '{spec}': versions are 1, 2, 3, ...")
    return name, int(version)


class ModelStore:
    """Installed models under one folder; safe for several processes reading while one writes."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ---------------------------------------------------------------- queries
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_PATTERN.fullmatch(p.name) and (p / "versions").is_dir()
                      and self._version_numbers(p.name))

    def versions(self, name: str) -> list[ModelVersion]:
        return [self._load_version(name, n) for n in self._version_numbers(name)]

    def survey(self, name: str) -> tuple[int | None, list[ModelVersion], list[str]]:
        """For listings: the active version, the versions that load, and one message per damaged
        file (state.json, a version.json) instead of stopping at the first."""
        problems = []
        try:
            active = self.active_version(name)
        except UserInputError as damaged:
            active, problems = None, [str(damaged)]
        versions = []
        for number in self._version_numbers(name):
            try:
                versions.append(self._load_version(name, number))
            except UserInputError as damaged:
                problems.append(str(damaged))
        return active, versions, problems

    def active_version(self, name: str) -> int | None:
        state = self._read_state(name)
        return state.get("active")

    def resolve(self, spec: str | None = None) -> ModelVersion:
        """The version a spec names: 'NAME@N', 'NAME' (its active version) or None (the only model)."""
        if spec is None:
            names = self.names()
            if not names:
                raise UserInputError("no model installed; install one with "
                                     "'lndgst models install PATH_OR_URL'")
            if len(names) > 1:
                raise UserInputError(f"several models installed ({', '.join(names)}); "
                                     "choose one with --model NAME")
            spec = names[0]
        name, version = parse_model_spec(spec)
        if name not in self.names():
            raise UserInputError(f"no model named '{name}'; installed: "
                                 f"{', '.join(self.names()) or 'none'}")
        if version is None:
            version = self.active_version(name)
            if version is None:
                raise UserInputError(f"model '{name}' has no active version; activate one")
        if version not in self._version_numbers(name):
            raise UserInputError(f"model '{name}' has no version {version}; it has "
                                 f"{', '.join(map(str, self._version_numbers(name)))}")
        return self._load_version(name, version)

    # ---------------------------------------------------------------- changes
    def install(self, source: str | os.PathLike, name: str | None = None, sha256: str | None = None,
                trust_checkpoint: bool = False, show_progress: bool = True,
                force: bool = False) -> ModelVersion:
        """Install a results folder, a zip of one, or an http(s) URL of a zip as a new model version.

        Checkpoints identical to an installed version of the same name are refused unless `force`.
        """
        source = str(source)
        if name is not None:
            parse_model_spec(name)
            if "@" in name:
                raise UserInputError("--name takes a model name without '@VERSION'")
        scheme = URL_SCHEME.match(source)
        if scheme and not is_url(source):
            raise UserInputError(f"unsupported URL scheme '{scheme.group(1)}': give an http(s) URL, "
                                 "or download the file and install it from its path")
        if is_url(source):
            check_url(source)
        created_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.root, INSTALL_PREFIX)
        try:
            version = self._install(source, name, sha256, trust_checkpoint, show_progress, force)
        finally:
            # The finished download is not kept (a partial one stays, to resume); nor is a models
            # folder this failed install created.
            if is_url(source):
                self._download_path(source).unlink(missing_ok=True)
                _remove_if_empty(self.root / DOWNLOADS)
            if created_root:
                _remove_if_empty(self.root)
        return version

    def _install(self, source: str, name: str | None, sha256: str | None, trust_checkpoint: bool,
                 show_progress: bool, force: bool) -> ModelVersion:
        with staging_folder(self.root, f"{INSTALL_PREFIX}{owner_tag()}-") as work:
            if is_url(source):
                self._download_path(source).parent.mkdir(exist_ok=True)
                archive = download(source, self._download_path(source), sha256, show_progress)
                folder = self._open_file(archive, work, trust_checkpoint)
            else:
                path = Path(source).expanduser()
                if not path.exists():
                    raise UserInputError(f"not found: {path}")
                if path.is_dir():
                    if sha256:
                        raise UserInputError("--sha256 applies to a zip file or URL, not a folder")
                    folder = path
                else:
                    if sha256:
                        verify_sha256(path, sha256)
                    folder = self._open_file(path, work, trust_checkpoint)
            info = validate_results_folder(folder, trust=trust_checkpoint)
            model_name = name or default_model_name(folder)
            if not force:
                self._refuse_reinstall(model_name, info)
            metadata = {
                "source": source if is_url(source) else str(Path(source).expanduser().resolve()),
                "kind": "installed",
                "parent": None,
                "trusted_checkpoint": bool(trust_checkpoint),
            }
            return self.add_version(model_name, folder, metadata, info=info, activate_if_first=True)

    def _refuse_reinstall(self, name: str, info: ResultsFolderInfo) -> None:
        """Refuse installing checkpoints identical to an installed version of `name`."""
        if not info.checkpoint_sha256:
            return
        for version in self.versions(name):
            if version.metadata.get("checkpoint_sha256") == info.checkpoint_sha256:
                raise AlreadyInstalled(version.ref)

    def install_checkpoints(self, sources: list[str | os.PathLike], name: str | None = None,
                            trust_checkpoint: bool = False, force: bool = False) -> ModelVersion:
        """Install several bare nnU-Net v2 checkpoint files (the folds of one model) as one model."""
        from LymphNodeDGSTLib.engine.store.checkpoint_folder import is_torch_checkpoint, rebuild_results_folder

        if len(sources) == 1:
            return self.install(sources[0], name=name, trust_checkpoint=trust_checkpoint, force=force)
        if name is not None:
            parse_model_spec(name)
            if "@" in name:
                raise UserInputError("--name takes a model name without '@VERSION'")
        paths = [Path(s).expanduser() for s in sources]
        for path in paths:
            if not path.is_file():
                raise UserInputError(f"not found: {path}" if not path.exists() else
                                     f"{path}: several sources must all be checkpoint files (folds)")
            if not is_torch_checkpoint(path):
                raise ModelValidationError(f"{path}: not an nnU-Net checkpoint file; several sources "
                                           "must all be checkpoints (the folds of one model)")
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.root, INSTALL_PREFIX)
        with staging_folder(self.root, f"{INSTALL_PREFIX}{owner_tag()}-") as work:
            folder = rebuild_results_folder(paths, work / "rebuilt", trust=trust_checkpoint)
            info = validate_results_folder(folder, trust=trust_checkpoint)
            if not force:
                self._refuse_reinstall(name or default_model_name(folder), info)
            metadata = {"source": [str(p.resolve()) for p in paths], "kind": "installed",
                        "parent": None, "trusted_checkpoint": bool(trust_checkpoint)}
            return self.add_version(name or default_model_name(folder), folder, metadata, info=info,
                                    activate_if_first=True)

    def _open_file(self, path: Path, work: Path, trust: bool) -> Path:
        """The results folder in a zip, or one rebuilt from a bare checkpoint file's init_args."""
        from LymphNodeDGSTLib.engine.store.checkpoint_folder import is_torch_checkpoint, rebuild_results_folder

        if is_torch_checkpoint(path):
            return rebuild_results_folder([path], work / "rebuilt", trust=trust)
        return self._unpack(path, work / "unpacked")

    def _download_path(self, url: str) -> Path:
        """A stable place per URL, so an interrupted download resumes where it stopped."""
        return self.root / DOWNLOADS / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".zip")

    def add_version(self, name: str, results_folder: str | os.PathLike, metadata: dict,
                    info: ResultsFolderInfo | None = None, activate_if_first: bool = True,
                    extra_files: tuple[str, ...] = ()) -> ModelVersion:
        """Copy a validated results folder in as the next version of `name` (created if new),
        with `extra_files` (names inside the results folder, e.g. a report) beside it."""
        parse_model_spec(name)
        results_folder = Path(results_folder)
        info = info or validate_results_folder(results_folder)
        # read before publishing: a damaged state.json stops the install before versions/N appears
        first_version = activate_if_first and self.active_version(name) is None
        versions_dir = self.root / name / "versions"
        new_name = not versions_dir.exists()
        versions_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(versions_dir, NEW_PREFIX)
        try:
            number = self._stage_and_publish(name, results_folder, metadata, info, extra_files)
        except BaseException:
            if new_name:  # leave no empty model behind
                _remove_if_empty(versions_dir)
                _remove_if_empty(versions_dir.parent)
            raise
        if first_version:
            self.activate(name, number)
        return self._load_version(name, number)

    def _stage_and_publish(self, name: str, results_folder: Path, metadata: dict,
                           info: ResultsFolderInfo, extra_files: tuple[str, ...]) -> int:
        versions_dir = self.root / name / "versions"
        with staging_folder(versions_dir, f"{NEW_PREFIX}{owner_tag()}-") as staged:
            copy_results_folder(results_folder, staged)
            for extra in extra_files:
                shutil.copyfile(results_folder / extra, staged / extra)
            record = {
                "name": name,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "configuration": info.configuration,
                "folds": info.folds,
                "labels": info.labels,
                "trainer_name": info.trainer_name,
                "parameters": info.parameters,
                "checkpoint_sha256": info.checkpoint_sha256,
                "weights_sha256": info.weights_sha256,
                **metadata,
            }
            return self._publish(staged, versions_dir, record)

    def _publish(self, staged: Path, versions_dir: Path, record: dict) -> int:
        """Rename the staged version to the next free number: above every numbered entry, even
        a stray file or an incomplete folder, trying the next one if another process is faster."""
        taken = [int(p.name) for p in versions_dir.iterdir() if VERSION_PATTERN.fullmatch(p.name)]
        number = max(taken, default=0) + 1
        for _ in range(PUBLISH_TRIES):
            record["version"] = number
            write_json_atomic(staged / VERSION_FILE, record)
            target = versions_dir / str(number)
            # rename() would replace an empty folder: only a name that is free is tried.
            if not os.path.lexists(target):
                try:
                    os.rename(staged, target)  # atomic; fails if the name was taken meanwhile
                    return number
                except OSError:
                    if not os.path.lexists(target):
                        raise
            number += 1
        raise UserInputError(f"{versions_dir}: no free version number after {PUBLISH_TRIES} "
                             "tries; remove stray entries there")

    def activate(self, name: str, version: int) -> ModelVersion:
        """Make NAME@version the active one; also the repair for a damaged state.json (which is
        then rewritten with an empty history)."""
        target = self.resolve(f"{name}@{version}")
        try:
            state = self._read_state(name)
        except UserInputError:
            state = {}
        current = state.get("active")
        if current != version:
            history = list(state.get("history", []))
            if current is not None:
                history.append(current)
            self._write_state(name, {"active": version, "history": history})
        return target

    def rollback(self, name: str) -> ModelVersion:
        """Re-activate the version that was active before the current one."""
        self.resolve(name)
        state = self._read_state(name)
        history = [v for v in state.get("history", []) if v in self._version_numbers(name)]
        if not history:
            raise UserInputError(f"model '{name}': nothing to roll back to (version "
                                 f"{state.get('active')} is the first active version)")
        previous = history.pop()
        self._write_state(name, {"active": previous, "history": history})
        return self._load_version(name, previous)

    def export(self, spec: str, destination: str | os.PathLike) -> Path:
        """Write a plain nnU-Net results folder (no store metadata) that stock nnU-Net loads."""
        version = self.resolve(spec)
        destination = Path(destination).expanduser()
        if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
            raise UserInputError(f"export destination exists and is not an empty folder: {destination}")
        parent = destination.parent
        if not parent.is_dir():
            raise UserInputError(f"export destination's folder does not exist: {parent}")
        if not os.access(parent, os.W_OK):
            raise UserInputError(f"export destination's folder is not writable: {parent}")
        with staging_folder(parent, f".{destination.name[:100]}.export-") as staged:
            try:
                copy_results_folder(version.path, staged)
            except OSError as error:  # a full disk is the destination's, not the source file's
                raise OSError(error.errno, error.strerror, str(destination)) from None
            if destination.exists():
                destination.rmdir()
            os.rename(staged, destination)
        return destination

    # ---------------------------------------------------------------- internals
    def _version_numbers(self, name: str) -> list[int]:
        folder = self.root / name / "versions"
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if VERSION_PATTERN.fullmatch(p.name) and (p / VERSION_FILE).is_file())

    def _load_version(self, name: str, number: int) -> ModelVersion:
        path = self.root / name / "versions" / str(number)
        repair = (f"fix or restore that file, or move the folder {path} out of the store to drop "
                  f"version {name}@{number}")
        metadata = read_json_object(path / VERSION_FILE, repair, VERSION_FIELDS)
        check_fields(metadata.get("metrics") or {}, path / VERSION_FILE, METRIC_FIELDS,
                                repair)
        return ModelVersion(name, number, path, metadata)

    def _read_state(self, name: str) -> dict:
        """{"active": N, "history": [...]}; {} for a model never activated. A damaged state.json
        raises, saying that `models activate` rewrites it."""
        path = self.root / name / STATE_FILE
        if not path.exists():
            return {}
        numbers = ", ".join(map(str, self._version_numbers(name))) or "none"
        return read_json_object(path, f"repair it by activating a version: 'lndgst models "
                                      f"activate {name}@N' (versions: {numbers})", STATE_FIELDS)

    def _write_state(self, name: str, state: dict) -> None:
        write_json_atomic(self.root / name / STATE_FILE, state)

    def _unpack(self, archive: Path, destination: Path) -> Path:
        destination.mkdir(parents=True, exist_ok=True)
        extract_zip_safely(archive, destination, wanted=is_results_file)
        return locate_results_folder(destination, archive)


def is_results_file(name: str) -> bool:
    """Whether an archive entry is one a results folder needs: dataset.json, plans.json or a
    fold's final checkpoint (anything else in a zip is never unpacked)."""
    parts = name.rstrip("/").split("/")
    if parts[-1] in RESULTS_FILES:
        return True
    return (len(parts) >= 2 and parts[-1] == CHECKPOINT_NAME and parts[-2].startswith("fold_"))


def remove_stale_staging(folder: Path, prefix: str) -> None:
    """Remove staging folders (`prefix` + owner tag) whose process is gone: left by a killed
    install or publication. Folders of running processes, and untagged ones, are left alone."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(prefix) and entry.is_dir():
            tag = entry.name[len(prefix):].rpartition("-")[0]
            if owner_alive(tag) is False:
                shutil.rmtree(entry, ignore_errors=True)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty, or already gone


def locate_results_folder(extracted: Path, archive: Path) -> Path:
    """The one folder inside an extracted archive that holds plans.json and dataset.json."""
    candidates = sorted({p.parent for p in extracted.rglob("plans.json")
                         if (p.parent / "dataset.json").is_file()})
    if not candidates:
        raise ModelValidationError(f"{archive}: no nnU-Net results folder (plans.json with "
                                   "dataset.json) inside the archive")
    if len(candidates) > 1:
        names = ", ".join(str(c.relative_to(extracted)) for c in candidates)
        raise ModelValidationError(f"{archive}: holds several results folders ({names}); "
                                   "install one of them from an extracted folder")
    return candidates[0]


def copy_results_folder(source: Path, destination: Path) -> None:
    """Copy dataset.json, plans.json and each fold's final checkpoint (nothing else)."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in RESULTS_FILES:
        shutil.copyfile(source / name, destination / name)  # new files: the umask, as cp does
    for fold, checkpoint in find_checkpoints(source).items():
        (destination / f"fold_{fold}").mkdir(exist_ok=True)
        shutil.copyfile(checkpoint, destination / f"fold_{fold}" / checkpoint.name)


def default_model_name(folder: Path) -> str:
    """A name from the dataset name in plans.json, else from the folder name."""
    try:
        raw = json.loads((folder / "plans.json").read_text()).get("dataset_name") or folder.name
    except (OSError, json.JSONDecodeError):
        raw = folder.name
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(raw)).strip("-.") or "model"
    return cleaned[:64]


def format_version_line(version: ModelVersion, active: int | None) -> str:
    """One line of `models list`; text from version.json is escaped (an adapter's record may hold
    line breaks or terminal escapes), a metric that is not a finite number is left out."""
    marker = "*" if version.version == active else " "
    meta = version.metadata
    parts = [f"{marker} {version.ref}", printable(meta.get("created", ""))]
    if meta.get("parent") is not None:
        parts.append(f"parent @{printable(meta['parent'])}")
    if meta.get("method"):
        parts.append(f"method {printable(meta['method'])}")
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    metric = metrics.get("dice_after")
    if isinstance(metric, (int, float)) and not isinstance(metric, bool) and math.isfinite(metric):
        held_out = metrics.get("evaluation_is_held_out", True)
        parts.append(f"{'held-out Dice' if held_out else 'Dice on its training cases'} {metric:.3f}")
    return "  ".join(p for p in parts if p)


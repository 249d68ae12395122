"""The model store against stray entries, hostile archives, leftovers and repeats (issue 12:
data loss 3 and the store's risks)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import run_cli, tree_snapshot

from LymphNodeDGSTLib.cli import main as cli
from LymphNodeDGSTLib.engine.store import fetch
from LymphNodeDGSTLib.engine.store import models
from LymphNodeDGSTLib.engine.store.models import ModelStore, format_version_line
from LymphNodeDGSTLib.engine.processes import owner_tag
from LymphNodeDGSTLib.errors import ModelValidationError, UserInputError

PREFIX = "Dataset901/nnUNetTrainer__nnUNetPlans__3d_fullres"


class Hung(Exception):
    pass


@pytest.fixture
def time_limit():
    """Raise Hung in the test after `seconds` (the old publish loop never returned)."""
    def on_alarm(signum, frame):
        raise Hung("did not finish in time: an endless loop?")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    yield lambda seconds: signal.alarm(seconds)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def zip_with(folder: Path, archive: Path, extra: dict[str, bytes] | None = None,
             compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(archive, "w", compression) as bundle:
        for path in folder.rglob("*"):
            if path.is_file():
                bundle.write(path, f"{PREFIX}/{path.relative_to(folder)}")
        for name, data in (extra or {}).items():
            bundle.writestr(name, data)
    return archive


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------- stray versions/N
@pytest.mark.parametrize("stray", ["file", "export without version.json", "empty folder"])
def test_publish_skips_a_stray_version_entry(installed_home, tiny_model_folder, time_limit, stray):
    """Catches the publish loop retrying the same number (found: `models install` spinning
    forever on a stray `versions/2`), and a number chosen from complete versions only."""
    store = ModelStore(installed_home / "models")
    entry = installed_home / "models" / "tiny" / "versions" / "2"
    if stray == "file":
        entry.write_text("not a version")
    elif stray == "empty folder":
        entry.mkdir()
    else:
        store.export("tiny@1", entry)
    time_limit(30)
    # Adaptation publishes through add_version, `models install` too.
    adapted = store.add_version("tiny", tiny_model_folder, {"kind": "adapted", "parent": 1},
                                activate_if_first=False)
    assert adapted.ref == "tiny@3"
    assert entry.exists() and (entry.is_file() or not (entry / "version.json").exists())
    status = cli.main(["--home", str(installed_home), "models", "install", str(tiny_model_folder),
                       "--name", "tiny", "--force"])
    assert status == 0 and store.resolve("tiny@4").ref == "tiny@4"


def test_publish_gives_up_after_a_bounded_number_of_tries(installed_home, tiny_model_folder,
                                                          monkeypatch, time_limit):
    """Catches an unbounded retry: every name taken -> a clear error, and nothing half-published."""
    store = ModelStore(installed_home / "models")
    before = tree_snapshot(installed_home / "models")
    monkeypatch.setattr(models.os.path, "lexists", lambda path: True)
    time_limit(30)
    with pytest.raises(UserInputError, match="no free version number after 100 tries"):
        store.add_version("tiny", tiny_model_folder, {"kind": "adapted", "parent": 1})
    assert tree_snapshot(installed_home / "models") == before


# ---------------------------------------------------------------- archives
def test_only_results_files_are_extracted(tiny_model_folder, tmp_path):
    """Catches extracting every entry (found: a 4.4 MB zip unpacked to 305 MB of extras)."""
    archive = zip_with(tiny_model_folder, tmp_path / "model.zip",
                       {"extras/padding.bin": b"\0" * (8 << 20), f"{PREFIX}/fold_0/debug.json": b"{}",
                        f"{PREFIX}/fold_0/checkpoint_best.pth": b"x" * 1000})
    destination = tmp_path / "out"
    destination.mkdir()
    fetch.extract_zip_safely(archive, destination, wanted=models.is_results_file)
    extracted = sorted(str(p.relative_to(destination / PREFIX)) for p in destination.rglob("*")
                       if p.is_file())
    assert extracted == ["dataset.json", "fold_0/checkpoint_final.pth", "plans.json"]


def test_zip_bomb_entry_is_refused_before_writing(home, tiny_model_folder, tmp_path):
    """Catches the missing ratio bound: a plans.json padded with 4 MB of spaces (ratio ~1000)
    is still valid JSON and was installed."""
    padded = tmp_path / "padded"
    shutil.copytree(tiny_model_folder, padded)
    plans = padded / "plans.json"
    plans.write_text(plans.read_text() + " " * (4 << 20))
    archive = zip_with(padded, tmp_path / "bomb.zip")
    result = run_cli("models", "install", str(archive), home=home)
    assert result.returncode == 2 and "zip bomb" in result.stderr, result.stderr
    assert not (home / "models").exists()


def test_archive_over_the_size_bound_is_refused(home, tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "MAX_EXTRACTED_BYTES", 1000)
    archive = zip_with(tiny_model_folder, tmp_path / "model.zip")
    with pytest.raises(ModelValidationError, match="would unpack to"):
        ModelStore(home / "models").install(archive, show_progress=False)
    assert not (home / "models").exists()


# ---------------------------------------------------------------- leftovers
def test_failed_install_leaves_no_empty_models_folder(home, tiny_model_folder, tmp_path):
    """Catches the empty `models/` (and `models/NAME/versions/`) a failed first install left."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_folder, broken)
    (broken / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    result = run_cli("models", "install", str(broken), "--name", "x", home=home)
    assert result.returncode == 2, result.stderr
    assert not (home / "models").exists()


def test_failed_url_install_keeps_no_archive(home, tmp_path, monkeypatch):
    """Catches the finished download left in models/.downloads after a failed validation."""
    archive = tmp_path / "not-a-model.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("README.txt", "no results folder here")

    def fake_download(url, destination, sha256=None, show_progress=True, timeout=60.0):
        shutil.copyfile(archive, destination)
        return destination

    monkeypatch.setattr(models, "download", fake_download)
    with pytest.raises(ModelValidationError, match="no nnU-Net results folder"):
        ModelStore(home / "models").install("http://example.invalid/model.zip", show_progress=False)
    assert not (home / "models").exists()


def test_stale_staging_folders_of_dead_processes_are_removed(installed_home, tiny_model_folder):
    """Catches `.install-*` / `.new-*` folders left forever by a killed install: those of a dead
    process go at the next install; a running process's (this test's) stay."""
    root = installed_home / "models"
    pid = dead_pid()
    stale = [root / f".install-{pid}.12345-abcd", root / "tiny" / "versions" / f".new-{pid}.777-ef01"]
    live = root / f".install-{owner_tag()}-live"
    for folder in stale + [live]:
        (folder / "unpacked").mkdir(parents=True)
    store = ModelStore(root)
    store.install(tiny_model_folder, name="other", show_progress=False)
    store.add_version("tiny", tiny_model_folder, {"kind": "adapted", "parent": 1})
    assert not any(folder.exists() for folder in stale)
    assert live.exists()


# ---------------------------------------------------------------- repeats and wording
def test_same_checkpoints_twice_are_refused_unless_forced(home, tiny_model_folder, tmp_path):
    """Catches the silent identical second version (decision: refuse, --force installs)."""
    archive = zip_with(tiny_model_folder, tmp_path / "model.zip")
    assert run_cli("models", "install", str(archive), "--name", "m", home=home,
                   check_rc=0).stdout.strip() == "m@1"
    before = tree_snapshot(home)
    again = run_cli("models", "install", str(tiny_model_folder), "--name", "m", home=home)
    assert again.returncode == 2 and "already installed as m@1" in again.stderr
    assert "--force" in again.stderr and tree_snapshot(home) == before
    forced = run_cli("models", "install", str(archive), "--name", "m", "--force", home=home)
    assert forced.returncode == 0 and forced.stdout.strip() == "m@2"


def test_unsupported_url_scheme_is_named(home, capsys):
    """Catches `ftp://...` being looked up as a file ("not found")."""
    status = cli.main(["--home", str(home), "models", "install", "ftp://example.org/model.zip"])
    err = capsys.readouterr().err
    assert status == 2 and "unsupported URL scheme 'ftp'" in err, err


def test_models_list_says_where_the_dice_was_measured(installed_home):
    """Catches "held-out Dice" printed for an evaluation on the training cases."""
    version = ModelStore(installed_home / "models").resolve("tiny@1")
    for held_out, words in ((True, "held-out Dice 0.800"), (False, "Dice on its training cases 0.800")):
        metadata = {**version.metadata, "metrics": {"dice_before": 0.7, "dice_after": 0.8,
                                                   "evaluation_is_held_out": held_out}}
        line = format_version_line(models.ModelVersion("tiny", 1, version.path, metadata), 1)
        assert words in line
        assert ("held-out" in line) == held_out

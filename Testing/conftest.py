"""Shared fixtures: tiny nnU-Net models built at test time (nothing downloaded), homes, CT volumes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LNDGST_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_def_n_proc", "2")


def shared_file(relative: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared test data not available: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A seeded random-weight tiny nnU-Net results folder (about 280 k parameters)."""
    from LymphNodeDGSTLib.engine.architectures import create_random_model

    return create_random_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("LNDGST_HOME", str(folder))
    return folder


@pytest.fixture
def installed_home(home, tiny_model_folder) -> Path:
    from LymphNodeDGSTLib.engine.models import ModelStore

    ModelStore(home / "models").install(tiny_model_folder, name="tiny", show_progress=False)
    return home


def make_ct(shape_zyx=(24, 64, 64), spacing_xyz=(1.5, 1.5, 3.0), direction=None, origin=None,
            seed: int = 0) -> sitk.Image:
    """A small CT-like volume: air, a soft-tissue body, a bright bone rod and a few nodes."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape_zyx)
    cz, cy, cx = (np.array(shape_zyx) - 1) / 2
    body = ((y - cy) / (0.42 * shape_zyx[1])) ** 2 + ((x - cx) / (0.45 * shape_zyx[2])) ** 2 <= 1
    array = np.where(body, 40.0, -1000.0)
    array[((y - cy - 6) ** 2 + (x - cx) ** 2) <= 9] = 700.0
    for dy, dx in ((-8, -12), (-6, 14)):
        array[((y - cy - dy) ** 2 + (x - cx - dx) ** 2 + ((z - cz) * 0.5) ** 2) <= 9] = 80.0
    array = array + rng.normal(0, 10, shape_zyx)
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing_xyz)
    if direction is not None:
        image.SetDirection(direction)
    if origin is not None:
        image.SetOrigin(origin)
    return image


def run_cli(*args: str, home: Path | None = None, check_rc: int | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m LymphNodeDGSTLib ...` as a user would, in a real process."""
    command = [sys.executable, "-m", "LymphNodeDGSTLib"]
    if home is not None:
        command += ["--home", str(home)]
    completed = subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout,
                               encoding="utf-8", errors="replace")
    if check_rc is not None:
        assert completed.returncode == check_rc, (completed.stdout, completed.stderr)
    return completed


def tree_snapshot(folder: Path) -> dict[str, int]:
    """Relative path -> size for every file under folder: 'nothing changed' checks."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_model(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination

"""Shared fixtures: tiny nnU-Net models built at test time (nothing downloaded), homes, CT volumes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LNDGST_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_def_n_proc", "2")
# `auto` segmentations on fresh stores would each start a background convert-and-guard process
# (about a minute of CPU) that outlives its test; test_backends.py turns it on where it is tested.
os.environ.setdefault("LNDGST_BACKGROUND_CONVERSION", "0")

# `make test` runs the suite on pytest-xdist workers (`-n 2`). Each worker, and every process it
# starts (CLI runs, job workers), gets its share of the cores: two workers with two threads each
# on a 2-core machine would only fight over them (OpenMP barriers stall when cores are busy).
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // XDIST_WORKERS)))

# Tests that each take a minute or more: started first, so that under xdist the other worker
# runs the many short tests meanwhile instead of waiting for one long test at the end. Only the
# order changes (longest first); every test still runs.
LONG_TESTS = (
    "test_slicer_module_runs.py::test_the_workflow_through_the_panels_widgets",
    "test_demo.py::test_shortened_demo_runs_the_whole_loop",
    "test_adapt.py::test_adapt_wait_publishes_a_better_version_with_report_and_figure",
    "test_segment.py::test_body_crop_matches_uncropped_run_inside_the_body",
    "test_demo.py::test_demo_model_segments_an_unseen_site_a_phantom",
    "test_bench_adapt.py::",
    "test_segment.py::test_matches_stock_nnunet_predictor",
    "test_job_tree.py::test_cancelled_adaptation_under_a_launcher_leaves_no_process",
    "test_ddp_adapt.py::",
    "test_rank.py::test_failing_phantom_ranks_above_succeeding_one",
    "test_adapt.py::test_killed_worker_leaves_store_unchanged_and_releases_lock",
    "test_resenc.py::test_resenc_two_fold_model_install_segment_adapt_export_adapter_and_hot_swap",
    "test_model_store.py::test_cli_install_list_activate_rollback",
)
# Modules whose module-scoped fixture is expensive (a CLI benchmark run, a two-rank DDP run,
# nine phantoms, a CMake configure, an adapted model and its adapter): their tests stay on one
# xdist worker (--dist loadgroup) so the fixture runs once, not once per worker.
GROUPED_MODULES = ("test_bench_adapt.py", "test_ddp_adapt.py", "test_phantom.py", "test_packaging.py",
                   "test_site_adapters.py")


@pytest.hookimpl(tryfirst=True)  # xdist's own hook turns the markers into the groups it schedules by
def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.nodeid.split("/")[-1]
        return next((i for i, prefix in enumerate(LONG_TESTS) if name.startswith(prefix)), len(LONG_TESTS))

    for item in items:
        module = item.nodeid.split("::")[0].split("/")[-1]
        if module in GROUPED_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))
    if XDIST_WORKERS > 1:
        items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(autouse=True, scope="session")
def _worker_threads():
    """Under xdist: torch in this worker uses its share of the cores (see OMP_NUM_THREADS above)."""
    if XDIST_WORKERS > 1:
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield


def wait_for(condition, timeout: float = 15.0, what: str = "condition"):
    """Poll `condition` until it returns something true (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def shared_file(relative: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared test data not available: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A seeded random-weight tiny nnU-Net results folder (about 280 k parameters)."""
    from LymphNodeDGSTLib.engine.store.architectures import create_random_model

    return create_random_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("LNDGST_HOME", str(folder))
    return folder


@pytest.fixture
def installed_home(home, tiny_model_folder) -> Path:
    from LymphNodeDGSTLib.engine.store.models import ModelStore

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

"""Converting a model version for a backend in a background process, the first time `auto` meets it.

`python -m LymphNodeDGSTLib.engine.segmentation.backends.prepare VERSION_FOLDER BACKEND` converts every fold
into the version's cache (cache.py) at low priority and exits. For OpenVINO, `auto`'s backend, the
process started is the guard's (`python -m LymphNodeDGSTLib.engine.segmentation.backend_guard`),
which converts the same way and then decides bf16/INT8 (backend_guard.py). The segmentation that
started it runs with torch and never waits; the next one finds the conversion. A lock file keeps
to one converter per version and backend; it names its converter by pid and start time, so a lock
left by a killed converter is stale at once (its staging folders are dropped by the next one); a failure is kept as one line (`<format>.error`) so
that later runs say why they use torch instead of retrying forever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from LymphNodeDGSTLib.engine.processes import owner_alive, owner_tag
from LymphNodeDGSTLib.engine.segmentation.backends.cache import cache_root
from LymphNodeDGSTLib.engine.segmentation.backends.names import FORMAT_OF

STARTING_SECONDS = 60  # a lock not yet tagged with its converter's pid: being started
BACKGROUND_SWITCH = "LNDGST_BACKGROUND_CONVERSION"  # "0": `auto` never converts in the background
# the module a background process runs for a backend (named, not imported: it imports this one)
BACKGROUND_MODULE = {"openvino": "LymphNodeDGSTLib.engine.segmentation.backend_guard"}


def lock_path(version_path: Path, backend: str) -> Path:
    return cache_root(version_path) / f"{FORMAT_OF[backend]}.converting"


def error_path(version_path: Path, backend: str) -> Path:
    return cache_root(version_path) / f"{FORMAT_OF[backend]}.error"


def previous_failure(version_path: Path, backend: str) -> str | None:
    """The one-line reason a background conversion of this version failed, or None."""
    path = error_path(version_path, backend)
    try:
        return path.read_text(encoding="utf-8").strip().splitlines()[0][:200] or "unknown error"
    except (OSError, IndexError):
        return None


def conversion_running(version_path: Path, backend: str) -> bool:
    """Whether a converter holds the lock: the process its tag names (pid and start time) runs.
    A lock without a tag is a converter being started, for STARTING_SECONDS at most."""
    path = lock_path(version_path, backend)
    try:
        tag = path.read_text(encoding="ascii", errors="replace").strip()
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    alive = owner_alive(tag)
    return age < STARTING_SECONDS if alive is None else alive


def _drop_leftovers(version_path: Path) -> None:
    """Staging folders a killed converter left (`.KEY.tmp-*`); call holding the lock."""
    for leftover in cache_root(version_path).glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def start_background_conversion(version_path: Path, backend: str) -> bool:
    """Start the converter unless one is running or BACKGROUND_SWITCH is "0" (the test suite
    sets it: its many `auto` runs on fresh stores are not about backends); True when one runs."""
    if os.environ.get(BACKGROUND_SWITCH, "1") == "0":
        return False
    if conversion_running(version_path, backend):
        return True
    lock = lock_path(version_path, backend)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.unlink(missing_ok=True)  # stale
    try:
        handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return True  # another process won the race
    os.close(handle)
    _drop_leftovers(version_path)
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        module = BACKGROUND_MODULE.get(backend, "LymphNodeDGSTLib.engine.segmentation.backends.prepare")
        child = subprocess.Popen([sys.executable, "-m", module, str(version_path), backend], env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        lock.unlink(missing_ok=True)
        return False
    try:
        lock.write_text(owner_tag(child.pid) + "\n", encoding="ascii")  # judged by pid and start time
    except OSError:
        pass  # an untagged lock counts as starting for STARTING_SECONDS
    return True


def prepare(version_path: Path, backend: str) -> None:
    """Convert every fold of the version at `version_path` for `backend` (this process)."""
    from LymphNodeDGSTLib.engine.store.architectures import build_network, read_json
    from LymphNodeDGSTLib.engine.segmentation.backends.networks import ensure_converted
    from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
    from LymphNodeDGSTLib.engine.store.results_folders import find_checkpoints

    plans = read_json(version_path / "plans.json")
    dataset_json = read_json(version_path / "dataset.json")
    metadata = read_json(version_path / "version.json") if (version_path / "version.json").is_file() else {}
    for path in find_checkpoints(version_path).values():
        checkpoint = load_checkpoint(path, trust=bool(metadata.get("trusted_checkpoint", False)))
        configuration = checkpoint["init_args"]["configuration"]
        network = build_network(plans, dataset_json, configuration)
        patch = plans["configurations"][configuration]["patch_size"]
        shape = (1, len(dataset_json["channel_names"]), *patch)
        ensure_converted(backend, network, checkpoint["network_weights"], path, version_path, shape)


def main(argv: list[str], work: Callable[[Path, str], None] = prepare) -> int:
    """The background process: `work(version_path, backend)` at low priority, a failure kept as
    one line, the lock released."""
    version_path, backend = Path(argv[0]), argv[1]
    try:
        os.nice(10)  # after the segmentation that started us
    except (AttributeError, OSError):
        pass
    try:
        work(version_path, backend)
        return 0
    except Exception as error:
        if version_path.is_dir():  # a version removed meanwhile: nothing to report
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
            try:
                error_path(version_path, backend).write_text(detail[:200] + "\n", encoding="utf-8")
            except OSError:
                pass
        return 1
    finally:
        lock_path(version_path, backend).unlink(missing_ok=True)


if __name__ == "__main__":
    from LymphNodeDGSTLib.engine import nnunet_env  # noqa: F401  (nnU-Net's environment first)
    sys.exit(main(sys.argv[1:]))

"""Converted networks (OpenVINO IR, ONNX) cached beside the model version they come from.

Layout: `<version folder>/.backend-cache/<key>/` holding the converted files and `meta.json`.
The key names the format, the converter's version, the fold's checkpoint hash and the patch
shape, so a changed checkpoint or converter never reuses a stale conversion; the cache lives in
the version's folder, so removing a version removes its conversions. Only `dataset.json`,
`plans.json` and the checkpoints are copied on export (models.copy_results_folder), never this.
Each entry is written in a temporary folder and renamed into place: it appears complete or not
at all, also when two processes convert at the same time. meta.json keeps every file's SHA-256,
checked before an entry is used (once per process and file state).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from LymphNodeDGSTLib.atomic import default_mode

CACHE_DIR = ".backend-cache"
META_FILE = "meta.json"
FILES_KEY = "files_sha256"  # in meta.json: each converted file's checksum, verified on use


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_key(fmt: str, converter_version: str, checkpoint_sha256: str,
              input_shape: Sequence[int]) -> str:
    """A folder name that changes whenever the conversion would."""
    shape = "x".join(str(int(s)) for s in input_shape)
    return f"{fmt}-{converter_version}-{checkpoint_sha256[:16]}-{shape}"


def cache_root(version_path: Path) -> Path:
    return Path(version_path) / CACHE_DIR


def find_cached(version_path: Path, key: str) -> Path | None:
    """The folder of a complete, intact cached conversion, or None. An entry whose files no longer
    match the checksums recorded when it was written (a zeroed or edited model.bin gave an empty
    or different label, silently) is removed, so that it is converted again."""
    folder = cache_root(version_path) / key
    if not (folder / META_FILE).is_file():
        return None
    if _intact(folder):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    return None


_VERIFIED: dict[tuple, bool] = {}  # (folder, sizes and mtimes) -> intact: hash a file once per process


def _intact(folder: Path) -> bool:
    try:
        recorded = json.loads((folder / META_FILE).read_text(encoding="utf-8")).get(FILES_KEY)
        if not isinstance(recorded, dict):
            return False  # written before checksums were kept, or damaged meta.json
        names = sorted(recorded)
        state = tuple((name, (folder / name).stat().st_size, (folder / name).stat().st_mtime_ns) for name in names)
    except (OSError, ValueError, AttributeError, TypeError):
        return False
    marker = (str(folder), state)
    if marker not in _VERIFIED:
        _VERIFIED[marker] = all(file_sha256(folder / name) == recorded[name] for name in names)
    return _VERIFIED[marker]


def store_conversion(version_path: Path, key: str, write: Callable[[Path], None],
                     meta: dict) -> Path:
    """Run `write(folder)` in a temporary folder, add meta.json, rename it to the key's folder.
    If another process published the same key meanwhile, its folder is kept and ours dropped."""
    root = cache_root(version_path)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    final = root / key
    try:
        write(staging)
        files = {path.relative_to(staging).as_posix(): file_sha256(path)
                 for path in sorted(staging.rglob("*")) if path.is_file()}
        (staging / META_FILE).write_text(json.dumps({**meta, FILES_KEY: files}, indent=2), encoding="utf-8")
        os.chmod(staging, default_mode(folder=True))  # the umask's mode, not mkdtemp's 0700
        try:
            os.rename(staging, final)
        except OSError:
            if find_cached(version_path, key) is None:
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def clear_cache(version_path: Path) -> None:
    """Drop every conversion of one version (a version removed, a cache reset)."""
    shutil.rmtree(cache_root(version_path), ignore_errors=True)

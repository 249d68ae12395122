"""The ranking's score cache: one JSON file per (model version, image content).

An image is keyed by the SHA-256 of its bytes (a DICOM folder: of its files' names and bytes, in
sorted order), so a renamed or moved CT is not scored again, an edited one is. Entries live in
`HOME/rank_cache/MODEL_KEY/HASH.json` and are written atomically; an unreadable entry counts as
missing. The model key names the version's identity, so scores of another version never mix in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from LymphNodeDGSTLib.atomic import write_json_atomic

_CHUNK = 1 << 20


def content_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_key(ref: str, folder: str | os.PathLike, score_version: int) -> str:
    """A file-name-safe key for a model version: its reference, a hash of its folder, the score
    definition's version."""
    safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", ref)
    where = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:10]
    return f"{safe}-{where}-s{score_version}"


class RankCache:
    """Scores per image content for one model key."""

    def __init__(self, root: str | os.PathLike, key: str):
        self.folder = Path(root) / key

    def get(self, sha256: str) -> dict | None:
        path = self.folder / f"{sha256}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def put(self, sha256: str, entry: dict) -> None:
        write_json_atomic(self.folder / f"{sha256}.json", entry)

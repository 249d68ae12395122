"""The ranking's score cache: one JSON file per (model version, image content).

An image is keyed by the SHA-256 of its bytes (a DICOM folder: of its files' names and bytes, in
sorted order), so a renamed or moved CT is not scored again, an edited one is. Entries live in
`HOME/rank_cache/MODEL_KEY/HASH.json` and are written atomically; an unreadable entry counts as
missing. The model key names the version's identity, so scores of another version never mix in.
"""

from __future__ import annotations

import hashlib
import json
import math
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


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def well_formed(entry: object) -> bool:
    """Whether a cache entry has what the ranking reads from it: a skipped entry its reason; a
    scored one a finite score, numeric features, the image hash and node doubts with a kind,
    a doubt and an LPS position."""
    if not isinstance(entry, dict):
        return False
    if entry.get("status") == "skipped":
        return isinstance(entry.get("reason"), str)
    features = entry.get("features")
    doubts = entry.get("node_doubts", [])
    return (entry.get("status") == "ok" and _finite(entry.get("score"))
            and isinstance(features, list) and all(_finite(f) for f in features)
            and isinstance(entry.get("image_sha256"), str)
            and isinstance(doubts, list) and all(_well_formed_doubt(d) for d in doubts))


def _well_formed_doubt(doubt: object) -> bool:
    where = doubt.get("centroid_lps_mm") if isinstance(doubt, dict) else None
    return (isinstance(doubt, dict) and isinstance(doubt.get("kind"), str) and _finite(doubt.get("doubt"))
            and isinstance(where, list) and len(where) == 3 and all(_finite(x) for x in where))


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
        """The entry, or None when it is missing or damaged (it is then scored and written again)."""
        path = self.folder / f"{sha256}.json"
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            return None
        return entry if well_formed(entry) else None

    def put(self, sha256: str, entry: dict) -> None:
        write_json_atomic(self.folder / f"{sha256}.json", entry)

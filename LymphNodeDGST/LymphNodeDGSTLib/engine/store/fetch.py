"""Model archives from URLs and zips: streamed, resumable, verified, extracted safely."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from tqdm import tqdm

from LymphNodeDGSTLib.errors import ModelValidationError, UserInputError, environment_problem

CHUNK = 1 << 20
# Bounds on what an archive may unpack to: nnU-Net results folders are mostly incompressible
# float weights (ratio ~1.1), a few JSON files compress ~10x.
MAX_EXTRACTED_BYTES = 32 << 30
MAX_COMPRESSION_RATIO = 200
# Free space kept when checking whether an archive fits.
FREE_SPACE_MARGIN = 64 << 20
# Compression methods Python's zipfile reads without optional modules; others are refused up front.
SUPPORTED_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}


def is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def check_url(url: str) -> None:
    """Refuse a URL that cannot be fetched as written (bad host, brackets, port) before any work."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises on a bad port number
    except ValueError as error:
        raise UserInputError(f"invalid URL {url!r}: {error}") from None
    if not host:
        raise UserInputError(f"invalid URL {url!r}: it names no host")


def download(url: str, destination: Path, sha256: str | None = None, show_progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Stream `url` to `destination` via `destination.part`; resume a previous partial download.

    The final name appears only once the download is complete (and verified, when `sha256` is
    given), so an interrupted download never looks like a finished one.
    """
    check_url(url)
    partial = destination.with_name(destination.name + ".part")
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) only
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the partial file is already complete
            return _finish(partial, destination, sha256)
        raise UserInputError(f"download failed: {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        raise UserInputError(f"download failed: {url}: {getattr(error, 'reason', error)}") from None
    except (http.client.HTTPException, ValueError) as error:  # e.g. a reply that is not HTTP
        raise UserInputError(f"download failed: {url}: not a valid HTTP reply "
                             f"({type(error).__name__}: {str(error).strip()[:80]!r})") from None
    with response:
        resumed = offset and response.status == 206
        mode = "ab" if resumed else "wb"
        length = _content_length(response, url)
        total = (length + (offset if resumed else 0)) if length is not None else None
        with open(partial, mode) as handle, tqdm(total=total, initial=offset if resumed else 0,
                                                 unit="B", unit_scale=True, desc="download",
                                                 disable=not (show_progress and sys.stderr.isatty())) as bar:
            for block in _blocks(response, url):
                handle.write(block)
                bar.update(len(block))
    if total is not None and partial.stat().st_size != total:
        raise UserInputError(f"download incomplete: {url} ({partial.stat().st_size} of {total} "
                             "bytes); run the same command again to resume")
    return _finish(partial, destination, sha256)


def _content_length(response: http.client.HTTPResponse, url: str) -> int | None:
    length = response.headers.get("Content-Length")
    if length is None:
        return None
    if not (length.strip().isascii() and length.strip().isdigit()):
        raise UserInputError(f"download failed: {url}: the server sent an invalid Content-Length "
                             f"({length[:40]!r})")
    return int(length)


def _blocks(response: http.client.HTTPResponse, url: str) -> Iterator[bytes]:
    """The body in blocks; a connection that breaks (mid-body, mid-chunk) is a user-facing error.
    Only reading is guarded here: a failed write (a full disk) is not a network problem."""
    while True:
        try:
            block = response.read(CHUNK)
        except (http.client.HTTPException, OSError) as error:  # IncompleteRead, reset, timeout
            raise UserInputError(f"download interrupted: {url}: {type(error).__name__}; run the "
                                 "same command again to resume") from None
        if not block:
            return
        yield block


def _finish(partial: Path, destination: Path, sha256: str | None) -> Path:
    if sha256:
        actual = file_sha256(partial)
        if actual.lower() != sha256.lower():
            partial.unlink(missing_ok=True)
            raise UserInputError(f"checksum mismatch: expected sha256 {sha256}, got {actual}; "
                                 "the download was discarded")
    os.replace(partial, destination)
    return destination


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, sha256: str) -> None:
    actual = file_sha256(path)
    if actual.lower() != sha256.lower():
        raise UserInputError(f"checksum mismatch for {path}: expected sha256 {sha256}, got {actual}")


def check_extracted_size(archive: Path, members: list[zipfile.ZipInfo], destination: Path) -> None:
    """Refuse entries whose declared sizes exceed the bounds or the free space, before writing."""
    total = sum(m.file_size for m in members)
    if total > MAX_EXTRACTED_BYTES:
        raise ModelValidationError(f"{archive}: refused, it would unpack to {total / 2**30:.1f} GiB "
                                   f"(limit {MAX_EXTRACTED_BYTES / 2**30:.0f} GiB)")
    for member in members:
        if member.file_size > MAX_COMPRESSION_RATIO * max(member.compress_size, 1) + CHUNK:
            raise ModelValidationError(
                f"{archive}: refused, entry '{member.filename}' unpacks {member.compress_size} bytes "
                f"to {member.file_size} (more than {MAX_COMPRESSION_RATIO}x: a zip bomb?)")
    folder = destination
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if total + FREE_SPACE_MARGIN > free:
        raise ModelValidationError(f"{archive}: not enough free space to unpack it "
                                   f"({total / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free "
                                   f"in {folder})")


def extract_zip_safely(archive: Path, destination: Path,
                       progress: Callable[[int, int], None] | None = None,
                       wanted: Callable[[str], bool] | None = None) -> None:
    """Extract a zip, refusing absolute paths, `..` components and links before writing anything.

    Only entries `wanted(name)` accepts are extracted (default: all). Their declared sizes are
    bounded before anything is written (zipfile never yields more than the declared size):
    in total, by the free space, and per entry by the compression ratio (a zip bomb).
    """
    try:
        bundle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelValidationError(f"{archive}: not a valid zip archive ({error})") from None
    with bundle:
        members = bundle.infolist()
        for member in members:
            name = member.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
                raise ModelValidationError(
                    f"{archive}: refused, entry '{member.filename}' would be written outside the "
                    "destination folder")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise ModelValidationError(f"{archive}: refused, entry '{member.filename}' is a "
                                           "symbolic link")
            if member.compress_type not in SUPPORTED_ZIP_METHODS:
                raise ModelValidationError(
                    f"{archive}: entry '{member.filename}' uses zip compression method "
                    f"{member.compress_type}, which is not supported; re-create the archive with "
                    f"the ordinary {' or '.join(SUPPORTED_ZIP_METHODS.values())} method")
        if wanted is not None:
            members = [m for m in members if wanted(m.filename.replace("\\", "/"))]
        check_extracted_size(archive, [m for m in members if not m.is_dir()], destination)
        try:
            for index, member in enumerate(members):
                target = destination / member.filename
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with bundle.open(member) as source, open(target, "wb") as sink:
                        shutil.copyfileobj(source, sink, CHUNK)
                if progress:
                    progress(index + 1, len(members))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError,
                NotImplementedError) as error:  # bad CRC, bad deflate data, truncated entry
            raise ModelValidationError(f"{archive}: corrupt zip archive ({error})") from None
        except OSError as error:
            if environment_problem(error) is not None:  # a full disk is not a corrupt archive
                raise
            raise ModelValidationError(f"{archive}: corrupt zip archive ({error})") from None

"""Checks for images that ITK reads without complaint but wrongly.

- A truncated NIfTI file: ITK fills the missing voxels with zeros and reports nothing.
- A DICOM series with a missing (or doubled) slice: read as if evenly spaced, so every slice
  after the gap sits at the wrong place.
- NaN or infinite voxels: NaN empties the network's output where it appears, inf inflates it.
  ITK's NIfTI reader turns stored NaN and inf into 0 without a word, so a float NIfTI file's
  stored data is scanned itself (`check_nifti_finite`).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.errors import UserInputError

# Neighbouring DICOM slices further apart than this times the usual distance: a slice is missing.
SLICE_GAP_TOLERANCE = 0.2
NIFTI1_HEADER, NIFTI2_HEADER = 348, 540


def check_finite_voxels(image: sitk.Image, what: str) -> None:
    """Refuse an image holding NaN or infinite voxels (integer images cannot)."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    voxels = sitk.GetArrayViewFromImage(image)
    if np.isfinite(voxels.min()) and np.isfinite(voxels.max()):  # min/max propagate NaN
        return
    nan, infinite = int(np.isnan(voxels).sum()), int(np.isinf(voxels).sum())
    parts = [f"{nan} NaN" if nan else "", f"{infinite} infinite" if infinite else ""]
    raise UserInputError(f"{what} holds {' and '.join(p for p in parts if p)} voxel(s) of "
                         f"{voxels.size}; fix or replace them (e.g. by -1000 HU) first")


def check_nifti_complete(path: Path, what: str) -> None:
    """Refuse a .nii or .nii.gz whose voxel data ends early (other formats: ITK checks)."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    expected = _nifti_expected_bytes(path, compressed=name.endswith(".gz"))
    if expected is None:
        return
    actual = _nifti_stored_bytes(path, compressed=name.endswith(".gz"), limit=expected)
    if actual < expected:
        raise UserInputError(f"{what} is truncated: it holds {actual} of the {expected} bytes its "
                             "header announces (an interrupted copy or download?)")


NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64


def check_nifti_finite(path: Path, what: str) -> None:
    """Refuse a float .nii or .nii.gz whose stored voxels hold NaN or inf (read back as 0 by ITK)."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    layout = _nifti_float_layout(path, compressed=name.endswith(".gz"))
    if layout is None:
        return
    dtype, offset, count = layout
    nan = infinite = 0
    try:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as handle:
            handle.seek(offset)
            remaining = count * dtype.itemsize
            while remaining > 0:
                block = handle.read(min(1 << 24, remaining))
                block = block[:len(block) - len(block) % dtype.itemsize]
                if not block:
                    break
                values = np.frombuffer(block, dtype=dtype)
                nan += int(np.isnan(values).sum())
                infinite += int(np.isinf(values).sum())
                remaining -= len(block)
    except (OSError, EOFError, zlib.error):
        return  # unreadable or truncated: the other checks say so
    if nan or infinite:
        parts = [f"{nan} NaN" if nan else "", f"{infinite} infinite" if infinite else ""]
        raise UserInputError(f"{what} stores {' and '.join(p for p in parts if p)} voxel(s) of {count} "
                             "(ITK would read them as 0); fix or replace them (e.g. by -1000 HU) first")


def _nifti_float_layout(path: Path, compressed: bool) -> tuple[np.dtype, int, int] | None:
    """(dtype, data offset, voxel count) of a float NIfTI-1/2 file, or None for other files."""
    try:
        opener = gzip.open if compressed else open
        with opener(path, "rb") as handle:
            header = handle.read(NIFTI2_HEADER)
    except (OSError, EOFError, zlib.error):
        return None
    for endian in "<>":
        if len(header) >= NIFTI1_HEADER and struct.unpack(endian + "i", header[:4])[0] == NIFTI1_HEADER:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), NIFTI1_HEADER)
        elif len(header) >= NIFTI2_HEADER and struct.unpack(endian + "i", header[:4])[0] == NIFTI2_HEADER:
            datatype = struct.unpack(endian + "h", header[12:14])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = max(struct.unpack(endian + "q", header[168:176])[0], NIFTI2_HEADER)
        else:
            continue
        rank = dims[0]
        if datatype not in NIFTI_FLOAT_TYPES or not 1 <= rank <= 7 or any(d < 1 for d in dims[1:rank + 1]):
            return None
        count = int(np.prod(dims[1:rank + 1], dtype=np.int64))
        return np.dtype(endian + NIFTI_FLOAT_TYPES[datatype]), offset, count
    return None


def _nifti_expected_bytes(path: Path, compressed: bool) -> int | None:
    """Header offset + voxel bytes from the NIfTI-1/2 header, or None if it cannot be told."""
    try:
        opener = gzip.open if compressed else open
        with opener(path, "rb") as handle:
            header = handle.read(NIFTI2_HEADER)
    except (OSError, EOFError, zlib.error):
        return None
    for endian in "<>":
        if len(header) >= NIFTI1_HEADER and struct.unpack(endian + "i", header[:4])[0] == NIFTI1_HEADER:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            return _total(dims, bitpix, max(offset, NIFTI1_HEADER))
        if len(header) >= NIFTI2_HEADER and struct.unpack(endian + "i", header[:4])[0] == NIFTI2_HEADER:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            return _total(dims, bitpix, max(offset, NIFTI2_HEADER))
    return None


def _total(dims: Sequence[int], bitpix: int, offset: int) -> int | None:
    rank = dims[0]
    if not 1 <= rank <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1:rank + 1]):
        return None
    return offset + int(np.prod(dims[1:rank + 1], dtype=np.int64)) * bitpix // 8


def _nifti_stored_bytes(path: Path, compressed: bool, limit: int) -> int:
    """Bytes the file really holds (decompressed), counting no further than `limit`."""
    if not compressed:
        return os.path.getsize(path)
    count = 0
    try:
        with gzip.open(path, "rb") as handle:
            while count < limit:
                block = handle.read(min(1 << 22, limit - count))
                if not block:
                    break
                count += len(block)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        pass  # the stream ends early or is damaged: what was read so far is what there is
    return count


def check_slice_spacing(files: Sequence[str], what: str) -> None:
    """Refuse a DICOM series whose slice positions are not evenly spaced (a missing slice).

    Positions are projected on the slice normal; files without position tags are not checked.
    """
    if len(files) < 3:
        return
    positions = []
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
            position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            orientation = ([float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
                           if reader.HasMetaDataKey("0020|0037") else [1, 0, 0, 0, 1, 0])
        except (RuntimeError, ValueError):
            return
        normal = np.cross(orientation[:3], orientation[3:6])
        positions.append(float(np.dot(normal, position)))
    steps = np.abs(np.diff(np.sort(positions)))
    usual = float(np.median(steps))
    if usual <= 0:
        raise UserInputError(f"{what}: several slices share one position; give a folder with one "
                             "complete series")
    odd = np.flatnonzero(np.abs(steps - usual) > SLICE_GAP_TOLERANCE * usual)
    if odd.size:
        k = int(odd[0])
        raise UserInputError(
            f"{what}: slices are not evenly spaced ({steps[k]:.3g} mm between slices {k + 1} and "
            f"{k + 2}, {usual:.3g} mm elsewhere): a slice is missing or the series is incomplete")

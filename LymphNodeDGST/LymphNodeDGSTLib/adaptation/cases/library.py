"""The site case library: corrected CT + lymph-node label pairs that adaptation trains on.

Layout under `home/cases/`:
    ID/image.nii.gz    the CT as given (voxel values and geometry), without header metadata
    ID/label.nii.gz    uint8, 0 = background, 1 = lymph node, exactly on the image's grid
    ID/case.json       id, date added, image hash, size, spacing, label volume, notes

A case is built in a hidden staging folder inside `cases/` and renamed into place, and removed by
renaming it to a hidden trash name first: `list` only ever sees complete cases. No source file
names or header metadata (which may hold patient identifiers) are kept unless asked for.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.atomic import staging_folder, write_json_atomic
from LymphNodeDGSTLib.engine.file_lock import exclusive_lock
from LymphNodeDGSTLib.engine.images.integrity import check_finite_voxels
from LymphNodeDGSTLib.engine.images.files import (check_3d_scalar, ct_range_warning, read_image,
                                            write_verified_image)
from LymphNodeDGSTLib.errors import UserInputError, WriteFailed
from LymphNodeDGSTLib.engine.store.json_files import (NUMBER, NUMBER_LIST, POSITIVE_INT_LIST, TEXT,
                                                TEXT_LIST, read_json_object)

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # used with fullmatch
GENERATED_ID = re.compile(r"^case-(\d+)$")
IMAGE_FILE, LABEL_FILE, CASE_FILE = "image.nii.gz", "label.nii.gz", "case.json"
STAGING_PREFIX, TRASH_PREFIX = ".staging-", ".trash-"
# The fields of case.json that the library and its faces read.
CASE_FIELDS = {"id": TEXT, "added": TEXT, "image_sha256": TEXT, "size": POSITIVE_INT_LIST,
               "spacing": NUMBER_LIST, "label_voxels": NUMBER, "label_volume_mm3": NUMBER,
               "notes": TEXT_LIST}

# Grids whose voxel centres agree within this (in voxels) are the same grid (header rounding).
SAME_GRID_VOXELS = 1e-3
DIRECTION_TOLERANCE = 1e-4
# A label this close to the image's grid is resampled onto it (with a note) instead of refused.
RESAMPLE_MAX_SHIFT_VOXELS = 0.5
RESAMPLE_MAX_SPACING_RATIO = 0.01
# Geometry enters the image hash rounded, so header float precision (NIfTI stores float32,
# NRRD text) does not hide a duplicate: spacing and direction to 1e-4, origin to 1e-3 mm.
HASH_DECIMALS = {"spacing": 4, "origin": 3, "direction": 4}


@dataclass(frozen=True)
class CaseRecord:
    """One stored case: where its files are and what case.json says about it."""

    id: str
    folder: Path
    image_path: Path
    label_path: Path
    metadata: dict


class CaseLibrary:
    """The corrected cases of one site, stored under `root` (normally `home/cases`)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def lock_path(self) -> Path:
        """Held while checking for a duplicate and publishing, so that two adds of one image
        cannot both win; beside the library (inside it, it would look like an entry)."""
        return self.root.parent / f".{self.root.name}.lock"

    def __len__(self) -> int:
        return len(self.list())

    def list(self) -> list[CaseRecord]:
        """The complete cases, sorted by id (staging and trash folders are never listed).

        A damaged case.json raises, naming the case and how to remove it: training on or
        deduplicating against a library with an unreadable case would be silently wrong.
        """
        return [self._load(case_id) for case_id in self._case_ids()]

    def survey(self) -> tuple[list[CaseRecord], list[str]]:
        """For listings: the cases that load, and one message per damaged case."""
        records, problems = [], []
        for case_id in self._case_ids():
            try:
                records.append(self._load(case_id))
            except UserInputError as damaged:
                problems.append(str(damaged))
        return records, problems

    def _case_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(folder.name for folder in self.root.iterdir()
                      if ID_PATTERN.fullmatch(folder.name) and (folder / CASE_FILE).is_file())

    def get(self, case_id: str) -> CaseRecord:
        validate_case_id(case_id)
        if not (self.root / case_id / CASE_FILE).is_file():
            raise UserInputError(f"no case '{case_id}' in the library {self.root} "
                                 "(`lndgst cases list` shows the cases)")
        return self._load(case_id)

    def remove(self, case_id: str) -> None:
        """Remove a case: it disappears from the library at once (rename), then is deleted.
        A case whose case.json is damaged is removed too (that is its repair)."""
        validate_case_id(case_id)
        folder = self.root / case_id
        if not (folder / CASE_FILE).exists():
            self.get(case_id)  # raises "no case ..."
        trash = self.root / f"{TRASH_PREFIX}{case_id}-{uuid.uuid4().hex[:12]}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def add(self, image: sitk.Image | str | os.PathLike, label: sitk.Image | str | os.PathLike,
            case_id: str | None = None, label_value: int | None = None,
            keep_source_name: bool = False) -> CaseRecord:
        """Check a CT and its lymph-node label and store them as a new case.

        `image`/`label`: SimpleITK images or paths (any format SimpleITK reads; a DICOM series
        folder too). Labels hold 0 and 1; with `label_value` V the voxels equal to V become 1 and
        all others 0. A label a fraction of a voxel off the image's grid is resampled onto it
        (nearest neighbour) and the record's `metadata["notes"]` says so. Any problem raises
        UserInputError and leaves the library unchanged.
        """
        if case_id is not None:
            validate_case_id(case_id)
            if (self.root / case_id).exists():
                raise UserInputError(f"case id '{case_id}' is already taken")
        if label_value is not None and int(label_value) == 0:
            raise UserInputError("label value 0 is the background; give the lymph-node value")
        ct = _as_image(image, "image")
        label_image = _as_image(label, "label")
        check_looks_like_ct(ct)
        notes: list[str] = []
        binary = binary_label_array(place_on_image_grid(label_image, ct, notes), label_value)
        voxels = int(np.count_nonzero(binary))
        if voxels == 0:
            raise UserInputError("label is empty: no lymph-node voxel")
        label_on_grid = _with_array(ct, binary)
        image_hash = image_sha256(ct)
        self._refuse_duplicate(image_hash)  # early, before the slow writes; again under the lock

        metadata = {
            "id": case_id,
            "added": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "image_sha256": image_hash,
            "size": list(ct.GetSize()),
            "spacing": [float(s) for s in ct.GetSpacing()],
            "label_voxels": voxels,
            "label_volume_mm3": round(voxels * float(np.prod(ct.GetSpacing())), 3),
            "notes": notes,
        }
        if keep_source_name:
            sources = {what: Path(value).name for what, value in (("image", image), ("label", label))
                       if not isinstance(value, sitk.Image)}
            if sources:
                metadata["source"] = sources
        try:
            with staging_folder(self.root, STAGING_PREFIX) as staged:
                write_verified_image(_without_metadata(ct), staged / IMAGE_FILE)
                write_verified_image(label_on_grid, staged / LABEL_FILE)
                with exclusive_lock(self.lock_path, what=f"the case library {self.root}"):
                    self._refuse_duplicate(image_hash)
                    final_id = self._publish(staged, metadata, case_id)
        except OSError as error:
            raise WriteFailed(f"cannot write the case into {self.root}: "
                              f"{error.strerror or error}; the library is unchanged") from None
        return self._load(final_id)

    # ---------------------------------------------------------------- internals
    def _publish(self, staged: Path, metadata: dict, case_id: str | None) -> str:
        """Rename the staged case into place under `case_id` or the next free generated id."""
        while True:
            chosen = case_id or f"case-{self._next_number():04d}"
            metadata["id"] = chosen
            write_json_atomic(staged / CASE_FILE, metadata)
            target = self.root / chosen
            # rename() would also replace an *empty* folder: check first; losing a race to a
            # non-empty folder makes rename fail, which we tell apart below.
            if not target.exists():
                try:
                    os.rename(staged, target)
                    return chosen
                except OSError:
                    if not target.exists():
                        raise
            if case_id is not None:
                raise UserInputError(f"case id '{case_id}' is already taken")

    def _next_number(self) -> int:
        numbers = [int(match.group(1)) for p in self.root.iterdir()
                   if (match := GENERATED_ID.match(p.name))]
        return max(numbers, default=0) + 1

    def _refuse_duplicate(self, image_hash: str) -> None:
        for record in self.list():
            if record.metadata.get("image_sha256") == image_hash:
                raise UserInputError(f"this image is already in the library as case '{record.id}'")

    def _load(self, case_id: str) -> CaseRecord:
        folder = self.root / case_id
        metadata = read_json_object(folder / CASE_FILE, f"remove the damaged case with 'lndgst "
                                    f"cases remove {case_id}' (and add it again)", CASE_FIELDS)
        return CaseRecord(case_id, folder, folder / IMAGE_FILE, folder / LABEL_FILE, metadata)


def validate_case_id(case_id: str) -> str:
    if not isinstance(case_id, str) or not ID_PATTERN.fullmatch(case_id):
        raise UserInputError(f"invalid case id '{case_id}': use 1 to 64 letters, digits, '_' or '-'")
    return case_id


def check_looks_like_ct(image: sitk.Image) -> None:
    """Refuse an image whose intensities are not CT Hounsfield units."""
    warning = ct_range_warning(sitk.GetArrayViewFromImage(image))
    if warning is not None:
        reason = warning.partition(";")[0]
        raise UserInputError(f"image does not look like CT: {reason}; the case library holds CT only")


def binary_label_array(label: sitk.Image, label_value: int | None = None) -> np.ndarray:
    """The label as a uint8 0/1 array ([z, y, x]); refuses values it cannot read as a node mask.

    Without `label_value` the label must hold only 0 and 1. With it, voxels equal to the value
    are lymph node and every other value is background.
    """
    values = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(values.dtype, np.floating):
        fractional = values[values != np.round(values)]
        if fractional.size:
            raise UserInputError(f"label holds non-integer values (e.g. {fractional.flat[0]:g}); "
                                 "a label of 0 (background) and 1 (lymph node) is needed")
    if label_value is not None:
        mask = values == label_value
        if not mask.any():
            raise UserInputError(f"label has no voxel of value {label_value}")
        return mask.astype(np.uint8)
    if np.any((values != 0) & (values != 1)):
        found = np.unique(values)
        shown = ", ".join(f"{v:g}" for v in found[:8]) + (", ..." if found.size > 8 else "")
        raise UserInputError(f"label values {shown}: expected 0 (background) and 1 (lymph node); "
                             "--label-value V takes the voxels equal to V as lymph node")
    return values.astype(np.uint8)


def place_on_image_grid(label: sitk.Image, image: sitk.Image, notes: list[str]) -> sitk.Image:
    """The label (values as given) exactly on the image's grid; resampled (nearest neighbour,
    with a note) if a fraction of a voxel off.

    Size and direction must match. Then the grids' voxel centres are compared: within
    SAME_GRID_VOXELS the label simply takes the image's geometry; with spacings within 1 % and
    centres less than half a voxel apart it is resampled nearest-neighbour; otherwise refused.
    """
    if label.GetSize() != image.GetSize():
        raise UserInputError(f"label size {_size_text(label)} differs from image size "
                             f"{_size_text(image)}; the label must lie on the image's grid")
    if not np.allclose(label.GetDirection(), image.GetDirection(), rtol=0, atol=DIRECTION_TOLERANCE):
        raise UserInputError("label direction (axis orientation) differs from the image's; "
                             "the label must lie on the image's grid")
    shift = grid_shift_voxels(label, image)
    if shift <= SAME_GRID_VOXELS:
        placed = sitk.Image(label)
        placed.CopyInformation(image)
        return placed
    spacing_ratio = max(abs(a / b - 1) for a, b in zip(label.GetSpacing(), image.GetSpacing()))
    if shift >= RESAMPLE_MAX_SHIFT_VOXELS or spacing_ratio > RESAMPLE_MAX_SPACING_RATIO:
        raise UserInputError(
            f"label does not lie on the image's grid: voxel centres differ by up to {shift:.2f} "
            f"voxels (label origin {_vector_text(label.GetOrigin())} spacing "
            f"{_vector_text(label.GetSpacing())}, image origin {_vector_text(image.GetOrigin())} "
            f"spacing {_vector_text(image.GetSpacing())})")
    notes.append(f"label resampled (nearest neighbour) onto the image's grid: its origin/spacing "
                 f"differed, voxel centres up to {shift:.2f} voxel apart")
    return sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def grid_shift_voxels(moving: sitk.Image, reference: sitk.Image) -> float:
    """How far (in `reference` voxels) `moving`'s voxel centres lie from the same-index centres.

    Index -> physical maps are affine, so the largest shift is at one of the 8 corner voxels.
    """
    largest = 0.0
    for corner in product(*[(0, n - 1) for n in moving.GetSize()]):
        point = moving.TransformContinuousIndexToPhysicalPoint([float(i) for i in corner])
        index = reference.TransformPhysicalPointToContinuousIndex(point)
        largest = max(largest, max(abs(a - b) for a, b in zip(index, corner)))
    return largest


def image_sha256(image: sitk.Image) -> str:
    """SHA-256 of the voxel values and the (rounded) geometry, not of any file.

    Voxels are hashed as float32 one slice at a time, so the same CT read from NIfTI, NRRD or
    DICOM, as int16 or float, hashes the same without a full-volume copy.
    """
    digest = hashlib.sha256()
    geometry = {"size": list(image.GetSize())}
    for key, values in (("spacing", image.GetSpacing()), ("origin", image.GetOrigin()),
                        ("direction", image.GetDirection())):
        # "+ 0.0" turns -0.0 into 0.0 so a rounded tiny negative number hashes as zero.
        geometry[key] = [round(float(v), HASH_DECIMALS[key]) + 0.0 for v in values]
    digest.update(json.dumps(geometry, sort_keys=True).encode())
    voxels = sitk.GetArrayViewFromImage(image)
    for slab in voxels:
        digest.update(np.ascontiguousarray(slab, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _as_image(source: sitk.Image | str | os.PathLike, what: str) -> sitk.Image:
    if isinstance(source, sitk.Image):
        check_3d_scalar(source, what)
        check_finite_voxels(source, what)
        return source
    return read_image(source, what)


def _with_array(like: sitk.Image, array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


def _without_metadata(image: sitk.Image) -> sitk.Image:
    """A copy without header key/values (DICOM or NRRD fields may name the patient)."""
    if not image.GetMetaDataKeys():
        return image
    clean = sitk.Image(image)
    for key in clean.GetMetaDataKeys():
        clean.EraseMetaData(key)
    return clean


def _size_text(image: sitk.Image) -> str:
    return "x".join(str(n) for n in image.GetSize())


def _vector_text(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

"""The cases of a cohort folder: image files and DICOM series folders, named and hashed.

Discovery walks INPUT_DIR: every file with an image suffix (.nii.gz, .nii, .nrrd, .nhdr, .mha,
.mhd) is a case, and so is every folder that holds DICOM files (one series per folder). Other
files are ignored (and counted). A case's name is its path relative to INPUT_DIR without the
image suffix, '/' written as '__' (`p01/ct.nii.gz` -> `p01__ct`). Names that would still be the
same (`a.nii` beside `a.nrrd`: the suffix is kept; `sub/b.nii.gz` beside `sub__b.nii.gz`: a short
hash of the relative path is added) are made unique when the cohort is planned, so every input
has its own label and CSV row, under the same name on every run.

A case's identity for resuming is `image_sha256`: a hash of the decoded voxels, pixel type and
geometry, so the same CT stored as NIfTI or NRRD, or renamed, is recognised, and a changed file
under the same name is not.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.engine.images.files import WRITABLE_SUFFIXES
from LymphNodeDGSTLib.engine.images.itk_names import itk_can_take, shown
from LymphNodeDGSTLib.errors import UserInputError

IMAGE_SUFFIXES = WRITABLE_SUFFIXES
_NOT_IMAGES = (".raw", ".zraw", ".img", ".gz", ".csv", ".json", ".txt", ".md")


@dataclass(frozen=True)
class CohortCase:
    """One input of a batch: an image file or a DICOM series folder."""

    name: str
    path: Path
    dicom: bool


@dataclass
class Discovery:
    cases: list[CohortCase]
    ignored: list[Path]


def case_name(path: Path, root: Path, folder: bool = False) -> str:
    """The name of the image file (or, with `folder`, the DICOM folder) `path` under `root`. The
    suffix goes by the name, so a dangling link is named like the file it points to."""
    relative = path.relative_to(root)
    text = relative.as_posix()
    if not folder:
        lower = text.lower()
        suffix = next(s for s in IMAGE_SUFFIXES if lower.endswith(s))
        text = text[:-len(suffix)]
    text = shown(text)  # bytes that are not UTF-8 as \xNN: outputs and CSV rows stay text
    return "." if text in ("", ".") else text.replace("/", "__")


def discover_cases(root: str | os.PathLike, output: str | os.PathLike | None = None) -> Discovery:
    """Every case under `root` (sorted by name); refuses a folder that cannot be a cohort."""
    root = Path(root)
    if not root.exists():
        raise UserInputError(f"input folder not found: {root}")
    if not root.is_dir():
        raise UserInputError(f"input {root} is not a folder")
    if output is not None:
        _check_output_outside(root, Path(output))
    cases, ignored = [], []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        folder_path = Path(folder)
        other = []
        for name in sorted(files):
            path = folder_path / name
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_SUFFIXES):
                cases.append(CohortCase(case_name(path, root), path, False))
            else:
                other.append(path)
        if other and _holds_dicom(folder_path, other):
            name = case_name(folder_path, root, folder=True)
            cases.append(CohortCase("dicom" if name == "." else name, folder_path, True))
        else:
            ignored.extend(other)
    cases = _unique_names(cases, root)
    if not cases:
        raise UserInputError(f"no CT images or DICOM series found in {root} (looked for "
                             + ", ".join(IMAGE_SUFFIXES) + " files and DICOM folders)")
    return Discovery(sorted(cases, key=lambda c: c.name), ignored)


def _holds_dicom(folder: Path, files: list[Path]) -> bool:
    if any(f.suffix.lower() == ".dcm" for f in files):
        return True
    candidates = [f for f in files if f.suffix.lower() not in _NOT_IMAGES]
    if not candidates:
        return False
    if not itk_can_take(folder):  # ITK would abort on the name: a case, refused when it is read
        return True
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def _unique_names(cases: list[CohortCase], root: Path) -> list[CohortCase]:
    """`a.nii` beside `a.nrrd`: both keep their suffix in the name (`a.nii`, `a.nrrd`); names
    still shared after that (`sub/b.nii.gz` and `sub__b.nii.gz`) get a hash of their relative path."""
    counts = Counter(case.name for case in cases)
    cases = [replace(case, name=case.name + "." + case.path.name.split(".", 1)[1])
             if counts[case.name] > 1 and not case.dicom and "." in case.path.name else case
             for case in cases]
    counts = Counter(case.name for case in cases)
    return [replace(case, name=f"{case.name}-{_path_hash(case.path, root)}") if counts[case.name] > 1 else case
            for case in cases]


def _path_hash(path: Path, root: Path) -> str:
    return hashlib.sha256(path.relative_to(root).as_posix().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _check_output_outside(root: Path, output: Path) -> None:
    root_real, output_real = root.resolve(), output.resolve()
    if output_real == root_real or root_real in output_real.parents:
        raise UserInputError(f"output folder {output} is inside the input folder {root}: its "
                             "labels would be read as CTs next time; choose a folder outside it")


def image_sha256(image: sitk.Image) -> str:
    """A hash of the decoded voxels, pixel type and geometry (format- and name-independent)."""
    digest = hashlib.sha256()
    digest.update(image.GetPixelIDTypeAsString().encode())
    for values in (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()):
        digest.update(np.asarray(values, dtype=np.float64).round(6).tobytes())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return digest.hexdigest()

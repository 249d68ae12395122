"""Reading and writing CT and label images with SimpleITK: files, DICOM folders, atomic writes.

Reading refuses what ITK would silently accept as something else: a truncated NIfTI (ITK fills
the missing voxels with zeros), a DICOM series with a missing slice (read with a wrong spacing)
and NaN or infinite voxels. Writing goes through a temporary file that is read back before it
replaces the target, so a full disk never leaves an empty or partial label in its place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.atomic import default_mode, temporary_sibling
from LymphNodeDGSTLib.engine.images.integrity import (check_finite_voxels, check_nifti_complete, check_nifti_finite,
                                                     check_slice_spacing)
from LymphNodeDGSTLib.engine.images.itk_names import check_itk_output_folder, itk_readable
from LymphNodeDGSTLib.errors import UserInputError, WriteFailed

# ITK's own warnings go to stderr unasked and would break "one clear line" error output.
sitk.ProcessObject_SetGlobalWarningDisplay(False)

# Extensions SimpleITK writes in one file that keeps full 3D geometry.
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
# Header + data pairs: two files cannot replace two others in one atomic rename.
TWO_FILE_SUFFIXES = (".mhd", ".nhdr", ".hdr", ".img")

# A CT in Hounsfield units spans air (-1000) to bone (> 300). Images far outside are suspicious.
CT_MIN_RANGE_HU = (-1100.0, -500.0)
CT_MAX_AT_LEAST_HU = 150.0


def read_image(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """A 3D scalar image from a file SimpleITK reads or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{what} not found: {path}")
    try:
        with itk_readable(path, what) as readable:
            image = _read_dicom_folder(readable) if readable.is_dir() else sitk.ReadImage(str(readable))
    except RuntimeError as error:
        raise UserInputError(f"cannot read {what} {path}: {_itk_message(error)}") from None
    check_3d_scalar(image, f"{what} {path}")
    if path.is_file():
        check_nifti_complete(path, f"{what} {path}")
        check_nifti_finite(path, f"{what} {path}")
    check_finite_voxels(image, f"{what} {path}")
    return image


def _read_dicom_folder(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise UserInputError(f"no DICOM series in folder {folder}")
    if len(series) > 1:
        raise UserInputError(
            f"folder {folder} holds {len(series)} DICOM series; give a folder with exactly one")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    check_slice_spacing(files, f"DICOM series in {folder}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def check_3d_scalar(image: sitk.Image, what: str) -> None:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserInputError(f"{what} has {image.GetNumberOfComponentsPerPixel()} components "
                             "per voxel; a scalar (grey-value) image is needed")
    dimension = image.GetDimension()
    if dimension != 3:
        raise UserInputError(f"{what} is {dimension}D; a 3D volume is needed")
    if min(image.GetSize()) < 2:
        raise UserInputError(f"{what} has size {image.GetSize()}; a 3D volume with at least "
                             "2 voxels along each axis is needed")


def ct_range_warning(array: np.ndarray) -> str | None:
    """A warning when the intensities do not look like CT in Hounsfield units, else None."""
    low, high = float(np.percentile(array, 0.5)), float(array.max())
    if low < CT_MIN_RANGE_HU[0] - 1000 or low > CT_MIN_RANGE_HU[1] or high < CT_MAX_AT_LEAST_HU:
        return (f"intensities range {low:.0f}..{high:.0f} do not look like CT in Hounsfield units "
                "(air near -1000, bone above 300); results may be poor")
    return None


def check_output_path(path: str | os.PathLike, what: str = "output",
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output path we could not write, or one that would overwrite one of `inputs`
    (also through a link), before any work is done."""
    path = Path(path)
    name = str(path.name).lower()
    if name.endswith(TWO_FILE_SUFFIXES):
        raise UserInputError(f"{what} {path}: header+data formats ({', '.join(TWO_FILE_SUFFIXES)}) "
                             "cannot be written atomically; use one of " + ", ".join(WRITABLE_SUFFIXES))
    if not name.endswith(WRITABLE_SUFFIXES):
        raise UserInputError(f"{what} {path}: unsupported extension; use one of "
                             + ", ".join(WRITABLE_SUFFIXES))
    for source in inputs:
        if same_file(path, Path(source)):
            raise UserInputError(f"{what} {path} is the input {source}: writing it would destroy "
                                 "the input; choose another output file")
    check_itk_output_folder(path, what)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserInputError(f"{what} folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise UserInputError(f"{what} folder is not writable: {parent}")
    if path.is_dir():
        raise UserInputError(f"{what} {path} is a folder")
    return path


def same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or (hard links) the same inode."""
    try:
        if first.resolve() == second.resolve():
            return True
        return first.exists() and second.exists() and os.path.samefile(first, second)
    except OSError:
        return False


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write through a temporary file in the same folder, read it back, then rename over `path`.

    A failed or incomplete write (disk full: ITK may report nothing and leave a short file)
    raises WriteFailed and leaves whatever was at `path` unchanged.
    """
    path = check_output_path(path)
    suffix = next(s for s in WRITABLE_SUFFIXES if path.name.lower().endswith(s))
    try:
        with temporary_sibling(path, suffix=suffix) as tmp:
            write_verified_image(image, tmp, compress, shown=path)
            os.replace(tmp, path)
    except OSError as error:
        raise WriteFailed(f"cannot write {path}: {error.strerror or error}; "
                          "nothing was changed") from None


def write_verified_image(image: sitk.Image, path: Path, compress: bool = True,
                         shown: Path | None = None) -> None:
    """Write `image` to `path`, flush it to disk and read it back: WriteFailed (naming `shown`,
    default `path`) unless the file holds exactly the image's size and voxels."""
    shown = shown or path
    try:
        sitk.WriteImage(image, str(path), compress)
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(path, default_mode())
        written = sitk.ReadImage(str(path))
        check_nifti_complete(path, str(path))
    except (RuntimeError, UserInputError, OSError) as error:
        reason = (error.strerror if isinstance(error, OSError) else None) or _short_reason(error)
        if _nearly_full(path.parent):  # ITK truncates silently: name the likely cause plainly
            reason = f"No space left on device ({reason})"
        raise WriteFailed(f"cannot write {shown}: {reason} (disk full?); "
                          "nothing was changed") from None
    if written.GetSize() != image.GetSize() or not np.array_equal(
            sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image)):
        raise WriteFailed(f"cannot write {shown}: the file read back differs from what was "
                          "written (disk full?); nothing was changed")


def _nearly_full(folder: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def _short_reason(error: Exception) -> str:
    if isinstance(error, RuntimeError):
        return _itk_message(error)
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _itk_message(error: RuntimeError) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    return lines[-1] if lines else "unreadable"

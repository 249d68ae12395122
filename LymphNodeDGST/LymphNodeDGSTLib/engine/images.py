"""Reading and writing CT and label images with SimpleITK: files, DICOM folders, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.atomic import temporary_sibling
from LymphNodeDGSTLib.errors import UserInputError

# ITK's own warnings go to stderr unasked and would break "one clear line" error output.
sitk.ProcessObject_SetGlobalWarningDisplay(False)

# Extensions SimpleITK writes and that keep full 3D geometry.
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

# A CT in Hounsfield units spans air (-1000) to bone (> 300). Images far outside are suspicious.
CT_MIN_RANGE_HU = (-1100.0, -500.0)
CT_MAX_AT_LEAST_HU = 150.0


def read_image(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """A 3D scalar image from a file SimpleITK reads or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{what} not found: {path}")
    try:
        image = _read_dicom_folder(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise UserInputError(f"cannot read {what} {path}: {_itk_message(error)}") from None
    check_3d_scalar(image, f"{what} {path}")
    return image


def _read_dicom_folder(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise UserInputError(f"no DICOM series in folder {folder}")
    if len(series) > 1:
        raise UserInputError(
            f"folder {folder} holds {len(series)} DICOM series; give a folder with exactly one")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
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


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse an output path we could not write, before any work is done."""
    path = Path(path)
    if not str(path.name).lower().endswith(WRITABLE_SUFFIXES):
        raise UserInputError(f"{what} {path}: unsupported extension; use one of "
                             + ", ".join(WRITABLE_SUFFIXES))
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserInputError(f"{what} folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise UserInputError(f"{what} folder is not writable: {parent}")
    if path.is_dir():
        raise UserInputError(f"{what} {path} is a folder")
    return path


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write through a temporary file in the same folder, then rename: never a partial file."""
    path = check_output_path(path)
    suffix = next(s for s in WRITABLE_SUFFIXES if path.name.lower().endswith(s))
    with temporary_sibling(path, suffix=suffix) as tmp:
        if suffix in (".mhd", ".nhdr"):
            raise UserInputError(f"{path}: header+data formats (.mhd, .nhdr) cannot be written "
                                 "atomically; use .nii.gz, .nrrd or .mha")
        sitk.WriteImage(image, str(tmp), compress)
        os.replace(tmp, path)


def _itk_message(error: RuntimeError) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    return lines[-1] if lines else "unreadable"

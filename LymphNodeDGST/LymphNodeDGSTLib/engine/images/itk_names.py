"""File names ITK can take. Linux file names are bytes; Python carries bytes that are not UTF-8 as
surrogates (`bad\udcff.nii.gz`), and handing such a name to SimpleITK aborts the whole process
(a C++ std::logic_error, SIGABRT): no exception, no cleanup, no cohort CSV.

So an image is read under a name ITK can take: a single-file image whose path is not UTF-8 is
read through a link with a plain name in a temporary folder; a DICOM folder or a header+data image
(.mhd, .nhdr, whose data file is named inside the header) is refused in one line, as is an output
folder that is not UTF-8. An output file name that is not UTF-8 is fine: the image is written under
a plain temporary name in that folder and renamed (os.replace takes any bytes).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from LymphNodeDGSTLib.errors import UserInputError

LINKABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")  # one file holds header and voxels


def itk_can_take(path: str | os.PathLike) -> bool:
    """Whether the path is text SimpleITK can be given (valid UTF-8)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(path: str | os.PathLike) -> str:
    """The path for a message: undecodable bytes as \\xNN."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


@contextmanager
def itk_readable(path: Path, what: str) -> Iterator[Path]:
    """`path`, or a link to it under a plain name while the block reads it."""
    if itk_can_take(path):
        yield path
        return
    name = path.name.lower()
    suffix = next((s for s in LINKABLE_SUFFIXES if name.endswith(s)), None)
    if path.is_dir() or suffix is None:
        raise UserInputError(f"{what} {shown(path)}: its name is not valid UTF-8 text, which ITK "
                             "cannot open; rename it (or its folder) first")
    with tempfile.TemporaryDirectory(prefix="lndgst-name-") as folder:
        link = Path(folder) / ("input" + suffix)
        os.symlink(os.path.abspath(path), link)
        yield link


def check_itk_output_folder(path: Path, what: str) -> None:
    """Refuse an output whose folder ITK could not be given (the file name itself may be anything)."""
    if not itk_can_take(path.parent):
        raise UserInputError(f"{what} folder {shown(path.parent)}: its name is not valid UTF-8 text, "
                             "which ITK cannot write into; choose another folder")

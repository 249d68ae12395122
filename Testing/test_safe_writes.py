"""Writes the user cares about: a full disk never replaces a good file, OUTPUT == INPUT is refused
before any work, and new files get the user's umask (issue 12, data loss 1 and 2)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_ct

from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
from LymphNodeDGSTLib.cli import main as cli
from LymphNodeDGSTLib.engine.images import files as images
from LymphNodeDGSTLib.engine.images.files import write_image_atomic
from LymphNodeDGSTLib.engine.store.models import ModelStore
from LymphNodeDGSTLib.errors import WriteFailed

FORMATS = (".nii.gz", ".mha", ".nrrd")


def random_label(seed: int, shape=(12, 48, 48)) -> sitk.Image:
    """A label that compresses badly, so that writing it needs real space."""
    return sitk.GetImageFromArray(np.random.default_rng(seed).integers(0, 2, shape).astype(np.uint8))


def fill_up(folder: Path) -> None:
    """Write zeros into `folder` until its file system is full."""
    with open(folder / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 4 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def others_in(folder: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep and p.name != "filler")


# ---------------------------------------------------------------- full disk
@pytest.mark.parametrize("suffix", FORMATS)
def test_full_disk_keeps_the_earlier_label_and_fails(small_disk, suffix):
    """Catches a write that is renamed over the target without reading it back: ITK reports
    nothing when a .nii.gz hits a full disk and leaves a short file (found: exit 0, 0-byte label)."""
    target = small_disk / f"label{suffix}"
    sitk.WriteImage(random_label(0), str(target))
    earlier = target.read_bytes()
    fill_up(small_disk)
    with pytest.raises(WriteFailed, match="nothing was changed"):
        write_image_atomic(random_label(1), target)
    assert target.read_bytes() == earlier
    assert others_in(small_disk, target.name) == []  # no temporary file left


@pytest.mark.parametrize("suffix", FORMATS)
def test_a_short_or_failed_write_never_replaces_the_target(tmp_path, monkeypatch, suffix):
    """Injected: the writer leaves a half file and reports success, or raises ENOSPC as ITK's
    MetaImage and NRRD writers do. Catches a rename without the read-back check, and an OSError or
    ITK RuntimeError escaping as a traceback."""
    target = tmp_path / f"label{suffix}"
    sitk.WriteImage(random_label(0), str(target))
    earlier = target.read_bytes()
    real_write = sitk.WriteImage

    def short_write(image, path, compress=True):
        real_write(image, path, compress)
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)

    def failing_write(image, path, compress=True):
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: No space left on device")

    for writer in (short_write, failing_write):
        monkeypatch.setattr(images.sitk, "WriteImage", writer)
        with pytest.raises(WriteFailed, match="cannot write"):
            write_image_atomic(random_label(1), target)
        assert target.read_bytes() == earlier and others_in(tmp_path, target.name) == []


def test_cli_segment_onto_a_full_disk_exits_1_and_keeps_the_earlier_file(
        installed_home, tmp_path, small_disk, capsys):
    """End to end: `lndgst segment` onto a full disk (the probe's exit 0 with an empty label)."""
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct(shape_zyx=(8, 40, 40)), str(source))
    output = small_disk / "label.nii.gz"
    sitk.WriteImage(random_label(0, shape=(8, 40, 40)), str(output))
    earlier = output.read_bytes()
    fill_up(small_disk)
    status = cli.main(["--home", str(installed_home), "segment", str(source), str(output), "--fast"])
    err = capsys.readouterr().err
    assert status == 2 and "lndgst: error: cannot write" in err and "Traceback" not in err, err
    assert output.read_bytes() == earlier and others_in(small_disk, output.name) == []


def test_cases_add_onto_a_full_disk_leaves_the_library_unchanged(tmp_path, small_disk, capsys):
    """Catches the case library's unchecked sitk.WriteImage: a short image.nii.gz stored as a
    training case on a full disk."""
    home = small_disk / "home"
    library = CaseLibrary(home / "cases")
    first = make_ct(shape_zyx=(8, 40, 40), seed=1)
    label = sitk.GetImageFromArray(np.pad(np.ones((2, 4, 4), np.uint8), ((2, 4), (10, 26), (10, 26))))
    label.CopyInformation(first)
    library.add(first, label, case_id="first")
    before = {p: p.read_bytes() for p in (home / "cases").rglob("*") if p.is_file()}
    noisy = sitk.GetImageFromArray(np.random.default_rng(2).integers(-1000, 1500, (8, 40, 40))
                                   .astype(np.int16))
    noisy.CopyInformation(first)
    sitk.WriteImage(noisy, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(label, str(tmp_path / "label.nrrd"))
    fill_up(small_disk)
    status = cli.main(["--home", str(home), "cases", "add", str(tmp_path / "ct.nrrd"),
                       str(tmp_path / "label.nrrd")])
    err = capsys.readouterr().err
    assert status == 2 and "lndgst: error: cannot write" in err and "Traceback" not in err, err
    after = {p: p.read_bytes() for p in (home / "cases").rglob("*") if p.is_file()}
    assert after == before and [r.id for r in library.list()] == ["first"]


# ---------------------------------------------------------------- OUTPUT == INPUT
def _never_segment(*args, **kwargs):
    raise AssertionError("the segmenter ran although the output path was refusable up front")


@pytest.mark.parametrize("how", ["same path", "symbolic link", "hard link", "relative path"])
def test_output_that_is_the_input_is_refused_before_any_work(installed_home, tmp_path, monkeypatch,
                                                             capsys, how):
    """Catches a missing OUTPUT == INPUT check (found: the CT overwritten by its label, exit 0),
    and one that compares path strings instead of the files they name."""
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter

    monkeypatch.setattr(Segmenter, "segment", _never_segment)
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct(shape_zyx=(8, 32, 32)), str(source))
    original = source.read_bytes()
    output = {"same path": source, "symbolic link": tmp_path / "link.nii.gz",
              "hard link": tmp_path / "hard.nii.gz", "relative path": Path("ct.nii.gz")}[how]
    if how == "symbolic link":
        output.symlink_to(source)
    elif how == "hard link":
        os.link(source, output)
    monkeypatch.chdir(tmp_path)
    status = cli.main(["--home", str(installed_home), "segment", str(source), str(output)])
    err = capsys.readouterr().err
    assert status == 2 and "would destroy the input" in err and err.count("\n") == 1, err
    assert source.read_bytes() == original


@pytest.mark.parametrize("name", ["label.mhd", "label.nhdr"])
def test_two_file_formats_are_refused_before_any_work(installed_home, tmp_path, monkeypatch, capsys, name):
    """Catches the extension check happening only at write time (found: .mhd refused after the
    whole segmentation had run)."""
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter

    monkeypatch.setattr(Segmenter, "segment", _never_segment)
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct(shape_zyx=(8, 32, 32)), str(source))
    status = cli.main(["--home", str(installed_home), "segment", str(source), str(tmp_path / name)])
    err = capsys.readouterr().err
    assert status == 2 and "cannot be written atomically" in err, err
    assert not (tmp_path / name).exists()


def test_node_report_may_not_overwrite_the_input(installed_home, tmp_path, monkeypatch, capsys):
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter

    monkeypatch.setattr(Segmenter, "segment", _never_segment)
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct(shape_zyx=(8, 32, 32)), str(source))
    link = tmp_path / "report.csv"
    link.symlink_to(source)
    status = cli.main(["--home", str(installed_home), "segment", str(source),
                       str(tmp_path / "label.nii.gz"), "--nodes", str(link)])
    assert status == 2 and "node report" in capsys.readouterr().err


def test_node_report_that_is_a_folder_is_refused_before_any_work(installed_home, tmp_path, monkeypatch, capsys):
    """Issue 26, item 17. Catches: `--nodes DIR.csv` (a folder) found only after the label had
    been written, with a message saying "nothing was changed"."""
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter

    monkeypatch.setattr(Segmenter, "segment", _never_segment)
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(make_ct(shape_zyx=(8, 32, 32)), str(source))
    (tmp_path / "report.csv").mkdir()
    status = cli.main(["--home", str(installed_home), "segment", str(source),
                       str(tmp_path / "label.nii.gz"), "--nodes", str(tmp_path / "report.csv")])
    assert status == 2 and "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "label.nii.gz").exists()


# ---------------------------------------------------------------- umask
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_backend_cache_follows_the_umask(tmp_path, mask):
    """Issue 26, item 18. Catches: a backend cache folder left with mkdtemp's 0700 (the docs
    promise the umask, as for every other file the tool writes)."""
    from LymphNodeDGSTLib.engine.segmentation.backends.cache import store_conversion

    previous = os.umask(mask)
    try:
        folder = store_conversion(tmp_path / "version", "key", lambda staging: (staging / "model.xml").write_text("x"),
                                  {"backend": "openvino"})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((folder / "model.xml").stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_and_exports_follow_the_umask(installed_home, tmp_path, mask):
    """Catches modes taken from Python's temporary files (found: labels 0600, exports 0700)."""
    previous = os.umask(mask)
    try:
        label = tmp_path / "label.nii.gz"
        write_image_atomic(random_label(0, shape=(4, 8, 8)), label)
        exported = ModelStore(installed_home / "models").export("tiny@1", tmp_path / "export")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(label.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(exported.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((exported / "plans.json").stat().st_mode) == 0o666 & ~mask

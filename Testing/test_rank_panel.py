"""The panel's ranking table logic (slicer_bridge.ranking_panel): rows, library marks, the doubtful
node in RAS, and loaded volumes written for the rank job (with Slicer's real MRML library)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_ct
from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary, image_sha256
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.slicer_bridge.ranking_panel import (RANK_COLUMNS, RankRow, doubtful_point_ras, library_hashes,
                                                          open_ranked_ct, rank_rows)

RESULT = {
    "ranked": [
        {"rank": 1, "path": "/cts/b.nrrd", "score": 2.5, "image_sha256": "hash-b",
         "most_doubtful": {"kind": "near_miss", "doubt": 0.61, "centroid_lps_mm": [10.0, -20.0, 30.0]}},
        {"rank": 2, "path": "/cts/a.nrrd", "score": 0.4, "image_sha256": "hash-a", "most_doubtful": None},
    ],
    "skipped": [{"path": "/cts/notes.txt", "reason": "not an image file"}],
}


def test_rows_mark_library_cases_and_keep_skipped_entries_last():
    """Catches: library marks taken from the wrong hash (or never set), skipped entries dropped,
    ranks lost."""
    rows = rank_rows(RESULT, {"hash-a"}, {"names": {"/cts/b.nrrd": "CT b"}})
    assert [r.name for r in rows] == ["CT b", "a.nrrd", "notes.txt"]
    assert [r.in_library for r in rows] == [False, True, False]
    cells = [r.cells() for r in rows]
    assert all(len(c) == len(RANK_COLUMNS) for c in cells)
    assert cells[0][:3] == ["1", "CT b", "2.500"] and cells[1][3] == "yes"
    assert cells[2][2] == "skipped" and "not an image" in cells[2][4]


def test_doubtful_point_is_lps_turned_to_ras():
    """Catches: the LPS -> RAS flip forgotten (the views would jump to the mirrored place)."""
    rows = rank_rows(RESULT, set())
    assert doubtful_point_ras(rows[0]) == (-10.0, 20.0, 30.0)
    assert doubtful_point_ras(rows[1]) is None


def test_library_hashes_match_the_rankings_image_hash(tmp_path):
    """The ranking stores the case library's voxel hash, so a CT saved as a case is marked."""
    library = CaseLibrary(tmp_path / "cases")
    ct = make_ct(shape_zyx=(8, 32, 32))
    label = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    label.CopyInformation(ct)
    label[16, 16, 4] = 1
    library.add(ct, label)
    assert library_hashes(library) == {image_sha256(ct)}


def test_loaded_volumes_are_written_for_the_rank_job(tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    from LymphNodeDGSTLib.slicer_bridge import mrml
    from LymphNodeDGSTLib.slicer_bridge.ranking_panel import loaded_volumes_to_rank

    scene = slicer.vtkMRMLScene()
    home = Home(tmp_path / "home")
    with pytest.raises(UserInputError):
        loaded_volumes_to_rank(home, scene)
    ct = make_ct(shape_zyx=(6, 20, 22))
    node = mrml.sitk_image_to_volume_node(ct, scene, "Neck CT")
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a label")
    context = loaded_volumes_to_rank(home, scene)
    [(path, node_id)] = context["node_ids"].items()
    assert context["names"][path] == "Neck CT" and node_id == node.GetID()
    written = sitk.ReadImage(path)
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(ct))


def test_a_dicom_series_folder_row_opens_as_a_volume(tmp_path):
    """Catches the double-click handing a DICOM series folder to Slicer's file loader (which cannot
    open folders: `slicer.util.loadVolume(folder)` fails), and a series read with other voxels or
    geometry than the rank job scored."""
    import slicer

    image = sitk.Cast(make_ct(seed=3), sitk.sitkInt16)
    folder = tmp_path / "series"
    folder.mkdir()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    for z in range(image.GetDepth()):
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        slice_ = image[:, :, z]
        for key, value in (("0020|000e", uid), ("0020|0013", str(z + 1)), ("0008|0060", "CT"),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z))))),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "\\".join(map(str, image.GetSpacing()[:2]))),
                           ("0018|0050", str(image.GetSpacing()[2]))):
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(slice_)
    scene = slicer.vtkMRMLScene()
    files_loaded = []
    node = open_ranked_ct(RankRow(str(folder), "series", 1, 1.0, False, None), scene, files_loaded.append)
    assert files_loaded == []
    assert node is not None and scene.GetNodeByID(node.GetID()) is node
    assert node.GetImageData().GetDimensions() == image.GetSize()
    file_row = RankRow(str(tmp_path / "ct.nrrd"), "ct", 2, 0.5, False, None)
    open_ranked_ct(file_row, scene, files_loaded.append)
    assert files_loaded == [str(tmp_path / "ct.nrrd")]  # files still go through Slicer's own loader

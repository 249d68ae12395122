"""The panel's "Which case next?" table: logic only (no Qt), the widget only shows the rows.

The loaded volumes (written to a job folder as NRRD) or a chosen folder are ranked by the `rank`
background job; its result becomes one table row per CT, most useful first, with the skipped
entries and their reasons at the end. A row whose CT is already in the case library (same voxel
hash as a library case) is marked. Double-clicking a row opens the CT (`open_ranked_ct`: the loaded
node, a file through Slicer's loader, or a DICOM series folder), segments it, and centres the views on
its most doubtful node (`doubtful_point_ras`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home

RANK_JOB_KIND = "rank"
RANK_COLUMNS = ("#", "CT", "score", "in library", "most doubtful node")
RANK_BUTTONS = ("Rank loaded volumes", "Rank a folder...")


@dataclass
class RankRow:
    path: str
    name: str
    rank: int | None
    score: float | None
    in_library: bool
    most_doubtful: dict | None
    reason: str = ""
    volume_node_id: str | None = None     # set when the row is a loaded volume

    def cells(self) -> list[str]:
        node = self.most_doubtful or {}
        where = (f"{node.get('kind', 'node')}, doubt {node.get('doubt', 0):.2f}" if node else "")
        if self.rank is None:
            return ["-", self.name, "skipped", "", self.reason]
        return [str(self.rank), self.name, f"{self.score:.3f}", "yes" if self.in_library else "", where]


def rank_inputs_folder(home: Home) -> Path:
    """A fresh folder under the home for the loaded volumes to be ranked."""
    folder = home.root / "rank_inputs" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    return folder


def rank_job_params(home: Home, folder: str | Path, model: str | None = None, device: str = "auto") -> dict:
    return {"folder": str(folder), "model": model or None, "device": device, "home": str(home.root)}


def snapshot_loaded_volumes(scene) -> list[tuple[str, str, Any]]:
    """The scene's scalar (non-label) volumes as (node id, name, SimpleITK image) copies, taken on
    the GUI thread so that writing them can happen on another; a UserInputError when none is loaded."""
    from LymphNodeDGSTLib.slicer_bridge.mrml import volume_node_to_sitk

    collection = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    nodes = [n for n in nodes if not n.IsA("vtkMRMLLabelMapVolumeNode")]
    if not nodes:
        raise UserInputError("Load one or more CT volumes first.")
    return [(node.GetID(), node.GetName(), volume_node_to_sitk(node)) for node in nodes]


def write_snapshot_for_ranking(home: Home, snapshot: list[tuple[str, str, Any]]) -> dict:
    """The snapshot written as FOLDER/NNN.nrrd (atomically): {"folder", "names", "node_ids"}."""
    from LymphNodeDGSTLib.engine.images.files import write_image_atomic

    folder = rank_inputs_folder(home)
    names, node_ids = {}, {}
    for index, (node_id, name, image) in enumerate(snapshot):
        path = folder / f"{index:03d}.nrrd"
        write_image_atomic(image, path, compress=False)
        names[str(path)], node_ids[str(path)] = name, node_id
    return {"folder": str(folder), "names": names, "node_ids": node_ids}


def loaded_volumes_to_rank(home: Home, scene) -> dict | None:
    """The scene's scalar (non-label) volumes written for a rank job: {"folder", "names",
    "node_ids"} (names and node ids by written path); a UserInputError when none is loaded."""
    return write_snapshot_for_ranking(home, snapshot_loaded_volumes(scene))


def start_rank_job(manager, home: Home, chosen: str | dict, model: str | None = None, device: str = "auto",
                   python: str | None = None):
    """Submit the rank job for a folder (str) or written volumes (`loaded_volumes_to_rank`);
    (a JobFollower, the context `rank_rows` needs)."""
    from LymphNodeDGSTLib.slicer_bridge.job_following import JobFollower

    context = chosen if isinstance(chosen, dict) else {"folder": str(chosen)}
    job = manager.submit(RANK_JOB_KIND, rank_job_params(home, context["folder"], model, device), python=python)
    return JobFollower(manager, job.id), context


def library_hashes(library) -> set[str]:
    return {record.metadata.get("image_sha256") for record in library.list()} - {None}


def rank_rows(result: dict, in_library: set[str], context: dict | None = None) -> list[RankRow]:
    """Table rows from a finished rank job's result: ranked CTs, then skipped entries
    (`context`: names and node ids by path, for loaded volumes)."""
    names, node_ids = (context or {}).get("names") or {}, (context or {}).get("node_ids") or {}
    rows = [RankRow(r["path"], names.get(r["path"], Path(r["path"]).name), r["rank"], r["score"],
                    r.get("image_sha256") in in_library, r.get("most_doubtful"),
                    volume_node_id=node_ids.get(r["path"]))
            for r in result.get("ranked", [])]
    rows += [RankRow(r["path"], names.get(r["path"], Path(r["path"]).name), None, None, False, None,
                     r.get("reason", ""), node_ids.get(r["path"]))
             for r in result.get("skipped", [])]
    return rows


def doubtful_point_ras(row: RankRow) -> tuple[float, float, float] | None:
    """The most doubtful node's centroid in RAS (the ranking reports LPS: x and y negated)."""
    node = row.most_doubtful or {}
    point = node.get("centroid_lps_mm")
    if not point:
        return None
    return (-float(point[0]), -float(point[1]), float(point[2]))


def open_ranked_ct(row: RankRow, scene, load_file: Callable[[str], Any]):
    """The volume node of a ranked CT: the loaded node it came from, a file through `load_file`
    (Slicer's `util.loadVolume`), or a DICOM series folder. Slicer's file loader cannot open a
    folder; the series is read with the same reader the rank job scored it with, so the voxels shown
    are the voxels ranked."""
    node = scene.GetNodeByID(row.volume_node_id) if row.volume_node_id else None
    if node is not None:
        return node
    path = Path(row.path)
    if not path.is_dir():
        return load_file(str(path))
    from LymphNodeDGSTLib.engine.images.files import read_image
    from LymphNodeDGSTLib.slicer_bridge.mrml import sitk_image_to_volume_node

    return sitk_image_to_volume_node(read_image(path, "CT"), scene, row.name)

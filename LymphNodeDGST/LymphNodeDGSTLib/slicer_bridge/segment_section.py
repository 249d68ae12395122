"""The panel's segment section: the files a segmentation job reads and writes, submitting it, the
result shown in the scene, and the nodes table with the views' jump to a node.
"""

from __future__ import annotations

import csv
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from LymphNodeDGSTLib.engine.segmentation.backends.decision import backend_line
from LymphNodeDGSTLib.engine.segmentation.backends.names import BACKEND_CHOICES
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.jobs.events import JobInfo
from LymphNodeDGSTLib.jobs.manager import JobManager


DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")  # as devices.DEVICE_CHOICES (which needs torch)
LYMPH_NODE_SEGMENT = "lymph node"                 # the segment mrml.labelmap_array_to_segmentation makes
NODE_UNITS = {"volume_mm3": "mm3", "centroid_x_mm": "mm", "centroid_y_mm": "mm",
              "centroid_z_mm": "mm", "long_axis_mm": "mm", "short_axis_mm": "mm", "mean_hu": "HU"}


def read_node_csv(path: str | Path) -> list[dict[str, Any]]:
    """The node report a segment job wrote (nodes.write_node_csv), with numbers as numbers."""
    def value(text: str) -> Any:
        if text == "":
            return None
        if text in ("true", "false"):
            return text == "true"
        try:
            return int(text)
        except ValueError:
            return float(text)

    with open(path, newline="", encoding="utf-8") as stream:
        return [{key: value(text) for key, text in row.items()} for row in csv.DictReader(stream)]


def node_centroid_ras(row: dict[str, Any]) -> tuple[float, float, float]:
    """A report row's centroid (LPS, as SimpleITK gives it) in Slicer's RAS: x and y negated."""
    return (-float(row["centroid_x_mm"]), -float(row["centroid_y_mm"]), float(row["centroid_z_mm"]))


NODE_TABLE_COLUMNS = (("id", "Node"), ("volume_mm3", "Volume (mm3)"), ("long_axis_mm", "Long (mm)"),
                      ("short_axis_mm", "Short (mm)"), ("mean_hu", "Mean HU"),
                      ("enlarged", "Enlarged"))


def node_table_cells(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The cells of the widget's node list, NODE_TABLE_COLUMNS order, one row per node."""
    def text(key: str, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else ""
        if isinstance(value, float):
            return f"{value:.0f}" if key == "volume_mm3" else f"{value:.1f}"
        return str(value)

    return [[text(key, row.get(key)) for key, _ in NODE_TABLE_COLUMNS] for row in rows]


# --------------------------------------------------------------------------- segmentation
@dataclass(frozen=True)
class SegmentationFiles:
    """The files a background segmentation exchanges with the module, in one scratch folder."""

    folder: Path

    @property
    def input(self) -> Path:
        return self.folder / "input.nrrd"

    @property
    def output(self) -> Path:
        return self.folder / "label.nrrd"

    @property
    def nodes_csv(self) -> Path:
        return self.folder / "nodes.csv"

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def new_segmentation_files(home: Home) -> SegmentationFiles:
    folder = home.scratch / "slicer" / f"segment-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True)
    return SegmentationFiles(folder)


def segment_job_params(files: SegmentationFiles, home: Home, model: str | None = None,
                       device: str = "auto", fast: bool = False, crop_body: bool = True,
                       backend: str = "auto") -> dict:
    """Parameters of a "segment" job (segment_job.run) for the files of one segmentation.
    A backend's first use converts the model inside that job: the panel never waits for it."""
    if backend not in BACKEND_CHOICES:
        raise UserInputError(f"unknown segmentation backend '{backend}'")
    params = {"input": str(files.input), "output": str(files.output),
              "nodes_csv": str(files.nodes_csv), "home": str(home.root), "device": device,
              "fast": bool(fast), "crop_body": bool(crop_body), "backend": backend}
    if model:
        params["model"] = model
    return params


def submit_segmentation(manager: JobManager, home: Home, files: SegmentationFiles,
                        model: str | None = None, device: str = "auto", fast: bool = False,
                        python: str | None = None, env: dict | None = None,
                        backend: str = "auto") -> JobInfo:
    """Start a background segmentation of `files.input` (which the caller has written)."""
    if not files.input.is_file():
        raise UserInputError(f"the CT to segment was not written: {files.input}")
    return manager.submit("segment", segment_job_params(files, home, model, device, fast,
                                                        backend=backend),
                          device=device, python=python, env=env)


# --------------------------------------------------------------------------- scene side
# These take MRML nodes: they need `slicer` (inside Slicer, or the slicer-core package), imported
# through LymphNodeDGSTLib.slicer_bridge.mrml only when called.
def write_segmentation_input(volume_node, files: SegmentationFiles) -> Path:
    """Write the CT of a volume node for a background segmentation (uncompressed: fast)."""
    import SimpleITK as sitk
    from LymphNodeDGSTLib.slicer_bridge.mrml import volume_node_to_sitk

    sitk.WriteImage(volume_node_to_sitk(volume_node), str(files.input), False)
    return files.input


def show_segmentation_result(label_zyx, volume_node, scene, rows: Sequence[dict[str, Any]],
                             segmentation_node=None, table_node=None) -> tuple[Any, Any]:
    """The label as the lymph-node segment (standard terminology) of a segmentation node on the
    CT's grid, and the node report as a table node; existing nodes given are reused."""
    from LymphNodeDGSTLib.slicer_bridge.mrml import labelmap_array_to_segmentation, node_report_to_table

    name = volume_node.GetName()
    segmentation = labelmap_array_to_segmentation(label_zyx, volume_node, scene,
                                                  segmentation_node=segmentation_node,
                                                  node_name=f"{name} lymph nodes")
    table = node_report_to_table(list(rows), scene, f"{name} lymph node report", units=NODE_UNITS,
                                 table_node=table_node)
    return segmentation, table


def import_segmentation_result(files: SegmentationFiles, volume_node, scene, segmentation_node=None,
                               table_node=None) -> tuple[Any, Any, list[dict[str, Any]]]:
    """A finished segment job's label and node report into the scene: (segmentation, table, rows)."""
    import SimpleITK as sitk

    label = sitk.GetArrayFromImage(sitk.ReadImage(str(files.output)))
    rows = read_node_csv(files.nodes_csv)
    return (*show_segmentation_result(label, volume_node, scene, rows, segmentation_node, table_node),
            rows)


def segment_in_process(segmenter, volume_node, scene, model: str | None = None, fast: bool = True,
                       segmentation_node=None, table_node=None):
    """Segment a volume node here, blocking (scripts, the self-test): (segmentation, table, rows).
    `segmenter` is an inference.Segmenter, kept by the caller so the network stays loaded."""
    import SimpleITK as sitk
    from dataclasses import asdict
    from LymphNodeDGSTLib.slicer_bridge.mrml import volume_node_to_sitk
    from LymphNodeDGSTLib.engine.segmentation.nodes import node_report

    ct = volume_node_to_sitk(volume_node)
    label = segmenter.segment(ct, model=model, fast=fast).label
    rows = [asdict(row) for row in node_report(label, ct)]
    return (*show_segmentation_result(sitk.GetArrayFromImage(label), volume_node, scene, rows,
                                      segmentation_node, table_node), rows)


def node_centroid_world(row: dict[str, Any], volume_node) -> tuple[float, float, float]:
    """A report row's centroid in world RAS: the volume's parent transform, if any, applied
    (the centroid is in the volume's own frame, as volume_node_to_sitk exports it)."""
    point = node_centroid_ras(row)
    parent = volume_node.GetParentTransformNode() if volume_node is not None else None
    if parent is None:
        return point
    import slicer
    import vtk

    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, to_world)
    return tuple(to_world.TransformPoint(point))


def segment_editor_node(scene, tag: str = "LymphNodeDGST"):
    """The module's own Segment Editor parameter node (a singleton in `scene`)."""
    node = scene.GetSingletonNode(tag, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
        node.UnRegister(None)  # CreateNodeByClass hands over a reference the scene now holds
        node.SetSingletonTag(tag)
        node = scene.AddNode(node)
    return node


def backend_text(result: dict) -> str:
    """The backend a segment job ran with and why, as `segment` reports it ("openvino-bf16, guard
    Dice 0.9981")."""
    return backend_line(str(result.get("backend", "torch")), result.get("backend_detail"))


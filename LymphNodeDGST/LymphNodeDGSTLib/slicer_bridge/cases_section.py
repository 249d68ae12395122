"""The panel's correct section: the training cases table, and saving a corrected segmentation as a
training case (which segment, the label on the CT's grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.slicer_bridge.segment_section import LYMPH_NODE_SEGMENT


CASE_COLUMNS = ("Case", "Added", "Size", "Spacing (mm)", "Node volume (mL)", "Notes")


@dataclass(frozen=True)
class CaseRow:
    id: str
    added: str
    size: str
    spacing: str
    node_volume_ml: str
    notes: str

    def cells(self) -> list[str]:
        return [self.id, self.added, self.size, self.spacing, self.node_volume_ml, self.notes]


def case_rows(library) -> list[CaseRow]:
    """One row per readable case of a `CaseLibrary` (`lndgst cases list` names damaged ones)."""
    rows = []
    for record in library.survey()[0]:
        meta = record.metadata
        volume = meta.get("label_volume_mm3")
        rows.append(CaseRow(
            record.id, str(meta.get("added", "")).replace("T", " ")[:16],
            "x".join(str(n) for n in meta.get("size", [])),
            "x".join(f"{s:.2f}" for s in meta.get("spacing", [])),
            f"{volume / 1000:.2f}" if volume is not None else "",
            "; ".join(meta.get("notes") or [])))
    return rows


# --------------------------------------------------------------------------- training cases
def choose_training_segment(segments: Sequence[tuple[str, str]], selected: str | None = None) -> str:
    """The segment to save as a training case, from (id, name) pairs: the one selected in the
    Segment Editor, else the one named "lymph node", else the only one."""
    ids = [segment_id for segment_id, _ in segments]
    if selected and selected in ids:
        return selected
    named = [segment_id for segment_id, name in segments if name == LYMPH_NODE_SEGMENT]
    if named:
        return named[0]
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise UserInputError("The segmentation has no segment to save.")
    raise UserInputError("The segmentation has several segments: select the lymph-node segment "
                         "in the Segment Editor.")


def save_training_case(library, ct_image, label_zyx, case_id: str | None = None):
    """Store a CT (SimpleITK image) and a lymph-node mask on its grid ([z, y, x] array) as a case
    of `library` (a CaseLibrary); returns its CaseRecord."""
    import numpy as np
    import SimpleITK as sitk

    mask = np.asarray(label_zyx)
    if mask.shape != tuple(reversed(ct_image.GetSize())):
        raise UserInputError(f"the segment's grid {mask.shape} differs from the CT's "
                             f"{tuple(reversed(ct_image.GetSize()))} ([z, y, x])")
    label = sitk.GetImageFromArray((mask != 0).astype(np.uint8))
    label.CopyInformation(ct_image)
    return library.add(ct_image, label, case_id=case_id or None)


def save_case_from_segmentation(library, volume_node, segmentation_node,
                                selected_segment_id: str | None = None, case_id: str | None = None):
    """The CT and its corrected lymph-node segment (exported on the CT's grid, Segment Editor edits
    included) as a new case of `library`; returns its CaseRecord."""
    from LymphNodeDGSTLib.slicer_bridge.mrml import segmentation_to_label_array, volume_node_to_sitk

    segmentation = segmentation_node.GetSegmentation()
    segments = [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName())
                for i in range(segmentation.GetNumberOfSegments())]
    segment_id = choose_training_segment(segments, selected_segment_id)
    label = segmentation_to_label_array(segmentation_node, segment_id, volume_node)
    return save_training_case(library, volume_node_to_sitk(volume_node), label, case_id)

"""The Slicer panel's logic without Qt: its state machine, job following, and what its tables show.

The module widget (LymphNodeDGST.py) only moves values between Qt widgets and these functions, so
everything here runs (and is tested) without Slicer. Heavy modules (torch, nnU-Net, matplotlib,
SimpleITK) are imported inside the functions that need them: importing this module must work in a
Slicer whose dependencies are not installed yet, so that the module can offer to install them.

States: Idle -> Segmenting | Adapting | Installing -> (Cancelling ->) Idle. One background job at
a time; the button that started it turns into Cancel.
"""

from __future__ import annotations

import csv
import enum
import math
import shutil
import sys
import threading
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from LymphNodeDGSTLib.adaptation.methods import METHODS as ADAPT_METHODS  # noqa: F401  (re-exported for the GUI)
from LymphNodeDGSTLib.adaptation.methods import DEFAULT_METHOD as ADAPT_DEFAULT_METHOD  # noqa: F401
from LymphNodeDGSTLib.engine.segmentation.backends.names import BACKEND_CHOICES  # noqa: F401  (re-exported for the GUI)
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home, resolve_home
from LymphNodeDGSTLib.jobs.events import JobInfo
from LymphNodeDGSTLib.jobs.manager import JobManager
from LymphNodeDGSTLib.slicer_bridge.folder_segmentation import (  # noqa: F401  (for the GUI)
    folder_result_text, submit_folder_segmentation)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")  # as devices.DEVICE_CHOICES (which needs torch)
LYMPH_NODE_SEGMENT = "lymph node"                 # the segment mrml.labelmap_array_to_segmentation makes
INSTALL_JOB_KIND = "LymphNodeDGSTLib.slicer_bridge.panel:install_model"
POLL_INTERVAL_MS = 500
NODE_UNITS = {"volume_mm3": "mm3", "centroid_x_mm": "mm", "centroid_y_mm": "mm",
              "centroid_z_mm": "mm", "long_axis_mm": "mm", "short_axis_mm": "mm", "mean_hu": "HU"}


# --------------------------------------------------------------------------- state machine
class PanelState(enum.Enum):
    IDLE = "idle"
    SEGMENTING = "segmenting"
    ADAPTING = "adapting"
    INSTALLING = "installing"
    CANCELLING = "cancelling"


ALLOWED_TRANSITIONS: dict[PanelState, frozenset[PanelState]] = {
    PanelState.IDLE: frozenset({PanelState.SEGMENTING, PanelState.ADAPTING, PanelState.INSTALLING}),
    PanelState.SEGMENTING: frozenset({PanelState.IDLE, PanelState.CANCELLING}),
    PanelState.ADAPTING: frozenset({PanelState.IDLE, PanelState.CANCELLING}),
    PanelState.INSTALLING: frozenset({PanelState.IDLE, PanelState.CANCELLING}),
    PanelState.CANCELLING: frozenset({PanelState.IDLE}),
}
STATE_OF_JOB = {"segment": PanelState.SEGMENTING, "adapt": PanelState.ADAPTING,
                "install": PanelState.INSTALLING}
APPLY_TEXT, ADAPT_TEXT, INSTALL_TEXT = "Apply", "Adapt to my site", "Install"
CANCEL_TEXT, CANCELLING_TEXT = "Cancel", "Cancelling..."


class InvalidTransition(RuntimeError):
    """A state change the panel does not allow (a programming error in the widget)."""


@dataclass(frozen=True)
class Controls:
    """What each button says and which controls are enabled, for one state."""

    apply_text: str
    apply_enabled: bool
    apply_tooltip: str
    adapt_text: str
    adapt_enabled: bool
    adapt_tooltip: str
    install_text: str
    install_enabled: bool
    model_actions_enabled: bool  # activate, rollback, choosing the model
    inputs_enabled: bool         # selectors and options of segmentation and adaptation
    segment_progress_visible: bool
    adapt_progress_visible: bool


def segment_blocker(has_input: bool, has_model: bool) -> str | None:
    """Why Apply cannot segment now, or None."""
    if not has_model:
        return "No model installed: install one in the Model section."
    if not has_input:
        return "Select the CT volume to segment."
    return None


def adapt_blocker(has_model: bool, case_count: int) -> str | None:
    """Why the model cannot be adapted now, or None."""
    if not has_model:
        return "No model installed: install one in the Model section."
    if case_count < 1:
        return "The case library is empty: correct a segmentation and save it as a training case."
    return None


def controls_for(state: PanelState, cancelling: PanelState | None = None,
                 segment_block: str | None = None, adapt_block: str | None = None) -> Controls:
    """The controls for `state`; `cancelling` is the state a cancel came from (in CANCELLING)."""
    running = cancelling if state is PanelState.CANCELLING else state

    def button(own: PanelState, idle_text: str, blocked: str | None) -> tuple[str, bool]:
        if state is PanelState.IDLE:
            return idle_text, blocked is None
        if running is own:
            return (CANCELLING_TEXT, False) if state is PanelState.CANCELLING else (CANCEL_TEXT, True)
        return idle_text, False

    apply_text, apply_enabled = button(PanelState.SEGMENTING, APPLY_TEXT, segment_block)
    adapt_text, adapt_enabled = button(PanelState.ADAPTING, ADAPT_TEXT, adapt_block)
    install_text, install_enabled = button(PanelState.INSTALLING, INSTALL_TEXT, None)
    idle = state is PanelState.IDLE
    return Controls(
        apply_text, apply_enabled,
        "Stop the segmentation" if apply_text == CANCEL_TEXT else
        segment_block or "Segment the lymph nodes of the selected CT (in the background)",
        adapt_text, adapt_enabled,
        "Stop the adaptation (the current model stays as it is)" if adapt_text == CANCEL_TEXT else
        adapt_block or "Fine-tune the model on the case library (in the background)",
        install_text, install_enabled,
        model_actions_enabled=idle, inputs_enabled=idle,
        segment_progress_visible=running is PanelState.SEGMENTING,
        adapt_progress_visible=running is PanelState.ADAPTING)


class PanelStateMachine:
    """The panel's state; every change goes through the allowed transitions."""

    def __init__(self) -> None:
        self.state = PanelState.IDLE
        self.cancelling_from: PanelState | None = None

    @property
    def busy(self) -> bool:
        return self.state is not PanelState.IDLE

    @property
    def job_kind(self) -> str | None:
        """The kind of job running (or being cancelled): "segment", "adapt", "install" or None."""
        running = self.cancelling_from if self.state is PanelState.CANCELLING else self.state
        return next((kind for kind, state in STATE_OF_JOB.items() if state is running), None)

    def start(self, job_kind: str) -> PanelState:
        if job_kind not in STATE_OF_JOB:
            raise ValueError(f"unknown job kind {job_kind!r}")
        return self._go(STATE_OF_JOB[job_kind])

    def cancel(self) -> PanelState:
        previous = self.state
        self._go(PanelState.CANCELLING)
        self.cancelling_from = previous
        return self.state

    def finish(self) -> PanelState:
        self._go(PanelState.IDLE)
        self.cancelling_from = None
        return self.state

    def controls(self, segment_block: str | None = None, adapt_block: str | None = None) -> Controls:
        return controls_for(self.state, self.cancelling_from, segment_block, adapt_block)

    def _go(self, target: PanelState) -> PanelState:
        if target not in ALLOWED_TRANSITIONS[self.state]:
            raise InvalidTransition(f"{self.state.value} -> {target.value} is not allowed")
        self.state = target
        return target


# --------------------------------------------------------------------------- following a job
@dataclass
class JobSummary:
    """A job as the panel shows it, from all events read so far."""

    job_id: str
    kind: str = ""
    state: str = "running"           # running, done, failed, cancelled
    stage: str | None = None
    done: int | None = None
    total: int | None = None
    eta_s: float | None = None
    loss: float | None = None        # the latest training loss (per iteration)
    # the live curve: (epoch, training loss, pseudo Dice), None where not reported
    curve: list[tuple[int, float | None, float | None]] = field(default_factory=list)
    last_log: str | None = None
    result: dict | None = None
    error: str | None = None
    out_of_memory: bool = False

    @property
    def finished(self) -> bool:
        return self.state != "running"

    @property
    def fraction(self) -> float | None:
        """Share of the current stage done (None before the first progress event)."""
        if not self.total:
            return None
        return min(1.0, max(0.0, (self.done or 0) / self.total))

    @property
    def percent(self) -> int:
        fraction = self.fraction
        return 100 if self.state == "done" else int(round(100 * fraction)) if fraction is not None else 0

    @property
    def eta_text(self) -> str:
        return format_eta(self.eta_s)

    def status_text(self) -> str:
        """One line: `train 120/250 - about 3 min left - loss 0.412`, or how the job ended."""
        if self.state == "done":
            return "Done."
        if self.state == "cancelled":
            return "Cancelled."
        if self.state == "failed":
            return f"Failed: {self.error or 'unknown error'}"
        parts = []
        if self.stage and self.total:
            parts.append(f"{self.stage} {self.done}/{self.total}")
        elif self.stage:
            parts.append(self.stage)
        else:
            parts.append("starting")
        if self.eta_text:
            parts.append(self.eta_text)
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        return " - ".join(parts)


def format_eta(seconds: float | None) -> str:
    """`45 s left`, `about 3 min left`, `about 1 h 05 min left`; "" when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    if seconds < 60:
        return f"{max(1, round(seconds))} s left"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min left"
    return f"about {minutes // 60} h {minutes % 60:02d} min left"


class JobFollower:
    """Reads a job's new events on each `poll()` (the widget's QTimer calls it every 500 ms)."""

    def __init__(self, manager: JobManager, job_id: str):
        self.manager = manager
        self.job_id = job_id
        self._offset = 0
        self._curve: dict[int, list[float | None]] = {}
        self.summary = JobSummary(job_id)

    def poll(self) -> tuple[list[dict], JobSummary]:
        """The events written since the last poll, and the summary after them."""
        try:
            # State before events: once the state is terminal, all events are in the file.
            info = self.manager.get(self.job_id)
            events, self._offset = self.manager.events(self.job_id, self._offset)
        except UserInputError as error:  # the job folder vanished (home cleared, or moved)
            self.summary = replace(self.summary, state="failed", error=str(error))
            return [], self.summary
        summary = replace(self.summary, kind=info.kind)
        for event in events:
            self._apply(summary, event)
        summary.state, summary.result = info.state, info.result
        summary.error = info.error if info.state != "done" else None
        summary.curve = [(epoch, *values) for epoch, values in sorted(self._curve.items())]
        self.summary = summary
        return events, summary

    def cancel(self, timeout: float = 10.0) -> threading.Thread:
        """Ask the job to stop without blocking the caller: JobManager.cancel waits for the worker
        (and kills it after `timeout`), so it runs in a thread; poll() then sees the ending."""
        thread = threading.Thread(target=self.manager.cancel, args=(self.job_id, timeout),
                                  name=f"cancel-{self.job_id}", daemon=True)
        thread.start()
        return thread

    def _apply(self, summary: JobSummary, event: dict) -> None:
        kind = event.get("type")
        if kind == "progress":
            if event.get("stage") != summary.stage:
                summary.eta_s = None
            summary.stage = event.get("stage")
            summary.done, summary.total = event.get("done"), event.get("total")
            summary.eta_s = event.get("eta_s", summary.eta_s)
            if event.get("loss") is not None:
                summary.loss = float(event["loss"])
        elif kind == "metric" and event.get("epoch") is not None:
            column = {"train_loss": 0, "pseudo_dice": 1}.get(event.get("name"))
            if column is not None:
                self._curve.setdefault(int(event["epoch"]), [None, None])[column] = float(event["value"])
        elif kind == "log":
            summary.last_log = str(event.get("message", ""))
        elif kind == "error" and event.get("out_of_memory"):
            summary.out_of_memory = True


def failure_text(kind: str, summary: JobSummary) -> str:
    """The message for a failed job; out of memory comes with what to try instead."""
    what = {"segment": "segmentation", "adapt": "adaptation", "install": "model installation"}
    text = f"The {what.get(kind, kind)} failed: {summary.error or 'unknown error'}"
    if summary.out_of_memory:
        text += (" Try the fast option or the CPU for segmentation; fewer iterations or the CPU "
                 "for adaptation.")
    return text


def running_job(manager: JobManager, kinds: Sequence[str] = ("adapt",)) -> JobInfo | None:
    """The newest running job of one of `kinds` (e.g. an adaptation started before a restart)."""
    return next((info for info in manager.list() if info.kind in kinds and info.state == "running"),
                None)


def write_curve_png(curve: Sequence[tuple[int, float | None, float | None]], path: str | Path,
                    width_px: int = 360, height_px: int = 180) -> Path:
    """A small PNG of the training loss and pseudo Dice per epoch (the live curve)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    loss_axis = figure.add_subplot(1, 1, 1)
    dice_axis = loss_axis.twinx()
    epochs = [point[0] for point in curve]
    loss = [math.nan if point[1] is None else point[1] for point in curve]
    dice = [math.nan if point[2] is None else point[2] for point in curve]
    loss_axis.plot(epochs, loss, "o-", color="tab:red", markersize=3, label="training loss")
    dice_axis.plot(epochs, dice, "s-", color="tab:green", markersize=3, label="pseudo Dice")
    loss_axis.set_xlabel("epoch", fontsize=8)
    loss_axis.set_ylabel("loss", color="tab:red", fontsize=8)
    dice_axis.set_ylabel("pseudo Dice", color="tab:green", fontsize=8)
    dice_axis.set_ylim(0, 1)
    for axis in (loss_axis, dice_axis):
        axis.tick_params(labelsize=7)
    if epochs:
        loss_axis.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


# --------------------------------------------------------------------------- tables
MODEL_COLUMNS = ("Active", "Model", "Parent", "Method", "Dice before -> after", "Created")
CASE_COLUMNS = ("Case", "Added", "Size", "Spacing (mm)", "Node volume (mL)", "Notes")


@dataclass(frozen=True)
class ModelRow:
    name: str
    version: int
    active: bool
    parent: str      # "@1" for an adapted version, "" for an installed one
    method: str
    dice: str        # "0.612 -> 0.701" (held-out Dice of parent and this version), or ""
    created: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def cells(self) -> list[str]:
        return ["*" if self.active else "", self.ref, self.parent, self.method, self.dice,
                self.created.replace("T", " ")[:16]]


def model_rows(store) -> list[ModelRow]:
    """One row per installed version (a `ModelStore`), models by name, versions in order; a
    damaged version is left out (`lndgst models list` names it and its repair)."""
    rows = []
    for name in store.names():
        active, versions, _ = store.survey(name)
        for version in versions:
            meta = version.metadata
            parent = meta.get("parent")
            rows.append(ModelRow(name, version.version, version.version == active,
                                 f"@{parent}" if parent is not None else "",
                                 meta.get("method") or "", dice_text(meta.get("metrics") or {}),
                                 meta.get("created", "")))
    return rows


def dice_text(metrics: dict) -> str:
    before, after = metrics.get("dice_before"), metrics.get("dice_after")
    if before is None or after is None:
        return ""
    text = f"{before:.3f} -> {after:.3f}"
    return text if metrics.get("evaluation_is_held_out", True) else text + " (training cases)"


def selected_model_name(rows: Sequence[ModelRow], selected: int | None) -> str:
    """The model jobs use: the selected row's model (its active version), else the only model."""
    if selected is not None and 0 <= selected < len(rows):
        return rows[selected].name
    names = sorted({row.name for row in rows})
    if not names:
        raise UserInputError("No model installed: install one in the Model section.")
    if len(names) > 1:
        raise UserInputError(f"Several models are installed ({', '.join(names)}): select one in "
                             "the Model section.")
    return names[0]


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


def worker_python(which: Callable[[str], str | None] = shutil.which,
                  executable: str | None = None) -> str:
    """The interpreter for workers: Slicer's own Python (PythonSlicer) when there is one."""
    return which("PythonSlicer") or executable or sys.executable


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


# --------------------------------------------------------------------------- adaptation
def adapt_request(model: str | None = None, method: str = ADAPT_DEFAULT_METHOD, gamma: int = 2,
                  iterations: int = 250, device: str = "auto", **advanced: Any):
    """An AdaptRequest with the module's defaults. It is never activated by the job itself
    (activation "never"): the user chooses afterwards, seeing the before/after Dice."""
    from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest

    if "activation" in advanced:
        raise ValueError("the module always submits with activation 'never'")
    return AdaptRequest(model=model, method=method, gamma=int(gamma), iterations=int(iterations),
                        device=device, activation="never", **advanced)


def adapt_job_params(home: Home, request) -> dict:
    from dataclasses import asdict

    return {"home": str(home.root), "request": asdict(request)}


def submit_adaptation(manager: JobManager, home: Home, request, python: str | None = None,
                      env: dict | None = None) -> JobInfo:
    """Check the request (UserInputError for what can fail before training), pin the parent
    version, and start the adaptation as an exclusive background job on its device."""
    from LymphNodeDGSTLib.adaptation.adapt import check_request
    from LymphNodeDGSTLib.engine.segmentation.devices import choose_device

    parent, _ = check_request(home, request)
    request = replace(request, model=parent.ref)
    device = str(choose_device(request.device))
    return manager.submit("adapt", adapt_job_params(home, request), device=device,
                          exclusive_device=True, python=python, env=env)


@dataclass(frozen=True)
class AdaptationOutcome:
    """The end of an adaptation, as the panel offers it: use the new version or keep the old."""

    version: str         # NAME@N, published but not active
    parent: str          # NAME@M, still active
    dice_before: float
    dice_after: float
    held_out: bool
    figure: Path | None
    report: Path | None

    @property
    def recommended(self) -> bool:
        """Use the adapted version if it is no worse than its parent (the CLI's rule)."""
        return self.dice_after >= self.dice_before

    def text(self) -> str:
        change = self.dice_after - self.dice_before
        where = "held-out cases" if self.held_out else (
            "the training cases (too few cases to hold one out: not an independent check)")
        advice = ("The adapted model is no worse: using it is recommended." if self.recommended
                  else "The adapted model is worse: keeping the current model is recommended.")
        return (f"{self.version} (adapted from {self.parent}): Dice on {where} "
                f"{self.dice_before:.3f} -> {self.dice_after:.3f} ({change:+.3f}). {advice}")

    def kept_text(self) -> str:
        return (f"Kept {self.parent}; {self.version} stays installed and can be activated later in "
                "the Model section.")

    def name_and_version(self) -> tuple[str, int]:
        name, _, number = self.version.partition("@")
        return name, int(number)


def adaptation_outcome(result: dict) -> AdaptationOutcome:
    """From an adapt job's result (adapt.run_adaptation's summary)."""
    def optional_path(key: str) -> Path | None:
        return Path(result[key]) if result.get(key) else None

    return AdaptationOutcome(result["version"], result["parent"], float(result["dice_before"]),
                             float(result["dice_after"]), bool(result.get("evaluation_is_held_out")),
                             optional_path("figure"), optional_path("report"))


# --------------------------------------------------------------------------- model installs
def install_job_params(home: Home, source: str, name: str | None = None, sha256: str | None = None,
                       trust_checkpoint: bool = False, adapter: bool = False) -> dict:
    """Parameters of an install job. `source` may list several checkpoint files (the folds of
    one model) separated by ';'. With `adapter`, `source` is a site adapter file."""
    source = str(source).strip()
    if not source:
        raise UserInputError("Give a model file (.zip or nnU-Net checkpoint .pth), a results "
                             "folder or an http(s) URL.")
    return {"home": str(home.root), "source": source, "name": name or None,
            "sha256": sha256 or None, "trust_checkpoint": bool(trust_checkpoint),
            "adapter": bool(adapter)}


def install_model(params: dict, reporter) -> dict:
    """Job function (kind INSTALL_JOB_KIND): install a model from a zip, a folder or a URL in
    the background, so that a download or a large copy never blocks Slicer."""
    from LymphNodeDGSTLib.errors import UnsafeCheckpointError
    from LymphNodeDGSTLib.engine.store.models import AlreadyInstalled, ModelStore

    store = ModelStore(Home(Path(params["home"])).models)
    reporter.progress(0, 1, stage="install")
    reporter.check_cancelled()
    sources = [part.strip() for part in params["source"].split(";") if part.strip()]
    try:
        if params.get("adapter"):
            from LymphNodeDGSTLib.engine.store.adapter_store import install_adapter

            version = install_adapter(store, params["source"])
        elif len(sources) > 1:
            version = store.install_checkpoints(sources, name=params.get("name"),
                                                trust_checkpoint=bool(params.get("trust_checkpoint")),
                                                force=bool(params.get("force")))
        else:
            version = store.install(params["source"], name=params.get("name"),
                                    sha256=params.get("sha256"),
                                    trust_checkpoint=bool(params.get("trust_checkpoint")),
                                    show_progress=False, force=bool(params.get("force")))
    except AlreadyInstalled as error:
        raise UserInputError(f"These checkpoints are already installed as {error.ref}; choose "
                             "that version in the model list instead.") from None
    except UnsafeCheckpointError as error:
        raise UserInputError(f"{error} (in Slicer: tick 'Trust checkpoint code' and install "
                             "again)") from None
    reporter.progress(1, 1, stage="install")
    return {"version": version.ref, "active": store.active_version(version.name) == version.version}


def export_adapter_for_row(store, rows: Sequence[ModelRow], selected: int | None,
                           destination: str | Path) -> str:
    """Write the selected (adapted) version as a site adapter file; the status text to show."""
    from LymphNodeDGSTLib.engine.store.adapter_store import export_adapter

    if selected is None or not 0 <= selected < len(rows):
        raise UserInputError("Select an adapted version in the table first.")
    if not str(destination).strip():
        raise UserInputError("Choose a file to write the adapter to.")
    path = export_adapter(store, rows[selected].ref, destination)
    return (f"Wrote {rows[selected].ref} as a site adapter ({path.stat().st_size / 1e6:.2f} MB): "
            f"{path}. Another site installs it with 'Install adapter' on the same base model.")


def device_text(requested: str = "auto") -> str:
    """Which device work will run on and why, with advice when it is the CPU (imports torch)."""
    import torch
    from LymphNodeDGSTLib.slicer_bridge.dependencies import gpu_advice
    from LymphNodeDGSTLib.engine.segmentation.devices import choose_device, describe_device

    try:
        chosen = choose_device(requested)
    except UserInputError as error:
        return str(error)
    advice = gpu_advice(chosen.type, torch.version.cuda)
    return f"Device: {describe_device(chosen)}" + (f"\n{advice}" if advice else "")


def home_from_setting(value: str | None) -> Home:
    """The home folder from the module's setting; empty means the default (resolve_home)."""
    return resolve_home(str(value).strip() or None) if value else resolve_home(None)

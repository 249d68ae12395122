"""The panel's model section: the versions table, the selected model, installing a model in the
background, exporting a site adapter, and the device line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home


INSTALL_JOB_KIND = "LymphNodeDGSTLib.slicer_bridge.model_section:install_model"
# --------------------------------------------------------------------------- tables
MODEL_COLUMNS = ("Active", "Model", "Parent", "Method", "Dice before -> after", "Created")


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

"""Hostile and careless input on the command line (issue 12, "crashes where a clear error belongs").

Each probe runs `lndgst` as a user would and must end in exit status 2 with one line on stderr,
no traceback, and the home exactly as it was. Most run `cli.main` in-process (a subprocess per
probe would cost seconds of torch import each); the before-stop hook's probes run as real
processes. The commands meant to repair damage (`models activate`, `cases remove`) must work,
and listings must list what they can.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import SimpleITK as sitk
import torch

from conftest import REPO, make_ct, run_cli, tree_snapshot
from LymphNodeDGSTLib.cli.main import main
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
from LymphNodeDGSTLib.engine.store.models import ModelStore

CHECKPOINT = Path("fold_0/checkpoint_final.pth")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def template_home(tmp_path_factory, tiny_model_folder) -> Path:
    """A home with model 'tiny' (version 1 active) and one case 'case-0001'."""
    home = tmp_path_factory.mktemp("template") / "home"
    ModelStore(home / "models").install(tiny_model_folder, name="tiny", show_progress=False)
    ct = make_ct(seed=1)
    label = sitk.Cast(sitk.BinaryThreshold(ct, 60, 100), sitk.sitkUInt8)
    CaseLibrary(home / "cases").add(ct, label)
    return home


@pytest.fixture
def work(tmp_path, template_home, tiny_model_folder) -> "Workspace":
    shutil.copytree(template_home, tmp_path / "home")
    return Workspace(tmp_path / "home", tmp_path, tiny_model_folder)


class Workspace:
    """One probe's world: a copy of the template home, a scratch folder, the tiny model."""

    def __init__(self, home: Path, tmp: Path, model: Path):
        self.home, self.tmp, self.model = home, tmp, model

    def model_copy(self) -> Path:
        return Path(shutil.copytree(self.model, self.tmp / "model"))

    def ct_file(self) -> Path:
        path = self.tmp / "ct.nii.gz"
        if not path.exists():
            ct = make_ct(seed=2)
            sitk.WriteImage(ct, str(path))
            sitk.WriteImage(sitk.Cast(sitk.BinaryThreshold(ct, 60, 100), sitk.sitkUInt8),
                            str(self.tmp / "label.nii.gz"))
        return path

    def case_args(self) -> list[str]:
        return ["cases", "add", str(self.ct_file()), str(self.tmp / "label.nii.gz")]


def run_main(capsys, home: Path | str, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--home", str(home), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_clear_line(code: int, err: str, fragment: str) -> None:
    assert "Traceback" not in err, err
    assert code == 2, err
    assert err.startswith("lndgst: error:") and err.count("\n") == 1, err
    assert fragment.lower() in err.lower(), err


# --------------------------------------------------------------------------- damage helpers
def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_checkpoint(folder: Path, change: Callable[[dict], object]) -> None:
    checkpoint = torch.load(folder / CHECKPOINT, weights_only=False)
    change(checkpoint)
    torch.save(checkpoint, folder / CHECKPOINT)


def last_seg_layer(weights: dict) -> str:
    """The output head (deep supervision has one seg layer per decoder stage; the last is it)."""
    heads = [k for k in weights if ".seg_layers." in f".{k}" and k.endswith(".weight")]
    return max(heads, key=lambda k: int(k.split(".seg_layers.")[1].split(".")[0]))


def zip_model(folder: Path, archive: Path, method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(archive, "w", compression=method) as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                bundle.write(path, f"tiny/{path.relative_to(folder)}")
    return archive


def zip_with_method_99(w: Workspace) -> Path:
    """Every central-directory entry claims compression method 99 (AES, which zipfile lacks)."""
    archive = zip_model(w.model, w.tmp / "aes.zip")
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as bundle:
        position, count = bundle.start_dir, len(bundle.infolist())
    for _ in range(count):
        assert data[position:position + 4] == b"PK\x01\x02"
        data[position + 10:position + 12] = (99).to_bytes(2, "little")
        name, extra, comment = (int.from_bytes(data[position + o:position + o + 2], "little")
                                for o in (28, 30, 32))
        position += 46 + name + extra + comment
    archive.write_bytes(bytes(data))
    return archive


def zip_with_bad_deflate(w: Workspace) -> Path:
    """The checkpoint's deflate stream starts with a reserved block type (zlib.error on read)."""
    archive = zip_model(w.model, w.tmp / "bad-deflate.zip", zipfile.ZIP_DEFLATED)
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as bundle:
        member = next(i for i in bundle.infolist() if i.filename.endswith(".pth"))
    local = member.header_offset
    start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") \
        + int.from_bytes(data[local + 28:local + 30], "little")
    data[start:start + 16] = b"\xff" * 16
    archive.write_bytes(bytes(data))
    return archive


def damaged_model(change: Callable[[Path], object]) -> Callable[[Workspace], list[str]]:
    def setup(w: Workspace) -> list[str]:
        folder = w.model_copy()
        change(folder)
        return ["models", "install", str(folder), "--name", "other"]
    return setup


def write_file(relative: str, text: str | bytes) -> Callable[[Workspace], None]:
    def damage(w: Workspace) -> None:
        path = w.home / relative
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return damage


def second_fold_of_another_shape(folder: Path) -> None:
    """A copy of fold 0 as fold 1 whose first convolution has a kernel of another size."""
    import shutil

    shutil.copytree(folder / "fold_0", folder / "fold_1")
    path = folder / "fold_1" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    weights = checkpoint["network_weights"]
    first_conv = next(k for k in weights if k.endswith("conv.weight"))
    weights[first_conv] = torch.zeros(*weights[first_conv].shape[:2], 1, 1, 1)
    torch.save(checkpoint, path)


STATE, VERSION, CASE = "models/tiny/state.json", "models/tiny/versions/1/version.json", \
    "cases/case-0001/case.json"


def after(damage: Callable[[Workspace], None],
          command: Callable[[Workspace], list[str]]) -> Callable[[Workspace], list[str]]:
    def setup(w: Workspace) -> list[str]:
        damage(w)
        return command(w)
    return setup


def segment(w: Workspace) -> list[str]:
    return ["segment", str(w.ct_file()), str(w.tmp / "out.nii.gz")]


def adapt(w: Workspace) -> list[str]:
    return ["adapt", "--device", "cpu", "--iterations", "2"]


# --------------------------------------------------------------------------- the table
# name -> (setup returning the command's arguments, a fragment the one error line must hold)
PROBES: dict[str, tuple[Callable[[Workspace], list[str]], str]] = {
    # archives: zipfile raised NotImplementedError / zlib.error past the corrupt-zip handler
    "zip unsupported method": (lambda w: ["models", "install", str(zip_with_method_99(w))],
                               "compression method 99"),
    "zip corrupt deflate": (lambda w: ["models", "install", str(zip_with_bad_deflate(w))],
                            "corrupt zip"),
    # results folders nnU-Net could not use (LabelManager/attribute errors before)
    "label value x": (damaged_model(lambda f: edit_json(
        f / "dataset.json", lambda d: d["labels"].update(node="x"))), "label 'node'"),
    "regions without order": (damaged_model(lambda f: edit_json(
        f / "dataset.json", lambda d: d["labels"].update(node=[1, 2]))), "regions_class_order"),
    "init_args a list": (damaged_model(lambda f: edit_checkpoint(
        f, lambda c: c.update(init_args=["3d_fullres"]))), "init_args"),
    "seg_layers weight an int": (damaged_model(lambda f: edit_checkpoint(
        f, lambda c: c["network_weights"].update({last_seg_layer(c["network_weights"]): 5}))),
        "not a tensor"),
    "patch_size text": (damaged_model(lambda f: edit_json(
        f / "plans.json", lambda p: p["configurations"]["3d_fullres"].update(patch_size="big"))),
        "patch_size"),
    "patch_size 2 axes": (damaged_model(lambda f: edit_json(
        f / "plans.json", lambda p: p["configurations"]["3d_fullres"].update(patch_size=[64, 64]))),
        "patch_size"),
    "patch_size not divisible": (damaged_model(lambda f: edit_json(
        f / "plans.json", lambda p: p["configurations"]["3d_fullres"].update(patch_size=[33, 64, 64]))),
        "divisible"),
    # issue 26, item 5: non-finite weights installed and segmented to an empty label with exit 0
    "weights NaN": (damaged_model(lambda f: edit_checkpoint(f, lambda c: c["network_weights"][
        last_seg_layer(c["network_weights"])].view(-1).__setitem__(0, float("nan")))), "NaN or infinite"),
    "weights inf": (damaged_model(lambda f: edit_checkpoint(f, lambda c: c["network_weights"][
        last_seg_layer(c["network_weights"])].view(-1).__setitem__(0, float("inf")))), "NaN or infinite"),
    # item 9: installs that validated, then crashed `segment` with a traceback
    "second fold of another shape": (damaged_model(second_fold_of_another_shape), "fold_1"),
    "normalisation unknown": (damaged_model(lambda f: edit_json(f / "plans.json", lambda p: p[
        "configurations"]["3d_fullres"].update(normalization_schemes=["NoSuchNormalization"]))),
        "normalization_schemes"),
    "intensity properties missing": (damaged_model(lambda f: edit_json(f / "plans.json", lambda p: p.pop(
        "foreground_intensity_properties_per_channel"))), "foreground_intensity_properties_per_channel"),
    "transpose_forward bad": (damaged_model(lambda f: edit_json(f / "plans.json", lambda p: p.update(
        transpose_forward=[0, 0, 7]))), "transpose_forward"),
    "mirroring axes 5": (damaged_model(lambda f: edit_checkpoint(f, lambda c: c.update(
        inference_allowed_mirroring_axes=5))), "mirroring"),
    "mirroring axes text": (damaged_model(lambda f: edit_checkpoint(f, lambda c: c.update(
        inference_allowed_mirroring_axes="abc"))), "mirroring"),
    "mirroring axes 7, 9": (damaged_model(lambda f: edit_checkpoint(f, lambda c: c.update(
        inference_allowed_mirroring_axes=(7, 9)))), "mirroring"),
    "patch_size huge": (damaged_model(lambda f: edit_json(f / "plans.json", lambda p: p[
        "configurations"]["3d_fullres"].update(patch_size=[64, 64, 64000]))), "patch_size"),
    "spacing tiny": (damaged_model(lambda f: edit_json(f / "plans.json", lambda p: p[
        "configurations"]["3d_fullres"].update(spacing=[1e-4, 1e-4, 1e-4]))), "spacing"),
    # item 10: a configuration whose architecture is a string
    "architecture a string": (damaged_model(lambda f: edit_json(f / "plans.json", lambda p: p[
        "configurations"]["3d_fullres"].update(architecture="UNet"))), "architecture"),
    # a line break in a file name must not break the one-line contract
    "file name with a line break": (lambda w: ["segment", str(w.tmp / "no\nsuch.nii.gz"),
                                               str(w.tmp / "o.nii.gz")], "not found"),
    # URLs
    "url unclosed bracket": (lambda w: ["models", "install", "http://[::1/x.zip"], "invalid URL"),
    # versions: ASCII digits only ('²'.isdigit() is True but int('²') fails; '١' was version 1)
    "version superscript": (lambda w: ["models", "activate", "tiny@²"], "invalid version"),
    "version arabic-indic": (lambda w: ["models", "activate", "tiny@١"], "invalid version"),
    "version fullwidth": (lambda w: ["models", "activate", "tiny@１"], "invalid version"),
    "version fullwidth: segment": (lambda w: ["segment", str(w.ct_file()), str(w.tmp / "o.nii.gz"),
                                              "--model", "tiny@２"], "invalid version"),
    # damaged state.json / version.json / case.json: say which file and how to repair
    "state garbage: segment": (after(write_file(STATE, "garbage{"), segment), "models activate tiny@"),
    "state garbage: rollback": (after(write_file(STATE, "garbage{"), lambda w: ["models", "rollback", "tiny"]),
                                "state.json"),
    "state garbage: adapt": (after(write_file(STATE, "garbage{"), adapt), "state.json"),
    "state typed: segment": (after(write_file(STATE, '{"active": "1"}'), segment), "'active'"),
    "state a list: segment": (after(write_file(STATE, "[1]"), segment), "JSON object"),
    "state not utf-8: segment": (after(write_file(STATE, b'{"active": 1\xff}'), segment), "state.json"),
    "version garbage: segment": (after(write_file(VERSION, "{"), segment), "version.json"),
    "version garbage: activate": (after(write_file(VERSION, "{"), lambda w: ["models", "activate", "tiny@1"]),
                                  "version.json"),
    "version a list: segment": (after(write_file(VERSION, "[]"), segment), "JSON object"),
    # "no" is truthy: the old code would have loaded the checkpoint as trusted (unpickling code)
    "version typed: segment": (after(lambda w: edit_json(w.home / VERSION, lambda v: v.update(
        trusted_checkpoint="no")), segment), "'trusted_checkpoint'"),
    "version typed: adapt": (after(lambda w: edit_json(w.home / VERSION, lambda v: v.update(labels=[0, 1])),
                                   adapt), "'labels'"),
    "case garbage: cases add": (after(write_file(CASE, "\x00\x01"), lambda w: w.case_args()),
                                "cases remove case-0001"),
    "case garbage: adapt": (after(write_file(CASE, "null"), adapt), "cases remove case-0001"),
    "case typed: adapt": (after(lambda w: edit_json(w.home / CASE, lambda c: c.update(size="big")),
                                adapt), "'size'"),
    "case typed: cases add": (after(lambda w: edit_json(w.home / CASE, lambda c: c.update(image_sha256=7)),
                                    lambda w: w.case_args()), "'image_sha256'"),
}


@pytest.mark.parametrize("probe", list(PROBES))
def test_probe_ends_in_one_clear_line_and_changes_nothing(probe, work, capsys):
    """On main at 6a21268 most rows ended in a traceback and exit 1; the others answered wrongly:
    exit 0 for the bad patch_size (segment crashed later), '١'/'１' (taken as 1), a version.json
    or case.json of the wrong types (adapt submitted a job that would fail), and two lines of
    stderr for a file name holding a line break. Mutations checked by hand, each failing its rows:
    no compression-method check, no zlib.error in extraction, no init_args / weights / label /
    regions checks, no _check_configuration, str.isdigit() for versions, no check_url, no
    object/field/UTF-8 checks in read_json_object, int(Content-Length), no HTTPException in the
    download, and no one_line() in cli.main."""
    setup, fragment = PROBES[probe]
    args = setup(work)
    before = tree_snapshot(work.home)
    code, _, err = run_main(capsys, work.home, *args)
    assert_one_clear_line(code, err, fragment)
    assert tree_snapshot(work.home) == before


# --------------------------------------------------------------------------- repair and listing
def test_models_list_lists_what_it_can_and_marks_damage(work, capsys):
    """A damaged state.json and a damaged version.json each get a '! damaged' line naming the file
    and the repair; the good version is still listed. Catches `models list` going back to
    `versions()` (which stops at the first damaged file with a traceback)."""
    store = ModelStore(work.home / "models")
    store.install(work.model, name="tiny", show_progress=False, force=True)  # tiny@2
    store.install(work.model, name="tiny", show_progress=False, force=True)  # tiny@3
    (work.home / STATE).write_text("garbage{")
    (work.home / VERSION).write_text('{"parent": "one"}')
    edit_json(work.home / "models/tiny/versions/2/version.json",
              lambda v: v.update(metrics={"dice_after": "high"}))
    code, out, err = run_main(capsys, work.home, "models", "list")
    assert code == 0 and "Traceback" not in err, err
    damaged = [line for line in out.splitlines() if "! damaged" in line]
    listed = [line for line in out.splitlines() if line not in damaged]
    assert any("tiny@3" in line for line in listed)
    assert not any("tiny@1" in line or "tiny@2" in line for line in listed)
    assert len(damaged) == 3, out
    assert any("state.json" in line and "models activate tiny@N" in line for line in damaged)
    assert any("versions/1/version.json" in line and "'parent'" in line for line in damaged)
    assert any("versions/2/version.json" in line and "'dice_after'" in line for line in damaged)


def test_activate_repairs_a_garbage_state(work, capsys):
    """`models activate` is the repair the error messages name: it must rewrite a garbage
    state.json rather than fail on it. Catches activate reading the state strictly."""
    (work.home / STATE).write_text("garbage{")
    code, out, err = run_main(capsys, work.home, "models", "activate", "tiny@1")
    assert code == 0, err
    assert json.loads((work.home / STATE).read_text()) == {"active": 1, "history": []}
    assert ModelStore(work.home / "models").resolve("tiny").version == 1


def test_install_onto_a_damaged_state_publishes_nothing(work, capsys):
    """The state is read before the new version is published: otherwise the install fails after
    `versions/2` appeared (half-installed). Catches reading the state only after publishing."""
    (work.home / STATE).write_text("[]")
    before = tree_snapshot(work.home)
    code, _, err = run_main(capsys, work.home, "models", "install", str(work.model), "--name", "tiny",
                            "--force")  # the same checkpoints again: only --force gets past that
    assert_one_clear_line(code, err, "state.json")
    assert tree_snapshot(work.home) == before


def test_cases_remove_and_list_survive_a_garbage_case(work, capsys):
    """`cases list` lists the good cases and names each damaged one (garbage, or a volume that is
    text, which crashed the table's number format) on stderr; `cases remove` removes a case whose
    case.json is garbage (the repair the messages name). Catches `list` reading strictly, and
    `remove` loading case.json before removing."""
    library = CaseLibrary(work.home / "cases")
    for seed, case_id in ((3, "good"), (4, "typed")):
        ct = make_ct(seed=seed)
        library.add(ct, sitk.Cast(sitk.BinaryThreshold(ct, 60, 100), sitk.sitkUInt8), case_id=case_id)
    (work.home / CASE).write_text("garbage{")
    edit_json(work.home / "cases/typed/case.json", lambda c: c.update(label_volume_mm3="x"))
    code, out, err = run_main(capsys, work.home, "cases", "list")
    assert code == 0 and "good" in out and "case-0001" not in out and "typed" not in out, (out, err)
    assert "case-0001" in err and "'label_volume_mm3'" in err and "Traceback" not in err
    for case_id in ("case-0001", "typed"):
        code, out, err = run_main(capsys, work.home, "cases", "remove", case_id)
        assert code == 0, err
        assert not (work.home / "cases" / case_id).exists()
    assert [r.id for r in library.list()] == ["good"]


def test_jobs_show_events_with_bytes_that_are_not_utf8(work, capsys):
    """A damaged byte in events.ndjson is shown as U+FFFD, not a UnicodeDecodeError traceback."""
    folder = work.home / "jobs" / "20261201-000000-0001"
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"kind": "adapt", "created": "2026-12-01T00:00:00+00:00"}))
    (folder / "events.ndjson").write_bytes(b'{"type": "log", "message": "caf\xe9"}\n'
                                           b'{"type": "done", "result": {}}\n')
    code, out, err = run_main(capsys, work.home, "jobs", "show", folder.name, "--events")
    assert code == 0, err
    assert "caf\ufffd" in out and "done" in out


def damaged_job(home: Path, name: str, events: list[dict] | None = None, pid: str | None = None) -> Path:
    folder = home / "jobs" / name
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"kind": "adapt", "created": "2026-12-01T00:00:00+00:00"}))
    if events is None:
        (folder / "events.ndjson").mkdir()  # a folder where the events file belongs
    else:
        (folder / "events.ndjson").write_text("".join(json.dumps(e) + "\n" for e in events))
    if pid is not None:
        (folder / "worker.pid").write_text(pid + "\n")
    return folder


def test_damaged_job_files_are_listed_and_shown(work, capsys):
    """Issue 26, item 10. Catches: `eta_s` "abc" or NaN (ValueError in the clock), events.ndjson
    a folder (IsADirectoryError) and a worker.pid past any pid (OverflowError in os.kill), each
    a traceback that also broke `jobs list` for every other job."""
    progress = {"type": "progress", "done": 1, "total": 10, "stage": "train"}
    names = [damaged_job(work.home, "20261201-000000-0001", [{**progress, "eta_s": "abc"}]).name,
             damaged_job(work.home, "20261201-000000-0002", [{**progress, "eta_s": float("nan")}]).name,
             damaged_job(work.home, "20261201-000000-0003").name,
             damaged_job(work.home, "20261201-000000-0004", [progress], pid="9" * 25).name]
    code, out, err = run_main(capsys, work.home, "jobs", "list")
    assert code == 0 and "Traceback" not in err, err
    assert all(name in out for name in names), out
    for name in names:
        code, out, err = run_main(capsys, work.home, "jobs", "show", name)
        assert code == 0 and "Traceback" not in err and name in out, err


@pytest.mark.parametrize("pid", ["0", "-1", "1"])
def test_cancel_never_signals_a_process_group_or_init(pid, work, monkeypatch, capsys):
    """Issue 26, item 13. Catches: worker.pid 0 making `jobs cancel` send SIGTERM/SIGKILL to its
    own process group (it killed unrelated processes and itself), -1 (every process we may
    signal, or a traceback) and 1 (init). Signals are recorded here, never sent."""
    import os

    from LymphNodeDGSTLib.jobs import process_tree

    sent = []
    monkeypatch.setattr(process_tree.os, "kill", lambda target, signal: sent.append(("kill", target, signal)))
    monkeypatch.setattr(process_tree.os, "killpg", lambda group, signal: sent.append(("killpg", group, signal)))
    folder = damaged_job(work.home, "20261201-000000-0001", [{"type": "log", "message": "started"}], pid=pid)
    code, out, err = run_main(capsys, work.home, "jobs", "cancel", folder.name)
    assert "Traceback" not in err, err
    assert [s for s in sent if s[0] == "killpg" or s[1] <= 1 or s[1] == os.getpid()] == []


def test_a_closed_pipe_ends_the_listing_quietly(work, monkeypatch, capsys):
    """Issue 26, item 10. Catches: `lndgst jobs list | head -1` ending in a BrokenPipeError
    traceback and "unexpected failure" once the reader had gone."""
    import sys

    for index in range(3):
        damaged_job(work.home, f"20261201-000000-000{index}", [{"type": "log", "message": "x"}])

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = main(["--home", str(work.home), "jobs", "list"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err and "unexpected" not in err, err


def test_homes_a_user_can_get_wrong_are_one_line(tmp_path, monkeypatch, capsys):
    """Issue 26, items 10 and 22. Catches: `--home '~nosuchuser/x'` (RuntimeError from
    expanduser) and a symlink loop (RuntimeError from resolve) as tracebacks, and
    LNDGST_HOME=' ' used as a folder named " " in the working directory."""
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "back")
    (tmp_path / "back").symlink_to(loop)
    for home, fragment in (("~nosuchuser-lndgst/x", "Could not determine home"), (str(loop / "x"), "loop")):
        code = main(["--home", home, "models", "list"])
        assert_one_clear_line(code, capsys.readouterr().err, fragment)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LNDGST_HOME", " ")
    code = main(["models", "list"])
    assert_one_clear_line(code, capsys.readouterr().err, "LNDGST_HOME is blank")
    assert not (tmp_path / " ").exists()


def test_text_from_files_cannot_drive_the_terminal(work, capsys):
    """Issue 26, items 20 and 21. Catches: `models list` printing a version's method with raw line
    breaks and ESC sequences (a file can rewrite the user's screen or forge lines), "held-out
    Dice nan" for a metric that is not a number, and the same through `jobs list/show`."""
    version_json = work.home / "models" / "tiny" / "versions" / "1" / "version.json"
    metadata = json.loads(version_json.read_text())
    metadata.update(method="dgst\n  * forged@9\x1b[2J", metrics={"dice_after": float("nan")})
    version_json.write_text(json.dumps(metadata))
    code, out, err = run_main(capsys, work.home, "models", "list")
    assert code == 0, err
    assert "\x1b" not in out and "\\x1b[2J" in out, out
    assert not any(line.strip().startswith("* forged") for line in out.splitlines()), out
    assert "nan" not in out.lower(), out
    folder = damaged_job(work.home, "20261201-000000-0001",
                         [{"type": "error", "message": "bad\x1b]0;title\x07", "cancelled": False}])
    (folder / "job.json").write_text(json.dumps({"kind": "adapt\x1b[31m", "created": "2026\n-12"}))
    for args in (("jobs", "list"), ("jobs", "show", folder.name, "--events")):
        code, out, err = run_main(capsys, work.home, *args)
        assert code == 0 and "\x1b" not in out and "\x07" not in out and "\n-12" not in out, out


def test_a_library_warning_never_breaks_the_one_line_refusal(work, monkeypatch, capsys):
    """Issue 26, item 19. Catches: a torch UserWarning printed (with its source line) before the
    exit-2 error, which then was not one line. On success the warning still reaches the user."""
    import warnings

    from LymphNodeDGSTLib.cli import models

    def refuses(args, home):
        warnings.warn("TypedStorage is deprecated", UserWarning)
        raise UserInputError("no such model")

    def succeeds(args, home):
        warnings.warn("TypedStorage is deprecated", UserWarning)
        return 0

    monkeypatch.setattr(models, "handle", refuses)
    code, _, err = run_main(capsys, work.home, "models", "list")
    assert_one_clear_line(code, err, "no such model")
    monkeypatch.setattr(models, "handle", succeeds)
    code, _, err = run_main(capsys, work.home, "models", "list")
    assert code == 0 and err == "lndgst: warning: TypedStorage is deprecated\n", err


def test_cancel_of_a_dead_job_removes_what_its_worker_left(work, capsys):
    """Issue 26, item 12. Catches: an adapt worker killed with -9 leaving `jobs/ID/work` (a copy of
    the model and the preprocessed cases) for good, `jobs cancel` of the failed job cleaning nothing."""
    folder = damaged_job(work.home, "20261201-000000-0001", [{"type": "log", "message": "training"}],
                         pid="4000000")  # a pid no process has
    (folder / "work" / "preprocessed").mkdir(parents=True)
    (folder / "work" / "checkpoint.pth").write_bytes(b"\0" * 1024)
    code, out, err = run_main(capsys, work.home, "jobs", "cancel", folder.name)
    assert code == 0 and "already failed" in out, err
    assert not (folder / "work").exists() and (folder / "events.ndjson").is_file()


def test_names_longer_than_the_file_system_allows_are_one_line(work, capsys):
    """Issue 26, item 10. Catches: an output name, or a --nodes name, over 255 bytes ending in an
    "OSError: File name too long" traceback (exit 1) instead of one line."""
    ct = work.tmp / "ct.nrrd"
    sitk.WriteImage(make_ct(shape_zyx=(8, 32, 32)), str(ct))
    for extra in ([str(work.tmp / ("a" * 300 + ".nii.gz"))],
                  [str(work.tmp / "label.nii.gz"), "--nodes", str(work.tmp / ("b" * 300 + ".csv"))]):
        code, _, err = run_main(capsys, work.home, "segment", str(ct), *extra)
        assert_one_clear_line(code, err, "too long")
    assert not (work.tmp / "label.nii.gz").exists()


# --------------------------------------------------------------------------- downloads
@contextmanager
def raw_server(reply: bytes) -> Iterator[str]:
    """A one-reply TCP server on 127.0.0.1: reads the request head, sends `reply`, closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)

    def serve() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                request += chunk
            connection.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/model.zip"
    finally:
        listener.close()
        thread.join(timeout=5)


REPLIES = {
    "truncated chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + b"x" * 100,
                          "download interrupted"),
    "content-length abc": (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\nConnection: close\r\n\r\nPK",
                           "Content-Length"),
    "not http": (b"SSH-2.0-OpenSSH_9.6\r\n", "not a valid HTTP reply"),
}


@pytest.mark.parametrize("reply", list(REPLIES))
def test_broken_http_replies(reply, work, capsys):
    """Each reply raised an http.client exception or ValueError past the download's handlers
    (IncompleteRead, BadStatusLine, int('abc')). A resumable .part may stay in models/.downloads
    by design; nothing else changes."""
    data, fragment = REPLIES[reply]
    before = tree_snapshot(work.home)
    with raw_server(data) as url:
        code, _, err = run_main(capsys, work.home, "models", "install", url)
    assert_one_clear_line(code, err, fragment)
    after_install = {k: v for k, v in tree_snapshot(work.home).items()
                     if not k.startswith("models/.downloads/")}
    assert after_install == before


# --------------------------------------------------------------------------- homes and file systems
def test_home_that_is_a_file(work, capsys):
    """Before: NotADirectoryError / FileExistsError tracebacks from mkdir."""
    home = work.tmp / "home-file"
    home.write_text("not a folder")
    for args in (["models", "install", str(work.model)], work.case_args(), ["models", "list"]):
        code, _, err = run_main(capsys, home, *args)
        assert_one_clear_line(code, err, "not a folder")
    assert home.read_text() == "not a folder"


def test_home_under_proc(work, capsys):
    """Before: FileNotFoundError traceback from mkdir inside /proc."""
    for args in (["models", "install", str(work.model)], work.case_args()):
        code, _, err = run_main(capsys, "/proc/lndgst-home", *args)
        assert_one_clear_line(code, err, "kernel file system")


@contextmanager
def mounted_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_read_only_home(work, capsys):
    """A home on a read-only file system (EROFS; root ignores permission bits, so a read-only
    tmpfs). Listing works; writing commands end in one line. Before: OSError tracebacks. Catches
    dropping the OSError translation in cli.main."""
    with mounted_tmpfs(work.tmp / "ro", "size=8m") as mount:
        shutil.copytree(work.home, mount / "home")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        home = mount / "home"
        before = tree_snapshot(home)
        for args in (["models", "install", str(work.model), "--name", "tiny"], work.case_args()):
            code, _, err = run_main(capsys, home, *args)
            assert_one_clear_line(code, err, "read-only")
        code, out, err = run_main(capsys, home, "models", "list")
        assert code == 0 and "tiny@1" in out, err
        assert tree_snapshot(home) == before


@pytest.mark.parametrize("what", ["install", "cases add"])
def test_no_space_left(what, work, capsys):
    """ENOSPC on a tiny tmpfs: one line, nothing half-installed (the staging folder is gone).
    Before: OSError traceback, exit 1."""
    size = "600k" if what == "install" else "64k"  # the checkpoint alone is 1.1 MB
    with mounted_tmpfs(work.tmp / "full", f"size={size}") as home:
        args = ["models", "install", str(work.model)] if what == "install" else work.case_args()
        code, _, err = run_main(capsys, home, *args)
        assert_one_clear_line(code, err, "no space left")
        assert tree_snapshot(home) == {}


def test_rank_csv_onto_a_full_disk_is_exit_2(work, capsys):
    """Issue 26, item 16. Catches: the rank job failing on ENOSPC while writing --csv and the
    command exiting 1 (the promise: a full disk is the user's to fix, exit 2, like bad input)."""
    cts = work.tmp / "cts"
    cts.mkdir()
    sitk.WriteImage(make_ct(shape_zyx=(12, 48, 48), seed=2), str(cts / "ct.nrrd"))
    with mounted_tmpfs(work.tmp / "full", "size=4k") as full:
        try:  # fill it: the CSV's first block finds no room
            (full / "filler").write_bytes(b"\0" * (1 << 20))
        except OSError:
            pass
        code, _, err = run_main(capsys, work.home, "rank", str(cts), "--csv", str(full / "ranking.csv"))
        assert code == 2 and "Traceback" not in err, err
        assert not (full / "ranking.csv").exists()


def test_phantom_into_a_read_only_folder(work, capsys):
    """Before: a SimpleITK RuntimeError traceback (plus C-level noise) after generating."""
    with mounted_tmpfs(work.tmp / "ro-out", "ro,size=1m") as folder:
        code, _, err = run_main(capsys, work.home, "phantom", str(folder))
        assert_one_clear_line(code, err, "not writable")


# --------------------------------------------------------------------------- as the hook runs it
def test_before_stop_hook_probes_on_a_garbage_state(tmp_path):
    """The repository's before-stop hook: on a home whose state.json is garbage, `models list`,
    `segment` and `cases remove` end without a traceback and without exit 1 (real processes)."""
    demo_zip = next((REPO / "LymphNodeDGST" / "Resources" / "DemoModel").glob("*.zip"), None)
    if demo_zip is None:
        pytest.skip("no demo model zip")
    home = tmp_path / "home"
    ModelStore(home / "models").install(demo_zip, show_progress=False)
    for state in (home / "models").glob("*/state.json"):
        state.write_text("garbage{\n")
    junk = tmp_path / "junk.nii.gz"
    junk.write_text("not an image")
    for args in (["models", "list"], ["segment", str(junk), str(tmp_path / "out.nii.gz")],
                 ["cases", "remove", "nosuch"]):
        result = run_cli(*args, home=home, timeout=120)
        assert "Traceback" not in result.stderr and result.returncode != 1, (args, result.stderr)
        assert result.returncode == 0 or result.stderr.count("\n") == 1, (args, result.stderr)

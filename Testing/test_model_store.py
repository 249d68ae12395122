"""Model store: install from folder, zip and URL; validation; versions; activate/rollback; export."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import copy_model, run_cli, tree_snapshot
from LymphNodeDGSTLib.errors import UnsafeCheckpointError, UserInputError
from LymphNodeDGSTLib.engine.store.models import ModelStore

CHECKPOINT = Path("fold_0/checkpoint_final.pth")


def zip_folder(folder: Path, archive: Path, prefix: str = "Dataset901/nnUNetTrainer__nnUNetPlans__3d_fullres") -> Path:
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in folder.rglob("*"):
            if path.is_file():
                bundle.write(path, f"{prefix}/{path.relative_to(folder)}")
    return archive


def edit_checkpoint(folder: Path, change) -> None:
    checkpoint = torch.load(folder / CHECKPOINT, weights_only=False)
    change(checkpoint)
    torch.save(checkpoint, folder / CHECKPOINT)


def test_install_from_folder_numbers_versions_and_keeps_first_active(home, tiny_model_folder):
    store = ModelStore(home / "models")
    first = store.install(tiny_model_folder, name="tiny", show_progress=False)
    second = store.install(tiny_model_folder, name="tiny", show_progress=False, force=True)
    assert (first.ref, second.ref) == ("tiny@1", "tiny@2")
    assert store.active_version("tiny") == 1
    assert store.resolve("tiny").version == 1
    assert store.resolve("tiny@2").path.joinpath(CHECKPOINT).is_file()
    assert first.metadata["checkpoint_sha256"]["0"] == hashlib.sha256(
        (tiny_model_folder / CHECKPOINT).read_bytes()).hexdigest()


def test_cli_install_list_activate_rollback(home, tiny_model_folder):
    assert run_cli("models", "install", str(tiny_model_folder), "--name", "ln", home=home,
                   check_rc=0).stdout.strip() == "ln@1"
    run_cli("models", "install", str(tiny_model_folder), "--name", "ln", "--force", home=home, check_rc=0)
    assert run_cli("models", "activate", "ln@2", home=home, check_rc=0).stdout.strip() == "ln@2"
    listing = run_cli("models", "list", home=home, check_rc=0).stdout
    assert "* ln@2" in listing and "  ln@1" in listing
    assert run_cli("models", "rollback", "ln", home=home, check_rc=0).stdout.strip() == "ln@1"
    failed = run_cli("models", "rollback", "ln", home=home)
    assert failed.returncode == 2 and "nothing to roll back" in failed.stderr
    assert ModelStore(home / "models").active_version("ln") == 1


def test_default_name_comes_from_plans(home, tiny_model_folder):
    version = ModelStore(home / "models").install(tiny_model_folder, show_progress=False)
    assert version.name == "Dataset901_LymphNodeCT"


def test_install_from_zip_with_nested_folder(home, tiny_model_folder, tmp_path):
    archive = zip_folder(tiny_model_folder, tmp_path / "model.zip")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    version = ModelStore(home / "models").install(archive, name="z", sha256=digest, show_progress=False)
    assert version.ref == "z@1"
    with pytest.raises(UserInputError, match="checksum mismatch"):
        ModelStore(home / "models").install(archive, name="z", sha256="0" * 64, show_progress=False)
    assert [v.version for v in ModelStore(home / "models").versions("z")] == [1]


@pytest.mark.parametrize("entry", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_zip_slip_is_refused_before_anything_is_written(home, tiny_model_folder, tmp_path, entry):
    archive = zip_folder(tiny_model_folder, tmp_path / "model.zip")
    with zipfile.ZipFile(archive, "a") as bundle:
        bundle.writestr(entry, "gotcha")
    result = run_cli("models", "install", str(archive), home=home)
    assert result.returncode == 2 and "outside the destination" in result.stderr
    assert not (tmp_path / "evil.txt").exists() and not Path("/abs/evil.txt").exists()
    assert ModelStore(home / "models").names() == []
    assert not any((home / "models").glob(".install-*"))


def test_corrupt_zip_is_refused(home, tmp_path):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(b"PK\x03\x04 this is not really a zip")
    result = run_cli("models", "install", str(archive), home=home)
    assert result.returncode == 2 and "zip" in result.stderr
    assert result.stderr.count("\n") == 1


def _remove(path):
    path.unlink()


DEFECTS = {
    "missing dataset.json": (lambda f: _remove(f / "dataset.json"), "dataset.json is missing"),
    "missing plans.json": (lambda f: _remove(f / "plans.json"), "plans.json is missing"),
    "plans not json": (lambda f: (f / "plans.json").write_text("{oops"), "not valid JSON"),
    "no checkpoint": (lambda f: _remove(f / CHECKPOINT), "no fold_*/checkpoint_final.pth"),
    "corrupt checkpoint": (lambda f: (f / CHECKPOINT).write_bytes(b"\x00" * 100), "corrupt"),
    "truncated checkpoint": (lambda f: (f / CHECKPOINT).write_bytes((f / CHECKPOINT).read_bytes()[:5000]),
                             "corrupt"),
    "configuration missing": (lambda f: edit_checkpoint(
        f, lambda c: c["init_args"].update(configuration="2d")), "configuration '2d'"),
    "label count": (lambda f: (f / "dataset.json").write_text(json.dumps(
        {**json.loads((f / "dataset.json").read_text()),
         "labels": {"background": 0, "node": 1, "vessel": 2}})), "predicts 2 classes"),
    "plans mismatch": (lambda f: (f / "plans.json").write_text(
        (f / "plans.json").read_text().replace('"features_per_stage": [\n            8,',
                                                 '"features_per_stage": [\n            12,')),
                       "does not match the network"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_has_its_own_message_and_changes_nothing(home, tiny_model_folder, tmp_path, defect):
    broken = copy_model(tiny_model_folder, tmp_path / "broken")
    damage, message = DEFECTS[defect]
    damage(broken)
    ModelStore(home / "models").install(tiny_model_folder, name="good", show_progress=False)
    before = tree_snapshot(home)
    result = run_cli("models", "install", str(broken), "--name", "good", home=home)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.startswith("lndgst: error:") and result.stderr.count("\n") == 1
    assert tree_snapshot(home) == before


def test_unsafe_checkpoint_refused_unless_trusted(home, tiny_model_folder, tmp_path):
    unsafe = copy_model(tiny_model_folder, tmp_path / "unsafe")
    edit_checkpoint(unsafe, lambda c: c.update(callback=os.getcwd))
    store = ModelStore(home / "models")
    with pytest.raises(UnsafeCheckpointError, match="posix.getcwd"):
        store.install(unsafe, name="u", show_progress=False)
    assert store.names() == []
    result = run_cli("models", "install", str(unsafe), "--name", "u", "--trust-checkpoint", home=home)
    assert result.returncode == 0, result.stderr
    assert store.resolve("u").metadata["trusted_checkpoint"] is True


def test_checkpoint_with_numpy_scalar_logs_loads_safely(home, tiny_model_folder, tmp_path):
    """nnU-Net's own trainer logs numpy scalars; these must pass weights_only loading."""
    logged = copy_model(tiny_model_folder, tmp_path / "logged")
    edit_checkpoint(logged, lambda c: c.update(logging={
        "mean_fg_dice": [np.float64(0.5), np.float32(0.6)], "epoch_end_timestamps": [np.float64(1.0)],
        "ema_fg_dice": [np.float64(0.7)], "lrs": [np.float64(0.01)]}, _best_ema=np.float64(0.7),
        current_epoch=np.int64(3)))
    assert ModelStore(home / "models").install(logged, name="logged", show_progress=False).ref == "logged@1"


def test_export_is_loaded_by_stock_nnunet_predictor(installed_home, tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    destination = tmp_path / "exported"
    run_cli("models", "export", "tiny@1", str(destination), home=installed_home, check_rc=0)
    assert not (destination / "version.json").exists()
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(destination), use_folds=(0,))
    assert predictor.configuration_manager.patch_size == [32, 64, 64]
    refused = run_cli("models", "export", "tiny@1", str(destination), home=installed_home)
    assert refused.returncode == 2 and "not an empty folder" in refused.stderr


def test_unknown_model_and_version_messages(installed_home):
    store = ModelStore(installed_home / "models")
    with pytest.raises(UserInputError, match="no model named 'nope'"):
        store.resolve("nope")
    with pytest.raises(UserInputError, match="no version 7"):
        store.resolve("tiny@7")
    with pytest.raises(UserInputError, match="invalid version"):
        store.resolve("tiny@x")


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with Range support; the first full request of `flaky` stops half way."""

    cut_once: set = set()

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path.name.startswith("flaky") and start == 0 and path.name not in self.cut_once:
            self.cut_once.add(path.name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def http_folder(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_RangeHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_install_verifies_and_resumes_after_interruption(home, tiny_model_folder, http_folder):
    served, base = http_folder
    archive = zip_folder(tiny_model_folder, served / "flaky-model.zip")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    url = f"{base}/flaky-model.zip"
    first = run_cli("models", "install", url, "--name", "web", "--sha256", digest, home=home)
    assert first.returncode == 2 and "run the same command again to resume" in first.stderr
    assert ModelStore(home / "models").names() == []
    second = run_cli("models", "install", url, "--name", "web", "--sha256", digest, home=home)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "web@1"
    assert not (home / "models" / ".downloads").exists()  # the finished archive is not kept


def test_url_install_with_wrong_checksum_installs_nothing(home, tiny_model_folder, http_folder):
    served, base = http_folder
    zip_folder(tiny_model_folder, served / "model.zip")
    result = run_cli("models", "install", f"{base}/model.zip", "--sha256", "ab" * 32, home=home)
    assert result.returncode == 2 and "checksum mismatch" in result.stderr
    assert ModelStore(home / "models").names() == []
    missing = run_cli("models", "install", f"{base}/absent.zip", home=home)
    assert missing.returncode == 2 and "HTTP 404" in missing.stderr

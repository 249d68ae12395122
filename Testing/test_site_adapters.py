"""Site adapters: a version as a bitwise-exact safetensors delta over its parent, exported at one
site and installed onto the same base at another (found by the sha256 of its weights)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli, tree_snapshot
from LymphNodeDGSTLib.engine.store.adapter_store import export_adapter
from LymphNodeDGSTLib.engine.store.adapters import delta_tensors, read_adapter
from LymphNodeDGSTLib.engine.store.architectures import create_random_model, write_results_folder
from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
from LymphNodeDGSTLib.engine.store.models import ModelStore
from LymphNodeDGSTLib.engine.store.state_dicts import weights_sha256

CONV = "encoder.stages.1.0.convs.0.conv.weight"          # aliased as decoder.encoder.stages...
HEAD = "decoder.seg_layers.2.weight"
BIAS = "encoder.stages.0.0.convs.0.conv.bias"            # nnU-Net initialises biases to 0.0


def fold0_weights(folder: Path) -> dict:
    return load_checkpoint(folder / "fold_0" / "checkpoint_final.pth")["network_weights"]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


@pytest.fixture(scope="session")  # not module: xdist interleaves modules (re-ran it)
def site_a(tmp_path_factory, tiny_model_folder) -> tuple[Path, dict, Path]:
    """Home of site A: the foundation as `foundation@1`, a sparse adaptation of it as @2, and
    @2 exported as an adapter (in-process; the command line is tested below)."""
    tmp_path = tmp_path_factory.mktemp("site_a")
    home = tmp_path / "site_a"
    store = ModelStore(home / "models")
    store.install(tiny_model_folder, name="foundation", show_progress=False)
    weights = {k: v.clone() for k, v in fold0_weights(tiny_model_folder).items()}
    weights[CONV].view(-1)[[0, 5, 700]] += 0.25          # a few entries of an aliased conv
    weights[CONV].view(-1)[9] *= -1
    assert weights[BIAS][0].item() == 0.0
    weights[BIAS][0] = -0.0                               # equal as a float, different bits
    weights["decoder." + CONV] = weights[CONV]            # keep nnU-Net's alias
    weights[HEAD] += 0.5                                  # a whole small tensor
    plans = json.loads((tiny_model_folder / "plans.json").read_text())
    dataset_json = json.loads((tiny_model_folder / "dataset.json").read_text())
    adapted = write_results_folder(tmp_path / "adapted", plans, dataset_json, weights)
    store.add_version("foundation", adapted, {"kind": "adapted", "parent": 1, "parent_fold": "0",
                                              "method": "dgst", "metrics": {"dice_after": 0.5}},
                      activate_if_first=False)
    adapter = export_adapter(store, "foundation@2", tmp_path / "exported.safetensors")
    return home, weights, adapter


def test_adapter_round_trip_is_bitwise_exact_and_small(site_a, tmp_path, tiny_model_folder):
    """Catches: reconstruction off by one in the index decoding, values compared as floats (the
    -0.0 change would be lost), aliases not restored, the base found by name instead of weights."""
    home_a, adapted, _ = site_a
    adapter = tmp_path / "site.safetensors"
    run_cli("models", "export-adapter", "foundation@2", str(adapter), home=home_a, check_rc=0)
    header_length = struct.unpack("<Q", adapter.read_bytes()[:8])[0]
    assert adapter.read_bytes()[8:9] == b"{" and header_length < adapter.stat().st_size  # no pickle
    checkpoint_size = (tiny_model_folder / "fold_0" / "checkpoint_final.pth").stat().st_size
    assert adapter.stat().st_size < 0.2 * checkpoint_size

    home_b = tmp_path / "site_b"                       # the same base, under another name
    ModelStore(home_b / "models").install(tiny_model_folder, name="lnfm", show_progress=False)
    result = run_cli("models", "install-adapter", str(adapter), home=home_b, check_rc=0)
    assert result.stdout.strip() == "lnfm@2"
    store_b = ModelStore(home_b / "models")
    version = store_b.resolve("lnfm@2")
    assert store_b.active_version("lnfm") == 1
    assert version.metadata["parent"] == 1 and version.metadata["kind"] == "adapter"
    assert version.metadata["method"] == "dgst" and version.metadata["adapter_origin"] == "foundation@2"
    rebuilt = fold0_weights(version.path)
    assert set(rebuilt) == set(adapted)
    for key in adapted:
        assert torch.equal(bits(rebuilt[key]), bits(adapted[key])), key
    assert weights_sha256(rebuilt) == weights_sha256(adapted)
    assert str(rebuilt[BIAS][0].item()) == "-0.0"

    again = run_cli("models", "install-adapter", str(adapter), home=home_b)
    assert again.returncode == 2 and "already installed as lnfm@2" in again.stderr


def test_delta_encoding_chooses_sparse_gaps_indices_or_dense():
    """Catches: a dense tensor stored as (bigger) indices+values, or gaps that overflow uint16."""
    base = {"small": torch.zeros(10), "wide": torch.zeros(200_000), "moved": torch.zeros(100)}
    new = {"small": torch.ones(10), "wide": torch.zeros(200_000), "moved": torch.zeros(100)}
    new["wide"][[3, 150_000]] = 1.0                      # a gap over 65535: int64 indices
    new["moved"][[1, 2]] = 2.0
    tensors, layout, aliases = delta_tensors(base, new)
    assert set(tensors) == {"small:dense", "wide:indices", "wide:values", "moved:gaps", "moved:values"}
    assert tensors["moved:gaps"].dtype == torch.uint16 and tensors["moved:gaps"].tolist() == [2, 1]
    assert layout["wide"] == {"shape": [200_000], "dtype": "float32"} and aliases == {}


def _rewrite(adapter: Path, destination: Path, edit_header=None, edit_tensors=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(adapter), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    header = json.loads(metadata["header"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    metadata["header"] = json.dumps(header)
    save_file(tensors, str(destination), metadata=metadata)
    return destination


def _write(destination: Path, data: bytes) -> Path:
    destination.write_bytes(data)
    return destination


def _out_of_range(tensors: dict) -> None:
    del tensors[f"{CONV}:gaps"]
    tensors[f"{CONV}:indices"] = torch.tensor([0, 5, 9, 10**6])


def _flip_a_value_byte(path: Path) -> None:
    """Flip one bit inside the stored values of the aliased convolution (a disk or transfer error)."""
    data = bytearray(path.read_bytes())
    length = struct.unpack("<Q", data[:8])[0]
    start, _ = json.loads(data[8:8 + length])[f"{CONV}:values"]["data_offsets"]
    data[8 + length + start + 1] ^= 0x40
    path.write_bytes(bytes(data))


BAD_ADAPTERS = {
    "truncated": (lambda a, d: _write(d, a.read_bytes()[: a.stat().st_size // 2]),
                  "truncated or corrupted"),
    "corrupted value": (lambda a, d: (shutil.copy(a, d), _flip_a_value_byte(d)) and d,
                        "do not match the adapter's checksum"),
    "not an adapter": (lambda a, d: _write(d, b"PK\x03\x04 not safetensors"),
                       "truncated or corrupted"),
    "shape mismatch": (lambda a, d: _rewrite(a, d, edit_header=lambda h: h["tensors"][HEAD].update(
        shape=[2, 8, 1, 1, 1, 1])), "in the base but [2, 8, 1, 1, 1, 1]"),
    "index out of range": (lambda a, d: _rewrite(a, d, edit_tensors=_out_of_range),
                           "outside the base's tensor"),
    # issue 26, item 1: the fold becomes a folder name and is not covered by the weights checksum
    "fold climbs out of the home": (lambda a, d: _rewrite(a, d, edit_header=lambda h: h["result"].update(
        fold="0/../../../../../escaped")), "result.fold is"),
    "configuration is a path": (lambda a, d: _rewrite(a, d, edit_header=lambda h: h["result"].update(
        configuration="../3d_fullres")), "result.configuration is"),
    # item 7: a record the store could not read back once published
    "record.method a number": (lambda a, d: _rewrite(a, d, edit_header=lambda h: h["record"].update(
        method=5)), "record.method is 5"),
    "record.metrics a string": (lambda a, d: _rewrite(a, d, edit_header=lambda h: h["record"].update(
        metrics="good")), "record.metrics is"),
    # item 10: crafted headers and tensors that once ended in a traceback
    "alias owner missing": (lambda a, d: _rewrite(a, d, edit_header=lambda h: h["aliases"].update(
        {"decoder." + CONV: "no.such.tensor"})), "not one of the adapter's tensors"),
    "alias owner a list": (lambda a, d: _rewrite(a, d, edit_header=lambda h: h["aliases"].update(
        {"decoder." + CONV: [CONV]})), "not one of the adapter's tensors"),
    "gaps stored as bf16": (lambda a, d: _rewrite(a, d, edit_tensors=lambda ts: ts.update(
        {f"{CONV}:gaps": ts[f"{CONV}:gaps"].to(torch.bfloat16)})), "stored as bfloat16, not uint16"),
    "gaps stored as float8": (lambda a, d: _rewrite(a, d, edit_tensors=lambda ts: ts.update(
        {f"{CONV}:gaps": ts[f"{CONV}:gaps"].to(torch.float32).to(torch.float8_e4m3fn)})),
        "stored as float8_e4m3fn, not uint16"),
    "layout spec malformed": (lambda a, d: _rewrite(a, d, edit_header=lambda h: h["tensors"].update(
        {HEAD: "abc"})), "the layout of tensor"),
}


@pytest.mark.parametrize("defect", sorted(BAD_ADAPTERS))
def test_bad_adapters_exit_2_and_install_nothing(site_a, tmp_path, tiny_model_folder, defect):
    """Catches: safetensors errors escaping as tracebacks, a corrupted value installed silently
    (checksum not checked), shapes or indices not checked before writing into the base."""
    _, _, adapter = site_a
    damage, message = BAD_ADAPTERS[defect]
    bad = damage(adapter, tmp_path / "bad.safetensors")
    home_b = tmp_path / "site_b"
    ModelStore(home_b / "models").install(tiny_model_folder, name="lnfm", show_progress=False)
    before = tree_snapshot(home_b)
    result = run_cli("models", "install-adapter", str(bad), home=home_b)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert tree_snapshot(home_b) == before
    assert not any(tmp_path.parent.rglob("escaped")), "an adapter wrote outside the home"


def test_adapter_for_another_base_is_refused(site_a, tmp_path):
    """Catches: install-adapter applying a delta to whatever model is installed."""
    _, _, adapter = site_a
    other = create_random_model(tmp_path / "other", seed=1)   # same architecture, other weights
    home_b = tmp_path / "site_b"
    ModelStore(home_b / "models").install(other, name="foundation", show_progress=False)
    before = tree_snapshot(home_b)
    result = run_cli("models", "install-adapter", str(adapter), home=home_b)
    assert result.returncode == 2 and "no installed version has the weights" in result.stderr
    assert "foundation@1" in result.stderr and result.stderr.count("\n") == 1
    assert tree_snapshot(home_b) == before


def test_export_adapter_needs_an_adapted_version_and_writes_nothing_on_refusal(site_a, tmp_path):
    """Catches: an installed (parentless) version exported as a 'delta' of nothing, a refused
    export leaving a file behind, the parent's identity or nnU-Net's aliases missing from the header."""
    home_a, _, adapter = site_a
    target = tmp_path / "x.safetensors"
    result = run_cli("models", "export-adapter", "foundation@1", str(target), home=home_a)
    assert result.returncode == 2 and "no parent" in result.stderr and not target.exists()
    header = read_adapter(adapter).header
    assert header["parent"]["name"] == "foundation" and header["parent"]["version"] == 1
    assert header["record"]["method"] == "dgst" and header["aliases"]["decoder." + CONV] == CONV


def test_adapter_with_non_finite_weights_is_refused(site_a, tmp_path, tiny_model_folder):
    """Issue 26, item 5. Catches: NaN or infinite weights (with a checksum recomputed over them, so
    the adapter is self-consistent) installing and segmenting to an empty label with exit 0."""
    from LymphNodeDGSTLib.engine.store.adapters import write_adapter

    _, adapted, adapter = site_a
    base = fold0_weights(tiny_model_folder)
    poisoned = {k: v.clone() for k, v in adapted.items()}
    poisoned["decoder." + CONV] = poisoned[CONV]
    poisoned[HEAD].view(-1)[0] = float("nan")
    poisoned[CONV].view(-1)[1] = float("inf")
    header = {k: v for k, v in read_adapter(adapter).header.items() if k not in ("tensors", "aliases")}
    bad = write_adapter(tmp_path / "nan.safetensors", base, poisoned, header)
    home_b = tmp_path / "site_b"
    ModelStore(home_b / "models").install(tiny_model_folder, name="lnfm", show_progress=False)
    before = tree_snapshot(home_b)
    result = run_cli("models", "install-adapter", str(bad), home=home_b)
    assert result.returncode == 2 and "NaN or infinite" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and tree_snapshot(home_b) == before


def test_export_adapter_never_overwrites_the_store_a_special_file_or_a_file_without_force(site_a, tmp_path):
    """Issue 26, item 2. Catches: export-adapter writing over the version's own checkpoint (after
    which `segment` said "checkpoint is corrupt"), its version.json, a FIFO (a reader would block
    forever) or an existing file without --force."""
    home_a, _, _ = site_a
    version_folder = home_a / "models" / "foundation" / "versions" / "2"
    before = tree_snapshot(home_a)
    for target, message in ((version_folder / "fold_0" / "checkpoint_final.pth", "inside the model store"),
                            (version_folder / "version.json", "inside the model store"),
                            (home_a / "models" / "new.safetensors", "inside the model store")):
        result = run_cli("models", "export-adapter", "foundation@2", str(target), home=home_a)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert tree_snapshot(home_a) == before
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    result = run_cli("models", "export-adapter", "foundation@2", str(fifo), home=home_a)
    assert result.returncode == 2 and "not a regular file" in result.stderr
    existing = tmp_path / "kept.safetensors"
    existing.write_bytes(b"the user's file")
    result = run_cli("models", "export-adapter", "foundation@2", str(existing), home=home_a)
    assert result.returncode == 2 and "--force" in result.stderr and existing.read_bytes() == b"the user's file"
    run_cli("models", "export-adapter", "foundation@2", str(existing), "--force", home=home_a, check_rc=0)
    assert read_adapter(existing).header["result"]["version"] == 2


def test_exported_adapter_has_the_umask_mode_and_a_long_name_works(site_a, tmp_path):
    """Issue 26, items 18 and 10. Catches: the 0600 of a temporary file left on the exported adapter
    (the docs promise the umask), and a temporary name over 255 bytes for a legal 240-byte name."""
    home_a, _, _ = site_a
    target = tmp_path / ("a" * 228 + ".safetensors")
    assert len(target.name) == 240
    run_cli("models", "export-adapter", "foundation@2", str(target), home=home_a, check_rc=0)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left


def test_export_adapter_onto_a_full_disk_is_one_line(site_a, tmp_path):
    """Issue 26, item 10. Catches: safetensors' SafetensorError escaping as a traceback (exit 1)
    when the disk is full, and a partial file left behind."""
    home_a, _, _ = site_a
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(full)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        result = run_cli("models", "export-adapter", "foundation@2", str(full / "site.safetensors"), home=home_a)
        assert result.returncode == 2 and "No space left" in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)


def test_concurrent_installs_of_one_adapter_publish_it_once(site_a, tmp_path, tiny_model_folder):
    """Issue 26, item 8. Catches: two install-adapter runs of one file both passing the "already
    installed" check and publishing identical versions @2 and @3."""
    _, _, adapter = site_a
    home_b = tmp_path / "site_b"
    ModelStore(home_b / "models").install(tiny_model_folder, name="lnfm", show_progress=False)
    command = [sys.executable, "-m", "LymphNodeDGSTLib", "--home", str(home_b), "models", "install-adapter", str(adapter)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = [(run.wait(timeout=300), run.stdout.read(), run.stderr.read()) for run in runs]
    assert sorted(code for code, _, _ in outcomes) == [0, 2, 2], outcomes
    assert all("already installed as lnfm@2" in err for code, _, err in outcomes if code == 2)
    assert [v.version for v in ModelStore(home_b / "models").versions("lnfm")] == [1, 2]


def test_a_killed_adapter_install_leaves_nothing_for_long(site_a, tmp_path, tiny_model_folder):
    """Issue 26, item 12. Catches: a `.adapter-*` staging folder (a full checkpoint) without an owner
    tag, which no later run could tell from a live one, so it was never cleaned."""
    from LymphNodeDGSTLib.engine.processes import owner_tag

    _, _, adapter = site_a
    home_b = tmp_path / "site_b"
    ModelStore(home_b / "models").install(tiny_model_folder, name="lnfm", show_progress=False)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = home_b / "models" / f".adapter-{owner_tag(int(finished.stdout))}-x1"
    (dead / "results").mkdir(parents=True)
    run_cli("models", "install-adapter", str(adapter), home=home_b, check_rc=0)
    assert not dead.exists()
    assert not [p for p in (home_b / "models").iterdir() if p.name.startswith(".adapter-")]

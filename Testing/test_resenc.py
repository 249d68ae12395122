"""nnU-Net's ResidualEncoderUNet (the ResEnc M/L/XL plans) end to end: DGST's per-filter guarantee
on every convolution of a residual block, every adaptation method, install from a checkpoint,
segment, adapt a 2-fold model, export for stock nnU-Net, site adapter, hot swap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_ct
from test_adapt import blob_case
from test_checkpoint_install import nnunet_checkpoint
from dgst_helpers import GAMMA, changed_mask, output_filters, record_plans, train, union_of
from LymphNodeDGSTLib.adaptation import dgst
from LymphNodeDGSTLib.adaptation.dgst import lora as dgst_lora
from LymphNodeDGSTLib.engine.store import architectures

SKIP_PROJECTION = ".skip.1.conv.weight"  # BasicBlockD's 1x1x1 projection (after the avg-pool)


def tiny_resenc(seed: int = 0, deep_supervision: bool = True) -> nn.Module:
    """A 3-stage ResidualEncoderUNet: stem, residual blocks with 1x1x1 skip projections."""
    torch.manual_seed(seed)
    spec = resenc_tiny_spec(features_per_stage=(4, 8, 16), patch_size=(4, 16, 16),
                            strides=([1, 1, 1], [1, 2, 2], [2, 2, 2]),
                            kernel_sizes=([1, 3, 3], [3, 3, 3], [3, 3, 3]), blocks_per_stage=(1, 2, 2))
    return architectures.build_network(architectures.make_plans(spec),
                                       architectures.make_dataset_json(spec.labels),
                                       deep_supervision=deep_supervision)


def resenc_tiny_spec(**overrides) -> architectures.UNetSpec:
    return architectures.tiny_spec(**{"network": "resenc", "blocks_per_stage": (1, 2, 2, 2), **overrides})


def test_dgst_changes_at_most_gamma_entries_per_filter_in_every_residual_convolution():
    """Catches: 1x1x1 skip projections (or the stem) left out of the sparse set, so they would
    either be frozen or trained densely; an entry outside a step's selection moving."""
    network = tiny_resenc()
    foundation = {n: p.detach().clone() for n, p in network.named_parameters()}
    policy = dgst.make_policy("dgst", network, gamma=GAMMA)
    recorded = record_plans(policy)
    train(network, policy, 4)
    sparse = {info.name: info for info in policy.infos if info.layout is not None and not info.always_trained}
    skips = [name for name in sparse if name.endswith(SKIP_PROJECTION)]
    assert len(skips) == 2 and all(sparse[name].parameter.shape[2:] == (1, 1, 1) for name in skips)
    assert any(name.startswith("encoder.stem.") for name in sparse)
    assert any(".conv2.conv." in name for name in sparse)
    for name, info in sparse.items():
        changed = changed_mask(foundation[name], info.parameter)
        assert not (changed & ~union_of(recorded, info.parameter)).any(), f"{name}: unselected entry moved"
        assert changed.any(), f"{name}: never moved (left out of training?)"

        transposed = isinstance(network.get_submodule(name.rpartition(".")[0]), nn.ConvTranspose3d)
        for allowed in recorded:
            counts = output_filters(allowed[id(info.parameter)], transposed).sum(dim=1)
            assert (counts == min(GAMMA, info.parameter[0].numel())).all(), name


@pytest.mark.parametrize("method", dgst.POLICY_NAMES)
def test_every_method_trains_resenc_and_leaves_plain_loadable_weights(method):
    """Catches: a method that cannot handle the residual blocks (PEFT's own LoRA merge fails on the
    1x1x1 skip projections: dgst_lora._merge_by_convolution), or a merge leaving PEFT keys that stock
    nnU-Net could not load."""
    network = tiny_resenc()
    keys = list(network.state_dict())
    foundation = {k: v.clone() for k, v in network.state_dict().items()}
    policy = dgst.make_policy(method, network, gamma=GAMMA, warmup_steps=1, lora_rank=2)
    train(network, policy, 2)
    weights = dgst_lora.merged_state_dict(network) if method == "lora" else network.state_dict()
    assert list(weights) == keys
    plain = tiny_resenc(seed=1)
    plain.load_state_dict(weights, strict=True)
    if method == "lora":   # the merged network computes what the adapters computed
        image = torch.randn(1, 1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
        network.eval(), plain.eval()
        with torch.no_grad():
            assert torch.allclose(network(image)[0], plain(image)[0], atol=1e-4, rtol=1e-4)
    skip = next(k for k in keys if k.endswith(SKIP_PROJECTION))
    moved = not torch.equal(weights[skip], foundation[skip])
    assert moved == (method not in ("bias", "norm")), f"{method}: skip projection moved={moved}"


class QuietReporter:
    """What run_adaptation needs from a job, without a job."""

    def __init__(self, folder: Path) -> None:
        self.job_folder = folder

    def progress(self, *args, **kwargs) -> None: ...
    def metric(self, *args, **kwargs) -> None: ...
    def log(self, message: str) -> None: ...
    def cancelled(self) -> bool: return False
    def check_cancelled(self) -> None: ...


@pytest.mark.slow
def test_resenc_two_fold_model_install_segment_adapt_export_adapter_and_hot_swap(home, tmp_path):
    """2-fold ResEnc checkpoints -> install -> segment -> adapt (fold 0 only, the new version holds
    only it) -> export loads in stock nnU-Net -> adapter onto the same base elsewhere -> the live
    segmenter swaps to the activated version. Catches: adaptation of a multi-fold model publishing
    the wrong fold or all folds, an adapter made against the wrong parent fold."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest, run_adaptation
    from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
    from LymphNodeDGSTLib.engine.store.adapter_store import export_adapter, install_adapter
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
    from LymphNodeDGSTLib.engine.store.models import ModelStore
    from LymphNodeDGSTLib.home import Home

    spec = resenc_tiny_spec(dataset_name="Dataset902_ResEnc")
    folds = [nnunet_checkpoint(tmp_path / f"f{f}" / "checkpoint_final.pth", fold=f, seed=f, spec=spec)
             for f in (1, 0)]
    store = ModelStore(home / "models")
    store.install_checkpoints(list(map(str, folds)), name="resenc")   # the CLI: test_checkpoint_install
    parent = store.resolve("resenc@1")
    assert parent.metadata["folds"] == ["0", "1"]
    segmenter = Segmenter(store, device="cpu")
    probe = make_ct(seed=3)
    segmenter.segment(probe, fast=True)
    assert segmenter.loaded_version.ref == "resenc@1" and len(segmenter._predictor.list_of_parameters) == 2

    library = CaseLibrary(home / "cases")
    for seed in range(2):
        library.add(*blob_case(seed))
    summary = run_adaptation(Home(home), AdaptRequest(model="resenc", iterations=3, iterations_per_epoch=3,
                                                      device="cpu", activation="force", holdout=1),
                             QuietReporter(tmp_path), tmp_path / "work")
    adapted = store.resolve(summary["version"])
    assert adapted.ref == "resenc@2" and adapted.metadata["folds"] == ["0"]
    assert adapted.metadata["parent_fold"] == "0"

    exported = tmp_path / "exported"
    store.export("resenc@2", exported)
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(exported), use_folds=(0,))
    assert type(predictor.network).__name__ == "ResidualEncoderUNet"

    adapter = export_adapter(store, "resenc@2", tmp_path / "resenc.safetensors")
    other_home = tmp_path / "other"
    ModelStore(other_home / "models").install_checkpoints(list(map(str, folds)), name="ln")
    install_adapter(ModelStore(other_home / "models"), adapter, activate=True)
    assert ModelStore(other_home / "models").active_version("ln") == 2

    segmenter.segment(probe, fast=True)   # hot swap to the activated adapted version
    assert segmenter.loaded_version.ref == "resenc@2" and len(segmenter._predictor.list_of_parameters) == 1

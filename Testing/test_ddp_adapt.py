"""DGST on two DDP processes (gloo on the CPU, started by torchrun): same selection, same weights."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
import torch

from test_adapt import blob_case
from LymphNodeDGSTLib.adaptation.ddp_trainer import weights_sha256
from LymphNodeDGSTLib.adaptation.distributed import check_nproc, launch_fine_tune
from LymphNodeDGSTLib.adaptation.nnunet_dataset import TrainingCase, prepare_dataset
from LymphNodeDGSTLib.adaptation.trainer import FineTuneSettings
from LymphNodeDGSTLib.engine.store.architectures import read_json
from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
from LymphNodeDGSTLib.engine.store.results_folders import find_checkpoints
from LymphNodeDGSTLib.errors import UserInputError

GAMMA, ITERATIONS = 2, 3


@pytest.fixture(scope="session")  # not module: xdist interleaves modules (re-ran it)
def two_rank_run(tiny_model_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    cases = []
    for seed in range(2):
        image, label = blob_case(seed)
        sitk.WriteImage(image, str(root / f"ct{seed}.nii.gz"))
        sitk.WriteImage(label, str(root / f"label{seed}.nii.gz"))
        cases.append(TrainingCase(f"case{seed}", root / f"ct{seed}.nii.gz", root / f"label{seed}.nii.gz"))
    checkpoint = next(iter(find_checkpoints(tiny_model_folder).values()))
    foundation = load_checkpoint(checkpoint)
    dataset = prepare_dataset(cases, read_json(tiny_model_folder / "plans.json"),
                              read_json(tiny_model_folder / "dataset.json"),
                              foundation["init_args"]["configuration"], root / "preprocessed")
    settings = FineTuneSettings(method="dgst", gamma=GAMMA, iterations=ITERATIONS,
                                iterations_per_epoch=ITERATIONS, val_iterations_per_epoch=1)
    progress = []
    result = launch_fine_tune(checkpoint, False, dataset, root / "training", settings, "cpu", 2,
                              on_iteration=lambda done, total, loss: progress.append(done),
                              audit_path=root / "audit")
    ranks = [json.loads((root / "audit" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    return result, ranks, progress, foundation


def test_two_gloo_ranks_select_the_same_entries_and_end_with_the_same_weights(two_rank_run):
    """Mutation caught (tried by hand): the backward under `network.no_sync()` (selection from each
    rank's local gradient instead of the all-reduced one) gives different masks and weights."""
    result, ranks, progress, _ = two_rank_run
    assert [r["batch_size"] for r in ranks] == [1, 1]  # nnU-Net split the global batch of 2
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == ITERATIONS
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert step0["masks_sha256"] == step1["masks_sha256"]
        assert step0["entries_updated"] == step1["entries_updated"] > 0
    assert len({s["masks_sha256"] for s in ranks[0]["steps"]}) == ITERATIONS  # dynamic: redone each step
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert progress == list(range(1, ITERATIONS + 1))  # rank 0's progress reached the launcher
    assert "x2 (gloo)" in result.device


def test_two_gloo_ranks_keep_the_per_filter_bound_and_publish_rank_0s_weights(two_rank_run):
    """Mutation caught (tried by hand): masking the gradient only (no restore after the step), so
    momentum moves unselected entries: more than gamma entries per filter change in a step."""
    result, ranks, _, foundation = two_rank_run
    for rank in ranks:
        assert all(step["max_changed_per_filter"] <= GAMMA for step in rank["steps"])
        assert all(step["max_changed_per_filter"] >= 1 for step in rank["steps"])
    saved = torch.load(result.results_folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert weights_sha256(saved["network_weights"]) == ranks[0]["weights_sha256"]
    assert weights_sha256(saved["network_weights"]) != weights_sha256(foundation["network_weights"])
    stats = json.loads((result.results_folder / "adaptation_stats.json").read_text())
    assert stats["step_summary"]["steps_applied"] == ITERATIONS


@pytest.mark.parametrize("nproc, device", [(0, "cpu"), (2, "mps")])
def test_bad_nproc_is_refused(nproc, device):
    with pytest.raises(UserInputError, match="--nproc"):
        check_nproc(nproc, device)

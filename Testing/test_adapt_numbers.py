"""`adapt` refuses numbers that cannot give a sane run, and a run whose loss or weights turn
non-finite stops and publishes nothing (issue 12, data loss 6)."""

from __future__ import annotations


import pytest
import torch
from conftest import tree_snapshot
from test_adapt import blob_case

from LymphNodeDGSTLib.adaptation import dgst
from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest, run_adaptation
from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
from LymphNodeDGSTLib.adaptation.trainer import TrainingDiverged, check_finite_weights
from LymphNodeDGSTLib.cli import main as cli
from LymphNodeDGSTLib.engine.store import architectures
from LymphNodeDGSTLib.engine.store.models import ModelStore
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.jobs.events import Reporter

BAD_NUMBERS = {
    "lr nan": (["--lr", "nan"], "--lr must be a finite number"),
    "lr inf": (["--lr", "inf"], "--lr must be a finite number"),
    "lr negative": (["--lr", "-1"], "--lr must be a finite number above 0"),
    "lr zero": (["--lr", "0"], "--lr must be a finite number above 0"),
    "l2 nan": (["--l2-to-foundation", "nan"], "--l2-to-foundation must be a finite number"),
    "l2 negative": (["--l2-to-foundation", "-0.5"], "--l2-to-foundation must be a finite number"),
    "huge gamma": (["--gamma", "100000000000000000000"], "--gamma must be a whole number from 1 to"),
    "zero iterations per epoch": (["--iterations-per-epoch", "0"], "--iterations-per-epoch must be"),
    "negative seed": (["--seed", "-3"], "--seed must be a whole number"),
}


@pytest.fixture
def one_case_home(installed_home) -> Home:
    CaseLibrary(installed_home / "cases").add(*blob_case(0))
    return Home(installed_home)


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_bad_numbers_are_refused_at_submission(one_case_home, capsys, case):
    """Catches each unchecked number (found: `--lr nan` published a model with 186 of 188
    tensors NaN, exit 0; `--gamma 1e20` silently trained everything)."""
    extra, message = BAD_NUMBERS[case]
    before = tree_snapshot(one_case_home.root)
    status = cli.main(["--home", str(one_case_home.root), "adapt", *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert tree_snapshot(one_case_home.root) == before and not one_case_home.jobs.exists()


def test_gamma_that_covers_every_kernel_is_refused_by_the_policy():
    """Catches a gamma at or above the largest kernel silently meaning full fine-tuning."""
    network = architectures.build_network(*_tiny_plans())
    largest = max(p.shape[1:].numel() for n, p in network.named_parameters()
                  if p.dim() == 5 and "seg_layers" not in n)
    with pytest.raises(UserInputError, match="full fine-tuning"):
        dgst.make_policy("dgst", network, gamma=largest)
    assert dgst.make_policy("dgst", network, gamma=largest - 1).gamma == largest - 1


def _tiny_plans():
    spec = architectures.tiny_spec()
    return architectures.make_plans(spec), architectures.make_dataset_json({"background": 0, "node": 1})


def test_non_finite_weights_are_never_written():
    weights = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "steps": torch.tensor(3)}
    with pytest.raises(TrainingDiverged, match=r"1 weight tensor\(s\) hold NaN"):
        check_finite_weights(weights, "by the end of training")
    check_finite_weights({"a": torch.ones(2)}, "now")


def test_a_run_whose_loss_turns_nan_stops_at_once_and_publishes_nothing(one_case_home, tiny_model_folder,
                                                                        tmp_path):
    """A parent with one NaN weight makes the loss NaN at the first iteration. Catches a loop
    that trains on (the run ended only after all iterations) and publication of NaN weights.
    (Installs refuse non-finite weights since issue 26: the installed checkpoint is damaged on disk
    afterwards, as a disk or a hand could.)"""
    store = ModelStore(one_case_home.models)
    version = store.install(tiny_model_folder, name="poisoned", show_progress=False)
    checkpoint_path = version.path / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    name = next(k for k, v in checkpoint["network_weights"].items() if v.dim() == 5)
    checkpoint["network_weights"][name].view(-1)[0] = float("nan")
    torch.save(checkpoint, checkpoint_path)
    CaseLibrary(one_case_home.cases).add(*blob_case(1))
    before = tree_snapshot(one_case_home.models)
    job_folder = tmp_path / "job"
    job_folder.mkdir()
    reporter = Reporter(job_folder, min_interval_s=0)
    request = AdaptRequest(model="poisoned", iterations=6, iterations_per_epoch=3, device="cpu",
                           holdout=0)
    with pytest.raises(TrainingDiverged, match="at iteration 1: the loss became nan"):
        run_adaptation(one_case_home, request, reporter, job_folder / "work")
    assert tree_snapshot(one_case_home.models) == before
    assert [v.ref for v in store.versions("poisoned")] == ["poisoned@1"]


@pytest.mark.parametrize("ending", ["failure", "success"])
def test_the_job_work_copy_is_removed_when_the_job_ends(tmp_path, monkeypatch, ending):
    """Catches `jobs/ID/work` (a full checkpoint copy per job) kept after the job."""
    from LymphNodeDGSTLib.adaptation import adapt

    def pretend(home, request, reporter, work_dir):
        (work_dir / "training" / "fold_0").mkdir(parents=True)
        (work_dir / "training" / "fold_0" / "checkpoint_final.pth").write_bytes(b"\0" * 1000)
        if ending == "failure":
            raise TrainingDiverged("training diverged at iteration 3")
        return {"version": "x@2"}

    monkeypatch.setattr(adapt, "run_adaptation", pretend)
    job_folder = tmp_path / "job"
    job_folder.mkdir()
    params = {"home": str(tmp_path / "home"), "request": {}}
    if ending == "failure":
        with pytest.raises(TrainingDiverged):
            adapt.run_job(params, Reporter(job_folder))
    else:
        assert adapt.run_job(params, Reporter(job_folder)) == {"version": "x@2"}
    assert not (job_folder / "work").exists()

"""Attribution (weight-change shares, parts undone), paired intervals and learning-rate choice of
the adaptation benchmark, on hand-made state_dicts and rows (no training)."""

from __future__ import annotations

import math

import pytest
import torch

from LymphNodeDGSTLib.adaptation.weight_attribution import change_shares, part_of, with_parts_reset
from LymphNodeDGSTLib.demo.bench_adapt.plan import chosen_learning_rates
from LymphNodeDGSTLib.demo.bench_adapt.tables import paired_table
from LymphNodeDGSTLib.demo.bench_paired import mean_interval, paired_differences


def tiny_state() -> dict[str, torch.Tensor]:
    conv = torch.zeros(2, 1, 3, 3, 3)
    return {"encoder.stages.0.0.convs.0.conv.weight": conv,
            "encoder.stages.0.0.convs.0.all_modules.0.weight": conv,          # alias, as in nnU-Net
            "encoder.stages.0.0.convs.0.norm.weight": torch.ones(2),
            "encoder.stages.0.0.convs.0.conv.bias": torch.zeros(2),
            "decoder.seg_layers.0.weight": torch.zeros(2, 2, 1, 1, 1),
            "decoder.seg_layers.0.bias": torch.zeros(2)}


def test_parts_shares_and_reset():
    """Known changes -> known shares; an alias counts once; undoing a part restores exactly it.

    Mutations caught: seg_layers weights counted as conv; aliases counted twice (conv share 8/11);
    a reset that leaves the part changed or touches another part.
    """
    foundation = tiny_state()
    adapted = {key: value.clone() for key, value in foundation.items()}
    conv = adapted["encoder.stages.0.0.convs.0.conv.weight"]
    conv[0, 0, 0, 0, 0] = 2.0                              # 4
    adapted["encoder.stages.0.0.convs.0.all_modules.0.weight"] = conv
    adapted["encoder.stages.0.0.convs.0.norm.weight"][0] = 3.0   # (3 - 1)^2 = 4
    adapted["encoder.stages.0.0.convs.0.conv.bias"][1] = 1.0     # 1
    adapted["decoder.seg_layers.0.weight"][0, 0] = 1.0           # 1
    assert part_of("decoder.seg_layers.0.weight", foundation["decoder.seg_layers.0.weight"]) == "head"
    shares = change_shares(foundation, adapted)
    assert shares == pytest.approx({"conv": 0.4, "norm": 0.4, "bias": 0.1, "head": 0.1})

    conv_undone = with_parts_reset(foundation, adapted, ["conv"])
    assert torch.equal(conv_undone["encoder.stages.0.0.convs.0.conv.weight"], foundation["encoder.stages.0.0.convs.0.conv.weight"])
    assert change_shares(foundation, conv_undone)["conv"] == 0.0
    assert conv_undone["encoder.stages.0.0.convs.0.norm.weight"][0] == 3.0
    rest_undone = with_parts_reset(foundation, adapted, ["norm", "bias", "head"])
    assert change_shares(foundation, rest_undone) == {"conv": 1.0, "norm": 0.0, "bias": 0.0, "head": 0.0}
    with pytest.raises(ValueError, match="unknown part"):
        with_parts_reset(foundation, adapted, ["lora"])


def row(method: str, seed: int, scores: list[float], site_a: float = 0.9, part: str = "phantom",
        lr: float | None = None) -> dict:
    target = "validation" if part == "tune" else "siteC"
    return {"part": part, "status": "ok", "method": method, "shots": 3 if method != "none" else 0,
            "seed": seed, "learning_rate": lr, "dice": {target: scores, "siteA": [site_a]},
            "dice_mean": {target: sum(scores) / len(scores), "siteA": site_a}}


def test_paired_differences_pair_the_same_seed_and_case():
    """Mutation caught: pairing across seeds, or averaging before differencing (n would be 2)."""
    rows = [row("dgst", 0, [0.5, 0.6]), row("dgst", 1, [0.7, 0.8]),
            row("norm", 0, [0.4, 0.6]), row("norm", 1, [0.6, 0.6]), row("norm", 2, [0.1, 0.1])]
    differences = paired_differences(rows, "phantom", "siteC", "dgst", "norm", 3)
    assert differences == pytest.approx([0.1, 0.0, 0.1, 0.2])
    mean, low, high = mean_interval(differences)
    assert mean == pytest.approx(0.1)
    # t(0.975, 3) = 3.182; sd = 0.0816
    assert (high - low) / 2 == pytest.approx(3.1824 * 0.08165 / 2, rel=1e-3)
    assert math.isnan(mean_interval([0.3])[1])


def test_paired_table_reports_intervals_and_site_a_kept():
    rows = [row("none", 0, [0.3, 0.3], site_a=0.8),
            row("dgst", 0, [0.5, 0.6], site_a=0.76), row("dgst", 1, [0.7, 0.8], site_a=0.76),
            row("norm", 0, [0.4, 0.6]), row("norm", 1, [0.6, 0.6])]
    table = paired_table(rows, "phantom", "siteC")
    line = next(line for line in table.splitlines() if line.startswith("| dgst | 3 |"))
    assert "| 4 | +0.100 [" in line and line.endswith("| 95.0 % |")


def test_learning_rate_is_chosen_on_validation_rows_only():
    """Mutation caught: choosing on test-phantom rows, or the worst rate."""
    rows = [row("dgst", 0, [0.5], part="tune", lr=1e-2), row("dgst", 0, [0.7], part="tune", lr=3e-2),
            row("norm", 0, [0.6], part="tune", lr=1e-2), row("norm", 0, [0.6], part="tune", lr=3e-2),
            {**row("norm", 0, [0.99]), "learning_rate": 1e-1}]
    assert chosen_learning_rates(rows) == {"dgst": 3e-2, "norm": 1e-2}

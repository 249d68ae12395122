"""The case-selection benchmark's bookkeeping (issue 17): who picks which cases, the paired
comparison against random draws, and what a resumed benchmark may change. No training here: the
fine-tunes themselves are the adaptation benchmark's code, tested in test_bench_adapt.py."""

from __future__ import annotations

import numpy as np
import pytest

from LymphNodeDGSTLib.demo.bench_adapt import same_settings
from LymphNodeDGSTLib.demo.bench_select import (
    EXTENSIBLE_SETTINGS,
    PHANTOM_TARGET,
    SelectConfig,
    bootstrap_interval,
    choose,
    summarise,
)

ORDER = ["c3", "c1", "c4", "c0", "c2"]                  # the ranking, most useful first
SCORES = {"c0": 0.4, "c1": 0.8, "c2": 0.05, "c3": 0.9, "c4": 0.02}


def test_each_strategy_picks_its_own_cases():
    # Catches: ranked taking the pool's order, lowest taking the ranking's tail (the diversity
    # order is not sorted by score), random draws that repeat or depend on the pool's order.
    assert choose("ranked", 2, ORDER, SCORES, 0, list(SCORES)) == ["c3", "c1"]
    assert choose("lowest", 2, ORDER, SCORES, 0, list(SCORES)) == ["c4", "c2"]
    pool = list(SCORES)
    draws = [choose("random", 3, [], {}, d, pool) for d in range(4)]
    assert all(len(set(d)) == 3 and set(d) <= set(pool) for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    assert choose("random", 3, [], {}, 2, list(reversed(pool))) == draws[2]


def test_resume_may_add_shots_and_draws_but_not_change_a_run():
    # Catches: a resume that mixes runs fine-tuned with other settings into one table.
    stored = {"config": {"pool": 20, "shots": [1, 3], "draws": 3, "iterations": 20, "crop_zyx": [32, 87, 87]}}
    more = {"config": dict(stored["config"], shots=[1, 3, 5], draws=5)}
    assert same_settings(stored, more, EXTENSIBLE_SETTINGS)
    assert not same_settings(stored, {"config": dict(stored["config"], iterations=40)}, EXTENSIBLE_SETTINGS)
    assert not same_settings(stored, {"config": dict(stored["config"], crop_zyx=None)}, EXTENSIBLE_SETTINGS)


def _row(strategy: str, k: int, draw: int, dice: list[float]) -> dict:
    return {"status": "ok", "strategy": strategy, "shots": k, "draw": draw, "train_cases": [f"{strategy}{draw}"],
            "dice": {PHANTOM_TARGET: dice}, "dice_mean": {PHANTOM_TARGET: float(np.mean(dice))},
            "run_id": f"select-{strategy}-k{k}-d{draw}"}


def test_ranked_is_compared_with_the_mean_of_the_random_draws_per_test_case():
    # Catches: comparing against one draw, against the best draw, or unpaired means; a goal
    # declared met with an interval that reaches below 0.
    rows = [_row("ranked", 1, 0, [0.8, 0.7, 0.9, 0.6]), _row("lowest", 1, 0, [0.3, 0.2, 0.4, 0.3]),
            _row("random", 1, 0, [0.7, 0.6, 0.8, 0.5]), _row("random", 1, 1, [0.5, 0.4, 0.6, 0.3]),
            _row("none", 0, 0, [0.5, 0.5, 0.5, 0.5])]
    config = SelectConfig(pool=5, shots=(1,), draws=2, site_b_tests=4)
    report = summarise(rows, config, ORDER, SCORES)
    line = report["table"][0]
    assert line["random_mean"] == pytest.approx(0.55)
    assert line["ranked"]["minus_random"] == pytest.approx(0.2)
    assert line["lowest"]["minus_random"] == pytest.approx(-0.25)
    low, high = line["ranked"]["ci_bootstrap"]
    assert 0 < low <= 0.2 <= high
    assert report["goal_met"] == {1: True}
    assert report["unadapted"] == pytest.approx(0.5)


def test_bootstrap_interval_spans_the_spread_of_the_random_draws():
    # Catches: an interval computed from the test cases alone, which ignores how much the random
    # draws differ from each other (here every test case's difference is exactly 0, so such an
    # interval would collapse to [0, 0]).
    draws = np.array([[0.8, 0.7, 0.9], [0.2, 0.1, 0.3], [0.5, 0.4, 0.6]])
    low, high = bootstrap_interval(draws[2], draws)
    assert low < -0.05 and high > 0.05

"""Paired differences and the hierarchical bootstrap on hand-made numbers with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from misp_dpo.eval.paired import aligned_correct, hierarchical_bootstrap, paired_difference


def _seed(correct: list[bool], prefix: str = "p") -> dict[str, bool]:
    return {f"{prefix}{i:04d}": c for i, c in enumerate(correct)}


def test_identical_arms_give_exactly_zero() -> None:
    rng = np.random.default_rng(1)
    seeds = [_seed(list(rng.random(300) < 0.7)) for _ in range(3)]
    diff = paired_difference(seeds, [dict(s) for s in seeds])
    assert (diff.mean, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert diff.signs == "000"
    assert not diff.excludes_zero


def test_constant_shift_excludes_zero() -> None:
    # the arm gets right exactly the 30 probes (of 100) the reference gets wrong, in every seed
    reference = [_seed([i >= 30 for i in range(100)]) for _ in range(3)]
    arm = [_seed([True] * 100) for _ in range(3)]
    diff = paired_difference(reference, arm)
    assert diff.mean == pytest.approx(0.30)
    assert diff.per_seed == pytest.approx((0.30, 0.30, 0.30))
    assert diff.signs == "+++"
    assert diff.excludes_zero
    assert 0.2 < diff.low < 0.30 < diff.high < 0.4


def test_every_value_equal_gives_a_point_interval() -> None:
    diff = hierarchical_bootstrap([np.full(50, -1.0), np.full(80, -1.0)])
    assert (diff.mean, diff.low, diff.high) == (-1.0, -1.0, -1.0)
    assert diff.signs == "--" and diff.excludes_zero


def test_mean_is_over_seeds_not_probes() -> None:
    # seed 0: 10 probes all +1; seed 1: 1000 probes all 0 -> mean of seed means 0.5 (not ~0.01)
    diff = hierarchical_bootstrap([np.ones(10), np.zeros(1000)], draws=4000)
    assert diff.mean == pytest.approx(0.5)
    assert diff.signs == "+0"
    # resampling seeds: a draw picks {0,0}, {0,1}/{1,0} or {1,1} -> 1, 0.5, 0: the interval spans [0, 1]
    assert diff.low == pytest.approx(0.0) and diff.high == pytest.approx(1.0)
    assert not diff.excludes_zero


def test_seeds_disagreeing_in_sign_keep_zero_inside() -> None:
    diff = hierarchical_bootstrap([np.full(200, 0.1), np.full(200, -0.1), np.full(200, 0.05)])
    assert diff.signs == "+-+"
    assert diff.low < 0 < diff.high


def test_interval_width_shrinks_with_more_probes() -> None:
    rng = np.random.default_rng(0)
    small = [rng.choice([-1.0, 0.0, 1.0], size=100) for _ in range(3)]
    large = [rng.choice([-1.0, 0.0, 1.0], size=10_000) for _ in range(3)]
    a, b = hierarchical_bootstrap(small), hierarchical_bootstrap(large)
    assert (b.high - b.low) < (a.high - a.low)


def test_alignment_uses_the_shared_ids() -> None:
    ref, arm = aligned_correct({"a": True, "b": False, "c": True}, {"c": False, "a": True, "z": True})
    assert ref.tolist() == [1.0, 1.0] and arm.tolist() == [1.0, 0.0]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([{"a": True}], [])
    with pytest.raises(ValueError, match="at least one"):
        hierarchical_bootstrap([np.array([])])

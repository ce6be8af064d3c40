"""bench/prior_gap.py's model of a consistent answerer on the world's own probes: a perfect one is
right everywhere, hiding costs the random split, and the gap never exceeds the bound it states."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def pg():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("prior_gap", BENCH / "prior_gap.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_a_model_that_sees_everything_is_always_right(pg) -> None:  # type: ignore[no-untyped-def]
    probes = pg.Probes(0.7, None, 60, seed=0)
    split, per_attribute = pg.accuracies(probes, ("color",), 0.0, {}, seed=0)
    assert split.tolist() == [1.0, 1.0, 1.0] and per_attribute.tolist() == [1.0] * 5


def test_hiding_costs_the_random_split_and_the_gap_stays_under_its_bound(pg) -> None:  # type: ignore[no-untyped-def]
    for heldout_prior in (None, 0.0):
        probes = pg.Probes(0.7, heldout_prior, 200, seed=1)
        for hidden in pg.HIDEABLE:
            for rate in (0.3, 1.0):
                split, per_attribute = pg.accuracies(probes, hidden, rate, {"shape": 0.1}, seed=2)
                gap = split[0] - split[2]
                assert gap <= 1 - split[0] + 1e-9  # a wrong belief costs a yes-question in every split
                assert per_attribute[pg.NAMES.index("color")] < 1.0
    # uniform held-out scenes break the prior more often: the fully colour-blind model errs more
    same, _ = pg.accuracies(pg.Probes(0.7, None, 200, seed=1), ("color",), 1.0, {}, seed=2)
    uniform, _ = pg.accuracies(pg.Probes(0.7, 0.0, 200, seed=1), ("color",), 1.0, {}, seed=2)
    assert uniform[0] < same[0] and uniform[0] - uniform[2] > same[0] - same[2] > 0


def test_saying_yes_to_the_prior_guess_costs_exactly_the_no_questions_asking_it(pg) -> None:  # type: ignore[no-untyped-def]
    probes = pg.Probes(0.7, None, 200, seed=1)
    split, per_attribute = pg.accuracies(probes, (), 0.0, {}, seed=2, prior_yes=1.0)
    asked_guess = probes.guessed[probes.image, probes.attribute, probes.asked]
    assert not asked_guess[probes.label].any()  # a guess is never the image's own value
    # a shape has two usual values, so every adversarial "no" about a colour, position or background
    # asks the one the image lacks (or one of two): 3 of the 5 attribute types
    adversarial_no = (probes.split == 2) & ~probes.label
    assert asked_guess[adversarial_no].mean() == pytest.approx(0.6)
    for s in range(len(pg.world.SPLITS)):  # every such no-question wrong, everything else right
        assert split[s] == pytest.approx(1 - asked_guess[probes.split == s].mean())
    assert per_attribute[pg.NAMES.index("size")] == 1.0  # size is not under the prior
    # its wrong yes costs no yes-question, so the consistent answerer's bound no longer holds
    assert split[0] - split[2] > 1 - split[0] > 0

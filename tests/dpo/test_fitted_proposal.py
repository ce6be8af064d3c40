"""`--proposal fitted`: q_phi fitted to the model's a_i beats uniform and the dataset's q (acceptance c)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from misp_dpo.dpo.sampling import (
    DEFENSIVE,
    FEATURES,
    FittedProposal,
    draw_pair,
    estimate_sum,
    relative_variance,
    restricted_proposal,
)


def planted(pairs: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fields (B, N, F) in FEATURES order, a (B, N)): mined-like fields and a_i a non-linear function
    of them plus noise, outside the fitted family (softmax of a linear function of the fields)."""
    rng = np.random.default_rng(seed)
    recon, dev = rng.gamma(2.0, 1.0, (pairs, n)), rng.gamma(2.0, 1.0, (pairs, n))
    sim = rng.uniform(0.3, 0.9, (pairs, n))
    score = recon / recon.max(1, keepdims=True) + dev / dev.max(1, keepdims=True)
    q = np.exp(score)
    q = 0.4 * q / q.sum(1, keepdims=True)  # the stored N hold 40% of their pool's q
    noise = rng.uniform(-1, 1, (pairs, n))
    fields = np.stack([q, score, recon, dev, sim, noise, np.zeros((pairs, n))], axis=2)
    a = 3.0 * np.tanh(2.0 * (score - 1.0)) + 32.0 * (sim - 0.6) ** 2 + 0.5 * rng.standard_normal((pairs, n))
    return fields, a


def test_fitted_variance_is_at_most_half_of_uniform_and_below_the_dataset() -> None:
    """Fitted on 64 held-out pairs, measured on 2000 others: the exact Var(S^)/S^2 at M = 1."""
    n = 8
    fit_fields, fit_a = planted(64, n, seed=0)
    fields, a = planted(2000, n, seed=1)
    counts, fit_counts = np.full(len(a), n), np.full(len(fit_a), n)
    fitted = FittedProposal.for_data(fit_fields, fit_counts)
    fitted.fit(fit_fields, fit_counts, fit_a)
    uniform = relative_variance(a, np.full(a.shape, 1.0 / n), counts).mean()
    dataset_q = np.stack([restricted_proposal(q, n, "dataset") for q in fields[..., 0]])
    dataset = relative_variance(a, dataset_q, counts).mean()
    fit = relative_variance(a, fitted.probabilities(fields, counts), counts).mean()
    assert fit <= 0.5 * uniform and fit < dataset, (fit, uniform, dataset)


def test_fitting_starts_at_the_dataset_proposal_and_keeps_every_negative_drawable() -> None:
    fields, a = planted(10, 5, seed=2)
    counts = np.array([5] * 9 + [3])
    fields[9, 3:] = np.nan
    fitted = FittedProposal.for_data(fields, counts)
    q = fitted.probabilities(fields, counts)
    dataset_q = np.stack([restricted_proposal(f, 5, "dataset") for f in fields[:9, :, 0]])
    np.testing.assert_allclose(q[:9], (1 - DEFENSIVE) * dataset_q + DEFENSIVE / 5, rtol=1e-9)
    assert np.isnan(q[9, 3:]).all() and q[9, :3].sum() == pytest.approx(1.0)
    fitted.fit(fields, counts, a)
    q = fitted.probabilities(fields, counts)
    assert (q[:9] >= DEFENSIVE / 5).all() and np.allclose(np.nansum(q, axis=1), 1.0)
    assert len(fitted.w) == len(FEATURES) and np.isfinite(fitted.w).all()


@pytest.mark.parametrize("m", [1, 2])
def test_the_estimate_stays_unbiased_under_the_fitted_proposal(m: int) -> None:
    fields, a = planted(4, 4, seed=3)
    counts = np.full(4, 4)
    fitted = FittedProposal.for_data(fields, counts)
    fitted.fit(fields, counts, a)
    q = fitted.probabilities(fields, counts)[0]
    expected = 0.0
    for draws in itertools.product(range(4), repeat=m):
        distinct, c = np.unique(draws, return_counts=True)
        expected += np.prod(q[list(draws)]) * estimate_sum(a[0], distinct, np.log(c / (m * q[distinct])))
    assert expected == pytest.approx(np.exp(a[0]).sum(), rel=1e-10)
    distinct, log_w = draw_pair(q, 4, m, "fitted", np.random.default_rng(0))
    np.testing.assert_allclose(np.exp(log_w) * m * q[distinct], np.round(np.exp(log_w) * m * q[distinct]))


@pytest.mark.slow
def test_training_with_the_fitted_proposal_refits_and_lowers_the_variance(
    negatives8: Path, tmp_path: Path
) -> None:
    from misp_dpo.dpo import trainer
    from misp_dpo.dpo.loop import LoopConfig, maybe_refit
    from misp_dpo.dpo.step import refit_proposal
    from tests.dpo.test_train_stage import _state

    loop = LoopConfig(
        max_steps=4, batch_size=2, lr=5e-3, sample_negatives=1, proposal="fitted", refit_every=2, fit_pairs=6
    )
    state = _state(negatives8, loop)
    records = trainer.run_training(state, tmp_path, show_progress=False)
    assert len(records) == 4 and all(np.isfinite(r["loss"]) for r in records)
    assert state.fitted is not None and np.isfinite(state.fitted.w).all()
    fresh = FittedProposal.for_data(state.data.fields[state.rows], state.data.counts[state.rows])
    before, after = refit_proposal(
        fresh,
        state.model,
        state.policy.device,
        state.encoder,
        state.data,
        state.reference,
        state.rows,
        state.loss.beta,
    )
    assert after.mean() <= before.mean() + 1e-9, (before, after)
    w = state.fitted.w.copy()
    maybe_refit(state, 5, state.rows[:2])  # not a refit step: q_phi is kept
    assert np.array_equal(w, state.fitted.w)


@pytest.mark.slow
def test_a_resumed_fitted_run_draws_what_an_uninterrupted_one_draws(
    negatives8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refits at steps 0 and 2, checkpoint at 3, crash in step 4: the resumed run restores the fit of
    step 2 from proposal_fits.jsonl and ends with the same metrics and fits."""
    from misp_dpo.dpo import trainer
    from misp_dpo.dpo.loop import LoopConfig
    from tests.dpo.test_train_stage import _state

    loop = LoopConfig(
        max_steps=5,
        batch_size=2,
        lr=5e-3,
        sample_negatives=1,
        proposal="fitted",
        refit_every=2,
        fit_pairs=4,
        checkpoint_every=3,
    )
    whole = trainer.run_training(_state(negatives8, loop), tmp_path / "whole", show_progress=False)
    real_step, calls = trainer.optimizer_step, {"n": 0}

    def crash_in_step_four(*args: object, **kwargs: object) -> float:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer, "optimizer_step", crash_in_step_four)
    with pytest.raises(KeyboardInterrupt):
        trainer.run_training(_state(negatives8, loop), tmp_path / "resumed", show_progress=False)
    monkeypatch.setattr(trainer, "optimizer_step", real_step)
    trainer.run_training(_state(negatives8, loop), tmp_path / "resumed", show_progress=False)
    for name in ("metrics.jsonl", "proposal_fits.jsonl"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "resumed" / name).read_text(), name
    fits = (tmp_path / "whole" / "proposal_fits.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in fits] == [0, 2, 4] and len(whole) == 5

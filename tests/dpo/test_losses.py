"""The MISP-DPO loss terms against independent computations (acceptance a)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from misp_dpo.dpo.losses import LossConfig, image_loss, pair_stats, preference_loss, text_loss

F64 = torch.float64


def t(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _rng_tensor(*shape: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).normal(scale=scale, size=shape))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_one_negative_is_sigmoid_dpo(beta: float) -> None:
    h_pos, h_neg = _rng_tensor(64, seed=1), _rng_tensor(64, 1, seed=2)
    expected = -torch.nn.functional.logsigmoid(beta * (h_pos - h_neg[:, 0]))
    # an independent float64 formula: log(1 + exp(-x)) computed stably by numpy
    x = (beta * (h_pos - h_neg[:, 0])).numpy()
    independent = np.logaddexp(0.0, -x)
    got = image_loss(h_pos, h_neg, beta)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert np.allclose(got.numpy(), independent, atol=1e-6, rtol=0)


def test_many_negatives_match_log_one_plus_sum_exp() -> None:
    beta = 0.5
    h_pos, h_neg = _rng_tensor(16, seed=3), _rng_tensor(16, 5, seed=4)
    a = beta * (h_neg - h_pos[:, None]).numpy()
    expected = np.log1p(np.exp(a).sum(axis=1))
    assert np.allclose(image_loss(h_pos, h_neg, beta).numpy(), expected, atol=1e-9)


def test_stable_at_extreme_rewards() -> None:
    h_pos = t([0.0, 500.0, -500.0])
    h_neg = t([[4000.0, 0.0], [-4000.0, 0.0], [0.0, 100.0]])
    got = image_loss(h_pos, h_neg, beta=1.0)
    assert torch.isfinite(got).all()
    # log(1 + e^4000 + 1) ~ 4000; log(1 + tiny) ~ 0; log(1 + e^500 + e^600) ~ 600
    assert torch.allclose(got, t([4000.0, 0.0, 600.0]), atol=1e-6)


def test_invariant_to_negative_order() -> None:
    h_pos, h_neg = _rng_tensor(8, seed=5), _rng_tensor(8, 6, seed=6)
    log_w = _rng_tensor(8, 6, scale=0.5, seed=7)
    log_w[:, -1] = -torch.inf  # a padded slot stays padded wherever it moves
    perm = torch.as_tensor(np.random.default_rng(8).permutation(6))
    cfg = LossConfig()
    rejected, has = _rng_tensor(8, seed=9), torch.ones(8, dtype=torch.bool)
    a = preference_loss(cfg, h_pos, h_neg, log_w, rejected, has).total
    b = preference_loss(cfg, h_pos, h_neg[:, perm], log_w[:, perm], rejected, has).total
    assert torch.allclose(a, b, atol=1e-12)
    sa, sb = pair_stats(h_pos, h_neg, log_w, 0.5), pair_stats(h_pos, h_neg[:, perm], log_w[:, perm], 0.5)
    assert all(torch.allclose(x, y) for x, y in zip(sa, sb, strict=True))


def test_padding_is_ignored() -> None:
    h_pos, h_neg = _rng_tensor(4, seed=10), _rng_tensor(4, 3, seed=11)
    padded = torch.cat([h_neg, torch.full((4, 2), 1e6, dtype=F64)], dim=1)
    log_w = torch.cat([torch.zeros(4, 3, dtype=F64), torch.full((4, 2), -torch.inf, dtype=F64)], dim=1)
    assert torch.allclose(image_loss(h_pos, padded, 0.5, log_w), image_loss(h_pos, h_neg, 0.5), atol=1e-12)


def test_gradients_match_finite_differences() -> None:
    cfg = LossConfig(beta=0.7, text_weight=0.5, anchor_weight=0.3)
    h_pos = _rng_tensor(3, scale=1.0, seed=12).requires_grad_()
    h_neg = _rng_tensor(3, 4, scale=1.0, seed=13).requires_grad_()
    h_rej = _rng_tensor(3, scale=1.0, seed=14).requires_grad_()
    log_w = _rng_tensor(3, 4, scale=0.3, seed=15)
    has = torch.tensor([True, False, True])

    def total(p: torch.Tensor, n: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return preference_loss(cfg, p, n, log_w, r, has).total

    assert torch.autograd.gradcheck(total, (h_pos, h_neg, h_rej), eps=1e-6, atol=1e-7)


def test_text_and_anchor_terms() -> None:
    cfg = LossConfig(beta=0.5, image_weight=0.0, text_weight=1.0, anchor_weight=2.0)
    h_pos, h_rej = t([1.0, -2.0]), t([0.0, 3.0])
    terms = preference_loss(
        cfg,
        h_pos,
        torch.zeros(2, 1, dtype=F64),
        torch.zeros(2, 1, dtype=F64),
        h_rej,
        torch.tensor([True, False]),
    )
    assert torch.allclose(terms.text, t([np.log1p(np.exp(-0.5)), 0.0]))
    assert torch.allclose(terms.anchor, t([np.log1p(np.exp(-0.5)), np.log1p(np.exp(1.0))]))
    assert torch.allclose(terms.total, terms.text + 2.0 * terms.anchor)
    assert torch.allclose(text_loss(h_pos, h_rej, 0.5)[0], terms.text[0])


def test_pair_stats_by_hand() -> None:
    h_pos = t([1.0, 0.0])
    h_neg = t([[0.5, -1.0], [2.0, 0.0]])
    log_w = t([[0.0, 0.0], [0.0, -torch.inf]])
    stats = pair_stats(h_pos, h_neg, log_w, beta=1.0)
    assert stats.correct.tolist() == [1.0, 0.0]
    assert torch.allclose(stats.margin, t([0.5, -2.0]))
    p = torch.softmax(t([0.5, -1.0]), 0)
    assert torch.allclose(stats.effective_negatives, torch.stack([torch.exp(-(p * p.log()).sum()), t(1.0)]))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="beta"):
        LossConfig(beta=0.0)
    with pytest.raises(ValueError, match="anchor_weight"):
        LossConfig(image_weight=0.0, text_weight=0.0)

"""The four selection strategies, one code path (DESIGN §6): each is a score s and a diversity space.

| strategy | s_i (the `score` field)         | diversity features f_i   | beta_div   | `proposal` q_i     |
|----------|---------------------------------|--------------------------|------------|--------------------|
| misp     | w_l l_i/max l + w_v v_i/max v   | SAE code z_i             | --beta-div | softmax(s_i / tau) |
| maxmin   | sim_image (cosine to positive)  | v(m_c) - v(m_p) (CLIP)   | --beta-div | softmax(s_i / tau) |
| nearest  | sim_image                       | v(m_c) - v(m_p), unused  | 0          | softmax(s_i / tau) |
| random   | null (seeded uniform keys rank) | v(m_c) - v(m_p), unused  | 0          | 1 / pool size      |

With `relevance` > 0 [ours], misp's s_i also adds relevance x sim_image min-max normalised over
the pool (`misp_dpo.mining.scores.misp_score`).
`diversity_gain` is always min_{j in S}(1 - cos(f_i, f_j)) at pick time in the strategy's own
space (0 for the first pick), so it is recorded even where beta_div = 0 does not use it.
`recon_error` (l_i) and `deviation` (v_i) come from the SAE whenever one is given, for every
strategy, so datasets mined with different strategies can be compared on the same SAE; without
an SAE they are null. q is over the pair's whole filtered pool, so it sums to 1 there, not over
the N picks; the trainer's importance weights use it as q_phi.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from misp_dpo.mining.scores import PoolCodes, deviation, misp_score, softmax_proposal, uniform_proposal
from misp_dpo.mining.selection import greedy_select, uniform_keys

Strategy = Literal["misp", "nearest", "maxmin", "random"]
STRATEGIES: tuple[str, ...] = ("misp", "nearest", "maxmin", "random")
NEEDS_SAE = ("misp",)


@dataclass(frozen=True)
class SelectionParams:
    strategy: Strategy = "misp"
    negatives: int = 3
    weights: tuple[float, float] = (1.0, 1.0)  # (w_l, w_v)
    beta_div: float = 1.0
    tau: float = 1.0
    relevance: float = 0.0  # weight of the pool-normalised similarity to the positive in s [ours]


class Pools(NamedTuple):
    """P pairs' pools as (P, K[, D]) blocks; padding has mask False."""

    positive: np.ndarray  # (P, D) v(m_p)
    candidates: np.ndarray  # (P, K, D) v(m_c)
    mask: np.ndarray  # (P, K) bool
    sim_image: np.ndarray  # (P, K)
    sim_prompt: np.ndarray  # (P, K)
    seeds: np.ndarray | None = None  # (P,) uint64 per-pair seeds; `random` needs them


class Mined(NamedTuple):
    """The selection of P pairs: pool indices in pick order and every per-negative field, (P, N)."""

    picks: np.ndarray  # int64, -1 where the pool ran out
    sim_image: np.ndarray
    sim_prompt: np.ndarray
    recon_error: np.ndarray | None  # None without an SAE
    deviation: np.ndarray | None
    diversity_gain: np.ndarray
    score: np.ndarray | None  # None for `random`
    proposal: np.ndarray
    pool_proposal: np.ndarray  # (P, K): q over the whole pool
    invalid: np.ndarray  # (P,) bool: non-finite inputs; such pairs get no picks

    @property
    def counts(self) -> np.ndarray:
        return (self.picks >= 0).sum(axis=1)


def _invalid(mask: np.ndarray, *blocks: np.ndarray) -> np.ndarray:
    """Pairs with a non-finite value anywhere in their pool (a NaN embedding, a diverging SAE)."""
    bad = np.zeros(mask.shape[0], dtype=bool)
    for block in blocks:
        finite = np.isfinite(block) if block.ndim == 2 else np.isfinite(block).all(axis=2)
        bad |= (mask & ~finite).any(axis=1)
    return bad


def _strategy_inputs(
    pools: Pools, params: SelectionParams, sae: PoolCodes | None, v: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, float]:
    """(score, ranking key, diversity features, beta_div) of the strategy."""
    if params.strategy == "misp":
        if sae is None or v is None:
            raise ValueError("strategy misp needs SAE codes")
        s = misp_score(sae.recon_error, v, pools.mask, params.weights, params.relevance, pools.sim_image)
        return s, s, sae.codes, params.beta_div
    clip_difference = pools.candidates - pools.positive[:, None, :]
    s = pools.sim_image.astype(np.float64)
    if params.strategy == "maxmin":
        return s, s, clip_difference, params.beta_div
    if params.strategy == "nearest":
        return s, s, clip_difference, 0.0
    if pools.seeds is None:
        raise ValueError("strategy random needs per-pair seeds")
    return None, uniform_keys(pools.seeds, pools.mask.shape[1]), clip_difference, 0.0


def select_negatives(pools: Pools, params: SelectionParams, sae: PoolCodes | None = None) -> Mined:
    """Score every pool, pick `params.negatives` per pair, and gather the per-negative fields."""
    v = deviation(sae.codes) if sae is not None else None
    score, key, features, beta = _strategy_inputs(pools, params, sae, v)
    checked = [pools.sim_image, features] + (
        [sae.recon_error, v] if sae is not None and v is not None else []
    )
    invalid = _invalid(pools.mask, *checked)
    mask = pools.mask & ~invalid[:, None]
    key = np.where(mask, np.nan_to_num(key), 0.0)
    # Non-finite features stay in invalid pairs' own rows of the batched products, where nothing is
    # available to pick, so they need no (P, K, F) cleaning copy.
    selection = greedy_select(key, features, mask, params.negatives, beta)
    if score is None:
        q = uniform_proposal(mask)
    else:
        q = softmax_proposal(np.nan_to_num(score), mask, params.tau)
    picks = selection.picks
    index, valid = np.maximum(picks, 0), picks >= 0

    def gather(block: np.ndarray | None) -> np.ndarray | None:
        if block is None:
            return None
        return np.where(valid, np.take_along_axis(block, index, axis=1), 0.0).astype(np.float32)

    return Mined(
        picks=picks,
        sim_image=gather(pools.sim_image),  # type: ignore[arg-type]
        sim_prompt=gather(pools.sim_prompt),  # type: ignore[arg-type]
        recon_error=gather(sae.recon_error if sae is not None else None),
        deviation=gather(v),
        diversity_gain=selection.diversity_gain,
        score=gather(score),
        proposal=gather(q),  # type: ignore[arg-type]
        pool_proposal=q,
        invalid=invalid,
    )

"""The selection strategies, one code path (docs/method.md): each is a ranking key, a diversity space and q.

| strategy       | s_i (`score` field)            | diversity f_i           | beta_div   | `proposal` q_i    |
|----------------|--------------------------------|-------------------------|------------|-------------------|
| misp           | w_l l_i/max l + w_v v_i/max v  | SAE code z_i            | --beta-div | softmax(s_i/tau)  |
| maxmin         | sim_image (cosine to positive) | v(m_c) - v(m_p) (CLIP)  | --beta-div | softmax(s_i/tau)  |
| nearest        | sim_image                      | v(m_c) - v(m_p), unused | 0          | softmax(s_i/tau)  |
| random         | null (seeded uniform keys)     | v(m_c) - v(m_p), unused | 0          | 1 / pool size     |
| topm           | null (uniform keys, top M)     | v(m_c) - v(m_p), unused | 0          | 1/M on the top M  |
| nearest-random | null (k nearest, then uniform) | v(m_c) - v(m_p), unused | 0          | 1 / pool size     |

`topm` draws N uniformly from the M candidates most similar to the positive (`--top-m`);
`nearest-random` takes the k most similar (`--nearest-count`) and fills the rest with a uniform draw
from the remaining filtered pool. Both are baselines of the frontier benchmark (bench/quality.py):
they move along the hardness axis without any SAE.

With `relevance` > 0 [ours], misp's s_i also adds relevance x sim_image min-max normalised over
the pool (`misp_dpo.mining.scores.misp_score`). `diversity` chooses the greedy's bonus
(`misp_dpo.mining.selection`): `min-cosine` is the paper's min_{j in S}(1 - cos(f_i, f_j));
`latent-coverage` [ours] is the gain in weighted coverage of the SAE latents the picks change.
`diversity_gain` is always that bonus at pick time in the strategy's own space (0 for the first
pick), so it is recorded even where beta_div = 0 does not use it.
`recon_error` (l_i) and `deviation` (v_i) come from the SAE whenever one is given, for every
strategy, so datasets mined with different strategies can be compared on the same SAE; without
an SAE they are null. q is over the pair's whole filtered pool, so it sums to 1 there, not over
the N picks; the trainer's importance weights use it as q_phi.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from misp_dpo.config import option
from misp_dpo.mining.scores import PoolCodes, deviation, misp_score, softmax_proposal, uniform_proposal
from misp_dpo.mining.selection import Diversity, greedy_select, uniform_keys

Strategy = Literal["misp", "nearest", "maxmin", "random", "topm", "nearest-random"]
STRATEGIES: tuple[str, ...] = ("misp", "nearest", "maxmin", "random", "topm", "nearest-random")
NEEDS_SAE = ("misp",)
NEEDS_SEEDS = ("random", "topm", "nearest-random")
# Knobs only some strategies read: any other strategy refuses a non-default value (it would be ignored).
USED_BY: dict[str, tuple[str, ...]] = {
    "weights": ("misp",),
    "relevance": ("misp",),
    "diversity": ("misp", "maxmin"),  # maxmin's "latents" are the CLIP difference's dimensions
    "latent_top": ("misp",),
    "top_m": ("topm",),
    "nearest_count": ("nearest-random",),
}
# The paper's exact settings (`--preset paper`; the SAE must be the `paper` variant).
PAPER: dict[str, Any] = {
    "strategy": "misp",
    "weights": (1.0, 1.0),
    "beta_div": 1.0,
    "relevance": 0.0,
    "diversity": "min-cosine",
}


@dataclass(frozen=True)
class SelectionParams:
    """How `select_negatives` scores and picks (the `mine` stage nests it)."""

    strategy: Strategy = option(
        "misp",
        "misp: SAE scores + greedy diversity (the paper); maxmin: the same greedy on raw CLIP differences; "
        "nearest: the N most similar to the positive; random: N uniform draws (seeded per pair); "
        "topm: N uniform from the --top-m most similar; nearest-random: the --nearest-count most "
        "similar, the rest uniform",
    )
    negatives: int = option(3, "N: negatives picked per pair (the paper's best is 3)")
    weights: tuple[float, ...] = option(
        (1.0, 1.0), "w_l,w_v: weights of the normalised l_i and v_i in s_i (misp)"
    )
    beta_div: float = option(
        4.0,
        "weight of the diversity bonus in the greedy pick (misp, maxmin); 4 from bench/quality.py, the "
        "paper uses 1",
    )
    tau: float = option(1.0, "temperature of the proposal q_i = softmax over the pool of s_i / tau")
    relevance: float = option(
        1.0,
        "[ours] weight of the similarity to the positive (min-max normalised over the pool) added to "
        "s_i: pulls picks towards harder negatives; 1 from bench/downstream.py; 0 is the paper's (misp)",
    )
    # (the settings below came after datasets were mined: at their defaults they leave the config
    # hash of those outputs as it was, so they still resume)
    diversity: Diversity = option(
        "min-cosine",
        "the greedy's diversity bonus: min-cosine, min_j (1 - cos(f_i, f_j)) (the paper); "
        "latent-coverage [ours], the gain in weighted coverage of the SAE latents the picks change",
        hashed="unless-default",
    )
    latent_top: int = option(
        8, "latent-coverage: latents kept per candidate (its strongest changes)", hashed="unless-default"
    )
    top_m: int = option(
        48, "topm: M, the size of the most-similar slice the N are drawn from", hashed="unless-default"
    )
    nearest_count: int = option(
        1, "nearest-random: k, negatives taken as the k most similar", hashed="unless-default"
    )
    preset: Literal["none", "paper"] = option(
        "none",
        "paper: the paper's exact selection (misp, w 1,1, beta_div 1, relevance 0, min-cosine diversity; "
        "needs a `paper` SAE); settings that contradict it are refused",
        hashed="unless-default",
    )

    def __post_init__(self) -> None:
        if self.preset == "paper":
            self._apply_paper()
        if self.negatives < 1:
            raise ValueError(f"negatives must be at least 1, got {self.negatives}")
        weights_off = sum(self.weights) <= 0 and self.relevance <= 0
        if len(self.weights) != 2 or min(self.weights) < 0 or weights_off:
            raise ValueError(
                f"weights must be two non-negative numbers w_l,w_v, not both 0 unless --relevance > 0; "
                f"got {self.weights}"
            )
        low = {"beta_div": self.beta_div, "relevance": self.relevance, "nearest_count": self.nearest_count}
        negative = {k: v for k, v in low.items() if v < 0}
        if negative:
            raise ValueError(f"must be non-negative: {negative}")
        if self.tau <= 0 or self.top_m < 1 or self.latent_top < 1:
            raise ValueError(
                f"tau must be positive and top_m, latent_top at least 1; got {self.tau}, {self.top_m}, "
                f"{self.latent_top}"
            )
        if self.strategy == "topm" and self.top_m < self.negatives:
            raise ValueError(f"top_m ({self.top_m}) must be at least negatives ({self.negatives})")
        for name, users in USED_BY.items():
            if self.strategy not in users and getattr(self, name) != _DEFAULTS[name]:
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag} {_shown(getattr(self, name))} is only used by --strategy {'|'.join(users)}; "
                    f"drop it for --strategy {self.strategy}"
                )

    def _apply_paper(self) -> None:
        """Set the paper's values; a value that is neither the default nor the paper's is refused."""
        for name, value in PAPER.items():
            current = getattr(self, name)
            if current not in (value, _DEFAULTS[name]):
                raise ValueError(
                    f"--preset paper sets --{name.replace('_', '-')} {_shown(value)}; "
                    f"drop --{name.replace('_', '-')} {_shown(current)} or the preset"
                )
            object.__setattr__(self, name, value)


def check_sae_variant(params: SelectionParams, variant: str | None) -> None:
    """`--preset paper` scores with the paper's fused-difference SAE; refuse any other (one line)."""
    if params.preset == "paper" and variant != "paper":
        raise ValueError(
            f"--preset paper needs an SAE trained with --variant paper; --sae holds {variant or 'none'}"
        )


def _shown(value: object) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(SelectionParams)}


class SelectionPools(NamedTuple):
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
    pools: SelectionPools, params: SelectionParams, sae: PoolCodes | None, v: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, float, np.ndarray]:
    """(score, ranking key, diversity features, beta_div, pickable mask) of the strategy."""
    if params.strategy == "misp":
        if sae is None or v is None:
            raise ValueError("strategy misp needs SAE codes")
        w_l, w_v = params.weights
        s = misp_score(sae.recon_error, v, pools.mask, (w_l, w_v), params.relevance, pools.sim_image)
        return s, s, sae.codes, params.beta_div, pools.mask
    clip_difference = pools.candidates - pools.positive[:, None, :]
    s = pools.sim_image.astype(np.float64)
    if params.strategy == "maxmin":
        return s, s, clip_difference, params.beta_div, pools.mask
    if params.strategy == "nearest":
        return s, s, clip_difference, 0.0, pools.mask
    if pools.seeds is None:
        raise ValueError(f"strategy {params.strategy} needs per-pair seeds")
    keys = uniform_keys(pools.seeds, pools.mask.shape[1])
    if params.strategy == "random":
        return None, keys, clip_difference, 0.0, pools.mask
    rank = similarity_rank(s, pools.mask)
    if params.strategy == "topm":  # uniform keys, but only the M most similar can be picked
        return None, keys, clip_difference, 0.0, pools.mask & (rank < params.top_m)
    # nearest-random: the k most similar rank above every uniform key (keys are < 1), in order
    nearest = rank < params.nearest_count
    return None, np.where(nearest, 2.0 + s, keys), clip_difference, 0.0, pools.mask


def similarity_rank(sim: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(P, K) rank of each candidate by similarity to the positive within its pool (0 = most
    similar; ties to the lower pool index); padding ranks last."""
    order = np.argsort(np.where(mask, -np.nan_to_num(sim), np.inf), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(sim.shape[1])[None, :].repeat(len(sim), 0), axis=1)
    return np.asarray(rank)


def select_negatives(pools: SelectionPools, params: SelectionParams, sae: PoolCodes | None = None) -> Mined:
    """Score every pool, pick `params.negatives` per pair, and gather the per-negative fields."""
    v = deviation(sae.codes) if sae is not None else None
    score, key, features, beta, pickable = _strategy_inputs(pools, params, sae, v)
    checked = [pools.sim_image, features] + (
        [sae.recon_error, v] if sae is not None and v is not None else []
    )
    invalid = _invalid(pools.mask, *checked)
    mask = pools.mask & ~invalid[:, None]
    pickable = pickable & mask
    key = np.where(mask, np.nan_to_num(key), 0.0)
    # Non-finite features stay in invalid pairs' own rows of the batched products, where nothing is
    # available to pick, so they need no (P, K, F) cleaning copy.
    selection = greedy_select(
        key, features, pickable, params.negatives, beta, params.diversity, params.latent_top
    )
    if score is None:
        q = uniform_proposal(pickable)
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

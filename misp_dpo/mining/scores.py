"""The MISP scores of a candidate pool (docs/method.md §3) and the proposal distribution q.

Arrays are (P, K) blocks: P pairs, each with a pool padded to K candidates, `mask` False on padding.
Every reduction over "the pool" is a masked reduction over axis 1, so padding never wins a max
and never takes probability mass.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np


class PoolCodes(NamedTuple):
    """What an SAE says about each (pair, candidate) difference."""

    codes: np.ndarray  # (P, K, L) float32: z_i, the latent code of the difference
    recon_error: np.ndarray  # (P, K) float32: l_i = ||d_i - d_hat_i||^2


class PoolEncoder(Protocol):
    """The part of `misp_dpo.sae.DifferenceEncoder` that mining uses (so tests can stand one in)."""

    variant: str
    latents: int
    clip: dict[str, Any]

    def encode_pools(
        self, positive: np.ndarray, candidates: np.ndarray, prompt: np.ndarray, mask: np.ndarray
    ) -> PoolCodes: ...


def as_numpy(values: object) -> np.ndarray:
    """float32 numpy from a numpy array or a (possibly CUDA) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def encode(
    encoder: PoolEncoder, positive: np.ndarray, candidates: np.ndarray, prompt: np.ndarray, mask: np.ndarray
) -> PoolCodes:
    """Run the SAE on a pool block and zero its outputs on padding, whatever the encoder left there."""
    out = encoder.encode_pools(positive, candidates, prompt, mask)
    codes, recon = as_numpy(out.codes), as_numpy(out.recon_error)
    if not codes.flags.writeable:
        codes = codes.copy()
    codes[~mask] = 0.0  # in place: at (P, K, L) = 256 x 64 x 4096 a copy is 268 MB
    return PoolCodes(codes=codes, recon_error=np.where(mask, recon, 0.0).astype(np.float32))


def deviation(codes: np.ndarray) -> np.ndarray:
    """v_i = ||z_i||_1: how strongly the difference activates the SAE's semantic factors."""
    return np.abs(codes).sum(axis=2, dtype=np.float64).astype(np.float32)


def pool_max_normalised(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """values / max over the pair's pool; 0 for a pool whose max is not positive (nothing to rank)."""
    top = np.where(mask, values, -np.inf).max(axis=1, keepdims=True, initial=-np.inf)
    scale = np.where(top > 0, top, 1.0)
    return np.where(mask & (top > 0), values / scale, 0.0)


def pool_min_max_normalised(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(values - min) / (max - min) over the pair's pool, in [0, 1]; 0 where the pool is flat."""
    low = np.where(mask, values, np.inf).min(axis=1, keepdims=True, initial=np.inf)
    high = np.where(mask, values, -np.inf).max(axis=1, keepdims=True, initial=-np.inf)
    spread = high - low
    ok = mask & np.isfinite(spread) & (spread > 0)
    return np.where(ok, (values - np.where(ok, low, 0.0)) / np.where(ok, spread, 1.0), 0.0)


def misp_score(
    recon_error: np.ndarray,
    deviation: np.ndarray,
    mask: np.ndarray,
    weights: tuple[float, float],
    relevance: float = 0.0,
    sim_image: np.ndarray | None = None,
) -> np.ndarray:
    """s_i = w_l * l_i / max_pool l + w_v * v_i / max_pool v (the paper's equal weights by default),
    plus `relevance` times the candidate's similarity to the positive, min-max normalised over the
    pool [ours]. Both paper terms grow with how far a difference is from the typical one, so on their
    own they favour candidates that change many things; the relevance term pulls the picks back
    towards the positive (harder negatives) at a chosen rate. 0 gives the paper's score."""
    w_l, w_v = weights
    s = w_l * pool_max_normalised(recon_error.astype(np.float64), mask)
    s = s + w_v * pool_max_normalised(deviation.astype(np.float64), mask)
    if relevance:
        if sim_image is None:
            raise ValueError("a relevance weight needs the candidates' sim_image")
        s = s + relevance * pool_min_max_normalised(sim_image.astype(np.float64), mask)
    return np.where(mask, s, 0.0)


def softmax_proposal(score: np.ndarray, mask: np.ndarray, tau: float) -> np.ndarray:
    """q_i = softmax over the pool of s_i / tau (ours: the paper's learnable q_phi is not specified).

    Rows sum to 1 over their pool; padding and empty pools get 0.
    """
    logits = np.where(mask, score.astype(np.float64) / tau, -np.inf)
    top = logits.max(axis=1, keepdims=True, initial=-np.inf)
    weights = np.where(mask, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    return weights / np.where(total > 0, total, 1.0)


def uniform_proposal(mask: np.ndarray) -> np.ndarray:
    """q_i = 1 / |pool|: the distribution the `random` strategy draws from."""
    size = mask.sum(axis=1, keepdims=True)
    return np.where(mask, 1.0 / np.maximum(size, 1), 0.0)

"""Seeded embeddings + candidates folders and in-memory pool datasets for the SAE tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from misp_dpo.pipelines.manifest import Manifest
from misp_dpo.sae.data import Dataset, PoolChunk, in_memory
from tests.helpers import clustered_unit_vectors, write_candidates, write_embeddings


def pool_arrays(
    pairs: int = 40, images: int = 80, dim: int = 8, width: int = 9, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images, pair image rows, prompts, pools): pools of 3..width nearest images, -1 padded."""
    rng = np.random.default_rng(seed)
    vectors, _ = clustered_unit_vectors(images, dim, 5, 0.4, rng)
    pair_rows = rng.integers(0, images, size=pairs)
    prompts, _ = clustered_unit_vectors(pairs, dim, 4, 0.3, rng)
    pools = np.full((pairs, width), -1)
    for p in range(pairs):
        size = 3 + p % (width - 2)
        sims = vectors @ vectors[pair_rows[p]]
        sims[pair_rows[p]] = -np.inf
        pools[p, :size] = np.argsort(-sims, kind="stable")[:size]
    return vectors, pair_rows, prompts, pools


def pool_dataset(seed: int = 0, **sizes: int) -> Dataset:
    vectors, pair_rows, prompts, pools = pool_arrays(seed=seed, **sizes)
    chunk = PoolChunk(vectors[pair_rows].astype(np.float16), prompts.astype(np.float16), pools)
    return in_memory(chunk, np.arange(len(pools)) % 5 == 0, vectors.astype(np.float16))


def write_inputs(root: Path, seed: int = 0, tasks: int = 2, **sizes: int) -> tuple[Manifest, Manifest]:
    """An embeddings folder and a candidates folder made from it (the sae stage's inputs)."""
    vectors, pair_rows, prompts, pools = pool_arrays(seed=seed, **sizes)
    embeddings = write_embeddings(root / "emb", vectors, pair_rows, prompts, prompts, tasks=tasks)
    candidates = write_candidates(root / "cand", embeddings, pools, vectors, tasks=tasks)
    return embeddings, candidates

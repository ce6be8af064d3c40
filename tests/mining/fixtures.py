"""Seeded embeddings + candidates folders for the mine and report stage tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from misp_dpo.pipelines.manifest import Manifest
from tests.helpers import (
    clustered_unit_vectors,
    write_candidates,
    write_embeddings,
    write_random_sae,
)


@dataclass
class MineInputs:
    embeddings: Manifest
    candidates: Manifest
    sae: Path
    images: np.ndarray
    pair_rows: np.ndarray
    pools: np.ndarray  # (P, K) image rows, -1 padding


def build_inputs(
    root: Path, pairs: int = 24, images: int = 60, dim: int = 8, uris: pa.Array | None = None, seed: int = 0
) -> MineInputs:
    """Pools of 2..9 candidates; pair 0's pool holds its own positive and a repeated image."""
    rng = np.random.default_rng(seed)
    vectors, _ = clustered_unit_vectors(images, dim, 5, 0.35, rng)
    pair_rows = rng.integers(0, images, size=pairs)
    prompts, _ = clustered_unit_vectors(pairs, dim, 3, 0.3, rng)
    embeddings = write_embeddings(root / "emb", vectors, pair_rows, prompts, prompts, tasks=2, uris=uris)
    pools = np.full((pairs, 9), -1)
    for p in range(pairs):
        size = 2 + p % 8
        pools[p, :size] = rng.choice(np.delete(np.arange(images), pair_rows[p]), size, replace=False)
    c = rng.choice(np.delete(np.arange(images), pair_rows[0]), 4, replace=False)
    pools[0] = [c[0], pair_rows[0], c[0], c[1], c[2], c[3], -1, -1, -1]
    candidates = write_candidates(root / "cand", embeddings, pools, vectors, tasks=3)
    sae = write_random_sae(root / "sae", embeddings.meta["clip"])
    return MineInputs(embeddings, candidates, sae, vectors, pair_rows, pools)

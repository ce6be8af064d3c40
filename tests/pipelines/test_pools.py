from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from misp_dpo.errors import UserError
from misp_dpo.pipelines.embeddings import ImageStore
from misp_dpo.pipelines.pools import iter_pools
from tests.helpers import clustered_unit_vectors, write_candidates, write_embeddings


def test_pool_batches_gather_the_right_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, _ = clustered_unit_vectors(40, 6, 3, 0.3, rng)
    pair_rows = rng.integers(0, 40, size=11)
    prompts, _ = clustered_unit_vectors(11, 6, 2, 0.3, rng)
    embeddings = write_embeddings(tmp_path / "emb", images, pair_rows, prompts, prompts, tasks=2)
    pools = np.full((11, 5), -1)
    for p in range(11):
        size = 2 + p % 4
        pools[p, :size] = rng.choice(np.delete(np.arange(40), pair_rows[p]), size, replace=False)
    candidates = write_candidates(tmp_path / "cand", embeddings, pools, images, tasks=3)
    store = ImageStore.load(embeddings)
    batches = list(iter_pools(candidates, embeddings, store, 2, 11, batch_size=4))
    assert all(len(b) <= 4 for b in batches)
    seen = [pid for b in batches for pid in b.pairs.column("pair_id").to_pylist()]
    assert seen == [f"pair-{i:07d}" for i in range(2, 11)]
    first = next(b for b in batches if len(b) >= 2)
    offset, n = int(first.pairs.column("pair_id")[0].as_py()[5:]), len(first)
    np.testing.assert_allclose(first.positive, images[pair_rows[offset : offset + n]], atol=1e-3)
    np.testing.assert_allclose(first.prompt, prompts[offset : offset + n], atol=1e-3)
    for p in range(n):
        size = 2 + (p + offset) % 4
        expected = images[pools[p + offset, :size]]
        assert first.mask[p].sum() == size
        np.testing.assert_allclose(first.candidates[p, :size], expected, atol=1e-3)
        assert not first.candidates[p, size:].any()
        sims = expected @ images[pair_rows[p + offset]]
        np.testing.assert_allclose(first.sim_image[p, :size], sims, atol=1e-5)


def test_pools_from_other_embeddings_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images, _ = clustered_unit_vectors(10, 4, 2, 0.3, rng)
    emb_a = write_embeddings(tmp_path / "a", images, np.arange(5), images[:5], images[:5])
    emb_b = write_embeddings(tmp_path / "b", images, np.arange(6), images[:6], images[:6])
    candidates = write_candidates(tmp_path / "cand", emb_a, np.tile(np.arange(5, 8), (5, 1)), images)
    with pytest.raises(UserError, match="5 pools for 6 pairs"):
        list(iter_pools(candidates, emb_b, ImageStore.load(emb_b), 0, 6))


def test_upstream_embeddings_are_found_and_checked(tmp_path: Path) -> None:
    from misp_dpo.pipelines.embeddings import upstream_embeddings

    rng = np.random.default_rng(2)
    images, _ = clustered_unit_vectors(10, 4, 2, 0.3, rng)
    embeddings = write_embeddings(tmp_path / "emb", images, np.arange(3), images[:3], images[:3])
    candidates = write_candidates(tmp_path / "cand", embeddings, np.tile(np.arange(5, 8), (3, 1)), images)
    found, clip = upstream_embeddings(candidates, "--candidates")
    assert found.root == (tmp_path / "emb").resolve() and clip.dim == 4
    manifest_file = tmp_path / "emb" / "manifest.json"
    manifest_file.write_text(manifest_file.read_text() + " ")
    with pytest.raises(UserError, match="changed after it was made"):
        upstream_embeddings(candidates, "--candidates")

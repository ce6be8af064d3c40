from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from misp_dpo.pipelines.embeddings import ImageStore, read_embeddings
from misp_dpo.pipelines.io import fixed_width_ids, iter_row_range
from tests.helpers import clustered_unit_vectors, write_embeddings


def test_image_store_round_trip_and_lookup(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, _ = clustered_unit_vectors(50, 8, 4, 0.3, rng)
    rows = rng.integers(0, 50, size=30)
    manifest = write_embeddings(tmp_path / "emb", images, rows, images[rows], images[rows], tasks=3)
    manifest, clip = read_embeddings(tmp_path / "emb")
    assert clip.dim == 8
    store = ImageStore.load(manifest)
    assert len(store) == 50
    np.testing.assert_allclose(store.vectors.astype(np.float32), images, atol=1e-3)
    shuffled = np.array([7, 0, 49, 23])
    assert store.rows(store.ids[shuffled]).tolist() == shuffled.tolist()
    assert store.rows(np.array([b"f" * 40])).tolist() == [-1]


def test_row_ranges_cover_every_row_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images, _ = clustered_unit_vectors(10, 4, 2, 0.3, rng)
    rows = rng.integers(0, 10, size=103)
    manifest = write_embeddings(tmp_path / "emb", images, rows, images[rows], images[rows], tasks=4)
    paths = manifest.shard_paths("pairs")
    counts = [pq.read_metadata(p).num_rows for p in paths]
    seen = []
    for lo, hi in [(0, 17), (17, 60), (60, 103)]:
        batches = list(iter_row_range(paths, counts, lo, hi, ["pair_id"], batch_size=7))
        seen += [pid for b in batches for pid in b.column(0).to_pylist()]
    assert seen == [f"pair-{i:07d}" for i in range(103)]


def test_fixed_width_ids_slices_and_fallback() -> None:
    import pyarrow as pa

    ids = pa.array(["aa", "bb", "cc", "dd"]).slice(1, 2)
    assert fixed_width_ids(ids).tolist() == [b"bb", b"cc"]
    assert fixed_width_ids(pa.array(["a", "bcd"])).tolist() == [b"a", b"bcd"]

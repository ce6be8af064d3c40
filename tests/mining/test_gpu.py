"""Placing the index on GPUs: memory estimates and the replicate/shard choice run everywhere; the
FAISS GPU copies themselves only where FAISS sees a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from misp_dpo.mining.gpu import REPLICA_SHARE, choose_layout, gpu_copy_bytes, gpu_free_bytes
from misp_dpo.mining.index import GPU_MAX_K, IndexSpec, Searcher, build_index, choose_index, import_faiss
from tests.helpers import clustered_unit_vectors

GB = 2**30


def corpus(n: int = 4000, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    vectors, _ = clustered_unit_vectors(n, dim, 20, 0.2, rng, dtype=np.float16)
    return vectors, vectors[rng.integers(0, n, 50)].astype(np.float32)


def test_gpu_copy_sizes() -> None:
    vectors, _ = corpus()
    flat = build_index(vectors, IndexSpec("Flat"))
    assert gpu_copy_bytes(flat, float16=True) == 4000 * 32 * 2
    assert gpu_copy_bytes(flat, float16=False) == 4000 * 32 * 4
    sq8 = build_index(vectors, choose_index(4000, 32, 1, "IVF16,SQ8"))
    assert gpu_copy_bytes(sq8, float16=True) == 4000 * (32 + 8) + 16 * 32 * 4
    pq = build_index(vectors, choose_index(4000, 32, 1, "IVF16,PQ8x4"))
    assert gpu_copy_bytes(pq, float16=True) == 4000 * (4 + 8) + 16 * 32 * 4


def test_layout_replicates_what_fits_every_gpu_and_shards_the_rest() -> None:
    assert choose_layout(10 * GB, [80 * GB]) == "replicate"  # one GPU: nothing to choose
    assert choose_layout(10 * GB, []) == "replicate"
    assert choose_layout(10 * GB, [80 * GB, 80 * GB]) == "replicate"
    assert choose_layout(40 * GB, [80 * GB, 60 * GB]) == "shard", "must fit the fullest GPU"
    assert choose_layout(int(REPLICA_SHARE * 60 * GB), [80 * GB, 60 * GB]) == "replicate"
    assert choose_layout(GB, [80 * GB, 80 * GB], "shard") == "shard"
    assert choose_layout(100 * GB, [80 * GB, 80 * GB], "replicate") == "replicate"


def test_free_memory_is_unknown_without_gpus() -> None:
    if import_faiss().get_num_gpus() == 0:
        assert gpu_free_bytes(1) == []
    assert gpu_free_bytes(0) == []


def test_replicated_and_sharded_indexes_search_like_one_index() -> None:
    """The layouts `place_on_gpus` builds, here of CPU indexes: replicas, and shards holding every
    other vector of the inverted lists (FAISS's GPU sharding of IVF). The Searcher sets nprobe
    through both and gets the single index's neighbours."""
    faiss = import_faiss()
    vectors, queries = corpus()
    spec = choose_index(len(vectors), 32, 1, "IVF16,Flat", nprobe=3)
    full = build_index(vectors, spec)
    single = Searcher(faiss.clone_index(full), spec, "cpu", 20).search(queries, 20)
    replicas, shards = faiss.IndexReplicas(32), faiss.IndexShards(32, True, False)
    members = {"replicas": [faiss.clone_index(full) for _ in range(2)], "shards": []}
    for copy in members["replicas"]:
        replicas.addIndex(copy)
    for i in range(2):
        part = faiss.clone_index(full)
        part.reset()
        full.copy_subset_to(part, faiss.InvertedLists.SUBSET_TYPE_ID_MOD, 2, i)
        members["shards"].append(part)
        shards.add_shard(part)
    assert sum(m.ntotal for m in members["shards"]) == len(vectors)
    for name, layout in (("replicas", replicas), ("shards", shards)):
        scores, ids = Searcher(layout, spec, "cpu", 20).search(queries, 20)
        assert [m.nprobe for m in members[name]] == [3, 3], name
        np.testing.assert_array_equal(ids, single[1])
        np.testing.assert_allclose(scores, single[0], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["replicate", "shard"])
@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8"])
def test_gpu_search_matches_cpu(layout: str, factory: str) -> None:
    faiss = import_faiss()
    if faiss.get_num_gpus() == 0:
        pytest.skip("FAISS sees no GPU")
    vectors, queries = corpus()
    spec = IndexSpec("Flat") if factory == "Flat" else choose_index(len(vectors), 32, 1, factory)
    on_cpu = Searcher(build_index(vectors, spec), spec, "cpu", 64).search(queries, 64)
    gpu = Searcher(build_index(vectors, spec), spec, "cuda", 64, layout=layout)
    assert gpu.on_gpu and gpu.k_max == GPU_MAX_K
    scores, ids = gpu.search(queries, 64)
    np.testing.assert_allclose(scores, on_cpu[0], atol=2e-3 if "SQ" in factory else 1e-4)
    agreement = np.mean([len(np.intersect1d(a, b)) / 64 for a, b in zip(ids, on_cpu[1], strict=True)])
    assert agreement > 0.98
    with pytest.raises(ValueError, match="exceeds FAISS GPU's limit"):
        gpu.search(queries, GPU_MAX_K + 1)

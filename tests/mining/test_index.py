from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from misp_dpo.errors import UserError
from misp_dpo.mining.index import (
    GPU_MAX_K,
    IndexSpec,
    Searcher,
    auto_nlist,
    build_index,
    choose_index,
    faiss_device,
    import_faiss,
    load_index,
    parse_memory,
    save_index,
)
from tests.helpers import clustered_unit_vectors

GB = 2**30


def corpus(n: int = 3000, dim: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors, _ = clustered_unit_vectors(n, dim, 30, 0.5, rng, dtype=np.float16)
    queries, _ = clustered_unit_vectors(80, dim, 30, 0.5, rng)
    return vectors, queries


def test_exact_search_matches_brute_force_top_k() -> None:
    vectors, queries = corpus()
    k = 40
    scores, ids = Searcher(build_index(vectors, IndexSpec("Flat")), IndexSpec("Flat"), "cpu", k).search(
        queries, k, batch=32
    )
    brute = queries @ vectors.astype(np.float32).T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :k]
    expected_scores = np.take_along_axis(brute, expected, axis=1)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    differs = ids != expected
    gaps = np.abs(np.take_along_axis(brute, ids, axis=1) - expected_scores)
    assert (gaps[differs] < 1e-5).all(), "ids may differ only between tied scores"
    assert differs.mean() < 0.01


def test_writing_the_flat_storage_directly_equals_add() -> None:
    vectors, queries = corpus(500, 8)
    faiss = import_faiss()
    reference = faiss.IndexFlatIP(8)
    reference.add(vectors.astype(np.float32))
    ours = build_index(vectors, IndexSpec("Flat"))
    assert ours.ntotal == 500
    assert faiss.serialize_index(ours).tobytes() == faiss.serialize_index(reference).tobytes()


def test_ivf_recall_on_clustered_data_and_deterministic_build() -> None:
    rng = np.random.default_rng(0)
    vectors, _ = clustered_unit_vectors(6000, 32, 30, 0.15, rng, dtype=np.float16)
    queries = vectors[rng.integers(0, 6000, 80)].astype(np.float32)  # positives are corpus images
    assert choose_index(len(vectors), 32, 1, "IVF64,Flat").nprobe == 16  # MIN_NPROBE
    spec = choose_index(len(vectors), 32, 1, "IVF64,Flat", nprobe=4)
    assert spec.train_size == 6000
    index = build_index(vectors, spec, seed=3)
    faiss = import_faiss()
    again = build_index(vectors, spec, seed=3)
    assert faiss.serialize_index(index).tobytes() == faiss.serialize_index(again).tobytes()
    k = 64
    _, approx = Searcher(index, spec, "cpu", k).search(queries, k)
    _, exact = Searcher(build_index(vectors, IndexSpec("Flat")), IndexSpec("Flat"), "cpu", k).search(
        queries, k
    )
    recall = np.mean([len(np.intersect1d(a, e)) / k for a, e in zip(approx, exact, strict=True)])
    assert recall > 0.95


def test_save_load_round_trip(tmp_path: Path) -> None:
    vectors, queries = corpus(2000, 16)
    for spec in (IndexSpec("Flat"), choose_index(2000, 16, 1, "IVF16,SQ8")):
        index = build_index(vectors, spec)
        save_index(index, tmp_path / "index.faiss")
        loaded = load_index(tmp_path / "index.faiss")
        before = Searcher(index, spec, "cpu", 10).search(queries, 10)
        after = Searcher(loaded, spec, "cpu", 10).search(queries, 10)
        np.testing.assert_array_equal(before[1], after[1])
        np.testing.assert_array_equal(before[0], after[0])


@pytest.mark.parametrize(
    ("n", "dim", "budget", "factory"),
    [
        (1000, 512, GB, "Flat"),  # 2 MB of float32
        (1_000_000, 512, 4 * GB, "Flat"),  # exactly 1.9 GB
        (1_000_000, 512, 1 * GB, "IVF4096,SQ8"),  # flat needs 1.9 GB, SQ8 ~0.5 GB
        (10_000_000, 512, 2 * GB, "IVF16384,PQ64"),  # SQ8 needs 4.8 GB
        (10_000_000, 512, GB // 5, "IVF16384,PQ8"),
    ],
)
def test_auto_index_choice_follows_size_and_budget(n: int, dim: int, budget: int, factory: str) -> None:
    spec = choose_index(n, dim, budget)
    assert spec.factory == factory
    if spec.exact:
        assert spec.nprobe == 0 and spec.train_size == 0
    else:
        nlist = auto_nlist(n)
        assert spec.nprobe == nlist // 16 and spec.train_size == 64 * nlist


def test_index_choice_refusals_and_overrides() -> None:
    with pytest.raises(UserError, match="--max-index-memory .* too small"):
        choose_index(10_000_000, 512, 2**20)
    with pytest.raises(UserError, match="--index Bogus: FAISS cannot build it"):
        choose_index(100, 8, GB, "Bogus")
    with pytest.raises(UserError, match="need at least as many corpus images"):
        choose_index(100, 8, GB, "IVF256,Flat")
    assert choose_index(10**9, 512, 1, "flat") == IndexSpec("Flat")
    assert choose_index(5000, 8, GB, "HNSW16") == IndexSpec("HNSW16", 0, 0)
    assert choose_index(5000, 8, GB, "IVF32,Flat", nprobe=7).nprobe == 7
    assert choose_index(5000, 8, GB, "IVF32,Flat", nprobe=100).nprobe == 32


def test_parse_memory() -> None:
    assert parse_memory("16GB") == 16 * GB
    assert parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("1.5g") == int(1.5 * GB)
    assert parse_memory("2e9") == 2_000_000_000
    for bad in ("", "lots", "-1GB", "0"):
        with pytest.raises(ValueError, match="max_index_memory"):
            parse_memory(bad)


def test_device_choice(caplog: pytest.LogCaptureFixture) -> None:
    assert faiss_device("auto", 0, 64) == "cpu"
    assert faiss_device("auto", 2, 64) == "cuda"
    assert faiss_device("cpu", 2, 64) == "cpu"
    assert faiss_device("cuda", 1, GPU_MAX_K) == "cuda"
    with caplog.at_level(logging.WARNING, logger="misp_dpo"):
        logging.getLogger("misp_dpo").propagate = True
        try:
            assert faiss_device("auto", 2, GPU_MAX_K + 1) == "cpu"
        finally:
            logging.getLogger("misp_dpo").propagate = False
    assert "at most 2048" in caplog.text
    with pytest.raises(UserError, match="--device cuda: FAISS sees no GPU"):
        faiss_device("cuda", 0, 64)

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from misp_dpo.mining.index import IndexSpec, choose_index, import_faiss
from misp_dpo.pipelines import index_files
from misp_dpo.pipelines.index_files import index_key, open_index
from tests.helpers import clustered_unit_vectors

FLAT = IndexSpec("Flat")


def vectors(n: int = 600, dim: int = 16) -> np.ndarray:
    return clustered_unit_vectors(n, dim, 6, 0.2, np.random.default_rng(0), dtype=np.float16)[0]


def serialized(index: object) -> bytes:
    return import_faiss().serialize_index(index).tobytes()


def test_saved_index_is_reused_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, key = vectors(), index_key("emb", FLAT, 0)
    built = open_index(data, FLAT, 0, tmp_path, key, save=True)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"index-{key[:16]}.faiss", f"index-{key[:16]}.json"]
    described = json.loads((tmp_path / files[1]).read_text())
    assert described["bytes"] == (tmp_path / files[0]).stat().st_size and described["ntotal"] == 600

    def no_build(*args: object) -> None:
        raise AssertionError("the saved index should have been loaded")

    monkeypatch.setattr(index_files, "build_index", no_build)
    assert serialized(open_index(data, FLAT, 0, tmp_path, key, save=True)) == serialized(built)


def test_a_damaged_or_mismatched_saved_index_is_rebuilt(tmp_path: Path) -> None:
    data, key = vectors(), index_key("emb", FLAT, 0)
    reference = serialized(open_index(data, FLAT, 0, tmp_path, key, save=True))
    path = tmp_path / f"index-{key[:16]}.faiss"
    path.write_bytes(path.read_bytes()[:-100])  # a partial file its description does not match
    assert serialized(open_index(data, FLAT, 0, tmp_path, key, save=True)) == reference
    assert path.read_bytes() == reference
    more = vectors(700)  # same key, other corpus size: not trusted
    assert open_index(more, FLAT, 0, tmp_path, key, save=False).ntotal == 700
    assert path.read_bytes() == reference, "save=False leaves the folder alone"


def test_index_key_depends_on_inputs_type_and_the_seed_of_trained_indexes() -> None:
    ivf = choose_index(5000, 16, 1, "IVF16,Flat")
    assert index_key("a", FLAT, 0) == index_key("a", FLAT, 1), "a flat index has no randomness"
    assert index_key("a", ivf, 0) != index_key("a", ivf, 1)
    assert index_key("a", FLAT, 0) != index_key("b", FLAT, 0)
    assert index_key("a", FLAT, 0) != index_key("a", ivf, 0)

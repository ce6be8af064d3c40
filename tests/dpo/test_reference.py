"""The reference log-probs cache (acceptance b) and per-sample failures of the reference pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from misp_dpo.dpo.data import PreferenceData
from misp_dpo.dpo.model import ModelConfig, load_policy
from misp_dpo.dpo.reference import align_reference, compute_reference
from misp_dpo.errors import UserError
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.io import read_table
from misp_dpo.pipelines.stages.train import REFERENCE
from tests.dpo.conftest import run_train
from tests.helpers import random_negatives_table, write_negatives


@pytest.fixture(scope="module")
def trained(negatives16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "dpo"
    run_train(out, negatives16, max_steps=1)
    return out


def _sorted(table: pa.Table) -> pa.Table:
    keys = [("pair_id", "ascending"), ("image_id", "ascending"), ("response", "ascending")]
    return table.take(pc.sort_indices(table, keys))


def test_cached_reference_equals_a_fresh_computation(trained: Path, negatives16: Path) -> None:
    cached = _sorted(pq.read_table(trained / REFERENCE))
    data = PreferenceData(read_table(sorted(negatives16.glob("train-*.parquet"))), negatives16)
    policy = load_policy("tiny", ModelConfig(), seed=0)
    fresh, failures = compute_reference(policy, data, np.arange(len(data)), batch_size=7, show_progress=False)
    fresh = _sorted(fresh)
    assert not failures and cached.num_rows == fresh.num_rows == 16 * (1 + 3 + 1)
    for key in ("pair_id", "image_id", "response"):
        assert cached.column(key).equals(fresh.column(key))
    assert np.allclose(cached.column("logp").to_numpy(), fresh.column("logp").to_numpy(), atol=1e-5, rtol=0)
    aligned = align_reference(cached, data)
    assert np.isfinite(aligned.positive).all() and np.isfinite(aligned.negatives).all()
    assert np.isfinite(aligned.rejected).all() and len(aligned.trainable(data.counts)) == 16


def test_cache_of_another_model_is_refused(trained: Path, negatives16: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--reference .*another model"):
        run_train(tmp_path / "a", negatives16, reference=trained / REFERENCE, model="tiny-64x3")
    with pytest.raises(UserError, match="--reference .*another model \\(weights"):
        run_train(tmp_path / "b", negatives16, reference=trained / REFERENCE, seed=1)


def test_cache_of_another_dataset_is_refused(trained: Path, synth_corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-negatives"
    write_negatives(other, synth_corpus, pairs=16, negatives=3, seed=1)
    with pytest.raises(UserError, match="--reference .*another dataset"):
        run_train(tmp_path / "c", other, reference=trained / REFERENCE)


def test_cache_for_the_same_inputs_is_reused(trained: Path, negatives16: Path, tmp_path: Path) -> None:
    manifest = run_train(tmp_path / "d", negatives16, reference=trained / REFERENCE, max_steps=1)
    assert manifest is not None
    assert (tmp_path / "d" / "metrics.jsonl").read_text() == (trained / "metrics.jsonl").read_text()


def test_unreadable_images_are_per_pair_failures(synth_corpus: Path, tmp_path: Path) -> None:
    table = random_negatives_table(synth_corpus, pairs=12, negatives=2).to_pylist()
    table[0]["positive"]["uri"] = str(tmp_path / "gone.png")
    table[1]["negatives"][1]["uri"] = "/data/shard-00001.tar#000042.jpg"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    table[2]["negatives"][0]["uri"] = str(tmp_path / "broken.png")
    write_negatives(
        tmp_path / "neg", synth_corpus, 12, 2, table=pa.Table.from_pylist(table, schemas.NEGATIVES)
    )
    with pytest.raises(UserError, match="3 of 12 items failed"):
        run_train(tmp_path / "strict", tmp_path / "neg", max_steps=1)
    manifest = run_train(tmp_path / "dpo", tmp_path / "neg", max_failure_rate=0.5, max_steps=1)
    assert manifest is not None and manifest.stats["trained_pairs"] == 9
    failures = pq.read_table(tmp_path / "dpo" / "_failures" / "00000.parquet").to_pylist()
    reasons = {f["item"]: f["reason"] for f in failures}
    assert reasons == {
        table[0]["pair_id"]: "missing image file",
        table[1]["pair_id"]: "unsupported image uri",
        table[2]["pair_id"]: "undecodable image",
    }

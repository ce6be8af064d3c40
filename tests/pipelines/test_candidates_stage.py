from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from misp_dpo.config import build_config
from misp_dpo.errors import UserError
from misp_dpo.mining.candidates import PoolSettings
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.embeddings import ImageStore, read_embeddings, upstream_embeddings
from misp_dpo.pipelines.io import numpy_to_vectors, read_table
from misp_dpo.pipelines.manifest import Manifest, manifest_hash
from misp_dpo.pipelines.pools import iter_pools
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.runtime.validate import validate_output
from misp_dpo.pipelines.stages import candidates as stage_module
from misp_dpo.pipelines.stages.candidates import CandidatesConfig, CandidatesStage
from tests.helpers import clustered_unit_vectors, fake_image_ids, write_embeddings, write_prewritten
from tests.pipelines.test_runner import digest

N_IMAGES, N_PAIRS, DIM = 400, 37, 16


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """Clustered corpus; two pairs share a positive; chosen embeddings near their positive."""
    rng = np.random.default_rng(0)
    images, _ = clustered_unit_vectors(N_IMAGES, DIM, 10, 0.15, rng)
    pair_rows = rng.integers(0, N_IMAGES, size=N_PAIRS)
    pair_rows[5] = pair_rows[4]
    prompts, _ = clustered_unit_vectors(N_PAIRS, DIM, 3, 0.3, rng)
    chosen = images[pair_rows] + 0.3 * rng.standard_normal((N_PAIRS, DIM))
    chosen /= np.linalg.norm(chosen, axis=1, keepdims=True)
    out = tmp_path_factory.mktemp("emb") / "embeddings"
    return write_embeddings(out, images, pair_rows, prompts, chosen, tasks=2)


def run(embeddings: Path, out: Path, opts: RunOptions | None = None, **fields: object) -> Manifest:
    values = {"embeddings": embeddings, "out": out, "tasks": 3, "pool": 12, "headroom": 6, **fields}
    cfg = build_config(CandidatesConfig, values, "test flags")
    manifest = run_stage(CandidatesStage(), cfg, opts or RunOptions())
    assert manifest is not None
    return manifest


def test_one_filtered_ranked_pool_per_pair_in_order(embeddings: Manifest, tmp_path: Path) -> None:
    manifest = run(embeddings.root, tmp_path / "cand", batch_size=8)
    table = read_table(manifest.shard_paths("candidates"))
    pairs = read_table(embeddings.shard_paths("pairs"), ["pair_id", "image_id"])
    assert table.schema.metadata == schemas.CANDIDATES.metadata
    assert table.column("pair_id").equals(pairs.column("pair_id"))
    assert table.column("image_id").equals(pairs.column("image_id"))
    store = ImageStore.load(embeddings)
    for row in table.to_pylist():
        pool = row["candidates"]
        assert [c["rank"] for c in pool] == list(range(len(pool)))
        assert row["image_id"] not in {c["image_id"] for c in pool}
        sims = [c["sim_image"] for c in pool]
        assert sims == sorted(sims, reverse=True) and max(sims) < PoolSettings().dup_threshold
        positive = store.vectors[store.rows(pa.array([row["image_id"]]))[0]].astype(np.float32)
        ids = pa.array([c["image_id"] for c in pool])
        np.testing.assert_allclose(
            store.vectors[store.rows(ids)].astype(np.float32) @ positive, sims, atol=1e-5
        )
    stats = manifest.stats
    assert stats["pairs"] == stats["items"] == N_PAIRS and stats["removed_self"] == N_PAIRS
    assert stats["candidates"] == sum(len(p) for p in table.column("candidates").to_pylist())
    assert manifest.meta["clip"] == embeddings.meta["clip"]
    assert manifest.meta["embeddings_dir"] == str(embeddings.root.resolve())
    assert manifest.inputs == {"embeddings": manifest_hash(embeddings.root)}
    found, _ = upstream_embeddings(manifest, "--candidates")
    batches = list(iter_pools(manifest, found, store, 0, N_PAIRS, batch_size=10))
    assert sum(len(b) for b in batches) == N_PAIRS
    assert validate_output(manifest.root)[0] == []


def test_resume_after_a_crash_and_a_reused_index_give_identical_bytes(
    embeddings: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "reference"
    run(embeddings.root, reference, batch_size=8)
    stage_module.CORPUS.clear()
    real, calls = stage_module.candidate_pools, []

    def crash_on_fourth_batch(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage_module, "candidate_pools", crash_on_fourth_batch)
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(embeddings.root, resumed, batch_size=8)
    assert (resumed / "candidates-00000.parquet").exists() and not (resumed / "manifest.json").exists()
    monkeypatch.setattr(stage_module, "candidate_pools", real)
    stage_module.CORPUS.clear()
    run(embeddings.root, resumed, batch_size=8)  # loads the saved index
    assert digest(resumed) == digest(reference)
    stage_module.CORPUS.clear()
    unsaved = tmp_path / "unsaved"
    run(embeddings.root, unsaved, batch_size=8, save_index=False)
    assert not (unsaved / "_index").exists()
    assert {k: v for k, v in digest(unsaved).items() if "_index" not in k} == {
        k: v for k, v in digest(reference).items() if "_index" not in k
    }


def test_index_dir_is_shared_and_ivf_runs(embeddings: Manifest, tmp_path: Path) -> None:
    shared = tmp_path / "indexes"
    stage_module.CORPUS.clear()
    manifest = run(embeddings.root, tmp_path / "a", index="IVF8,Flat", index_dir=shared)
    assert manifest.meta["index"] == {"factory": "IVF8,Flat", "nprobe": 8, "train_size": N_IMAGES}
    saved = sorted(p.name for p in shared.iterdir())
    assert len(saved) == 2 and saved[0].endswith(".faiss")
    assert json.loads((shared / saved[1]).read_text())["factory"] == "IVF8,Flat"
    stage_module.CORPUS.clear()
    again = run(embeddings.root, tmp_path / "b", index="IVF8,Flat", index_dir=shared)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]
    assert sorted(p.name for p in shared.iterdir()) == saved


def test_changed_config_is_refused_without_overwrite(embeddings: Manifest, tmp_path: Path) -> None:
    out = tmp_path / "cand"
    run(embeddings.root, out)
    with pytest.raises(UserError, match=r"margin: 0.01 -> 0.1.*--overwrite"):
        run(embeddings.root, out, margin=0.1)
    assert run(embeddings.root, out, RunOptions(overwrite=True), margin=0.1).config["margin"] == 0.1


def test_missing_or_inconsistent_embeddings_are_refused(embeddings: Manifest, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--embeddings .*no manifest.json"):
        run(tmp_path, tmp_path / "out1")
    broken = tmp_path / "broken"
    rng = np.random.default_rng(3)
    images, _ = clustered_unit_vectors(20, DIM, 2, 0.2, rng)
    write_embeddings(broken, images, np.arange(5), images[:5], images[:5], tasks=2)
    (broken / "pairs-00001.parquet").unlink()
    with pytest.raises(UserError, match=r"pairs-00001.parquet is listed in manifest.json but missing"):
        run(broken, tmp_path / "out2")
    manifest_file = broken / "manifest.json"
    payload = json.loads(manifest_file.read_text())
    payload["shards"] = [s for s in payload["shards"] if s["path"] != "pairs-00001.parquet"]
    payload["shards"][0]["rows"] += 1
    manifest_file.write_text(json.dumps(payload))
    with pytest.raises(UserError, match=r"images-00000.parquet has 10 rows, manifest.json says 11"):
        run(broken, tmp_path / "out3")
    assert not (tmp_path / "out3").exists(), "refused before any work"


def test_pairs_whose_positive_is_missing_fail_but_keep_their_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    images, _ = clustered_unit_vectors(60, DIM, 3, 0.2, rng)
    ids = fake_image_ids(60)
    pair_ids = ids.take(pa.array(np.arange(0, 60, 3))).to_pylist()
    pair_ids[2] = "0" * 40  # an image the embeddings do not hold
    n = len(pair_ids)
    tables = {
        "images": pa.table(
            {
                "image_id": ids,
                "uri": [f"mem://{i}" for i in range(60)],
                "embedding": numpy_to_vectors(images),
            },
            schema=schemas.images(DIM),
        ),
        "pairs": pa.table(
            {
                "pair_id": [f"p{i}" for i in range(n)],
                "prompt": ["q"] * n,
                "chosen": ["c"] * n,
                "rejected": ["r"] * n,
                "image_id": pair_ids,
                "prompt_embedding": numpy_to_vectors(images[:n]),
                "chosen_embedding": numpy_to_vectors(images[::3]),
            },
            schema=schemas.pair_embeddings(DIM),
        ),
    }
    clip = {"model": "m", "pretrained": "", "fingerprint": "f", "dim": DIM}
    emb = write_prewritten(tmp_path / "emb", "embed", tables, meta={"clip": clip})
    assert read_embeddings(emb.root)[1].dim == DIM
    with pytest.raises(UserError, match="1 of 20 items failed"):
        run(emb.root, tmp_path / "strict", tasks=2)
    manifest = run(emb.root, tmp_path / "lenient", RunOptions(max_failure_rate=0.1), tasks=2)
    table = read_table(manifest.shard_paths("candidates"))
    assert table.num_rows == n and table.column("candidates")[2].as_py() == []
    failures = read_table([manifest.root / "_failures" / "00000.parquet"]).to_pylist()
    assert failures == [
        {
            "item": "pair p2",
            "reason": "positive image missing from the embeddings",
            "detail": f"image_id {'0' * 40}",
        }
    ]
    assert manifest.stats["failures"] == 1 and manifest.stats["items"] == n


def test_config_checks_name_the_fields(tmp_path: Path) -> None:
    for fields, message in [
        ({"pool": 4}, "min_pool"),
        ({"dup_threshold": 0.0}, "dup_threshold"),
        ({"margin": 3.0}, "margin"),
        ({"max_index_memory": "lots"}, "max_index_memory"),
        ({"nprobe": -1}, "nprobe"),
    ]:
        with pytest.raises(UserError, match=message):
            build_config(CandidatesConfig, {"embeddings": tmp_path, "out": tmp_path, **fields}, "flags")


def test_small_pools_are_counted(embeddings: Manifest, tmp_path: Path) -> None:
    manifest = run(embeddings.root, tmp_path / "cand", dup_threshold=0.6, min_pool=12, prompt_share=0.0)
    sizes = [len(p) for p in read_table(manifest.shard_paths("candidates")).column("candidates").to_pylist()]
    assert manifest.stats["small_pools"] == sum(size < 12 for size in sizes) > 0
    assert manifest.stats["removed_near_duplicate"] > 0

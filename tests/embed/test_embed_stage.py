"""The embed stage end to end: outputs, order, dedup, corpus kinds, failures, refusal, Slurm shares."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import misp_dpo.pipelines.stages.embed as embed_stage
from misp_dpo.errors import OutputMadeOtherwise, UserError
from misp_dpo.image_uris import read_uri
from misp_dpo.pipelines.embeddings import ImageStore, read_embeddings
from misp_dpo.pipelines.io import read_table, vectors_to_numpy
from misp_dpo.pipelines.runtime.validate import validate_output
from misp_dpo.pipelines.stage import TaskContext
from tests.embed.images import pairs_rows, png, write_bad_images, write_pairs, write_pngs, write_tar
from tests.embed.runs import TINY, output_files, run_embed


@pytest.fixture
def small_pairs(synth_corpus: Path, tmp_path: Path) -> Path:
    """The first 40 synth pairs, image paths made absolute."""
    table = pq.read_table(synth_corpus / "pairs.parquet").slice(0, 40).to_pydict()
    table["image"] = [str(synth_corpus / p) for p in table["image"]]
    return write_pairs(tmp_path / "small" / "pairs.parquet", table)


def test_synth_corpus_end_to_end(synth_corpus: Path, tmp_path: Path) -> None:
    manifest = run_embed(synth_corpus / "pairs.parquet", tmp_path / "emb", tasks=2, num_workers=2)
    assert manifest is not None
    assert validate_output(tmp_path / "emb")[0] == []
    assert manifest.stats == {"duplicates": 0, "images": 240, "items": 240, "pairs": 240}
    embeddings, clip = read_embeddings(tmp_path / "emb")
    assert (clip.model, clip.fingerprint, clip.dim) == ("misp-tiny-clip", "misp-tiny-clip/random", 64)
    assert embeddings.meta["clip"]["preprocess"]["size"] == [64, 64]
    source = pq.read_table(synth_corpus / "pairs.parquet")
    pairs = read_table(embeddings.shard_paths("pairs"))
    assert pairs.column("pair_id").to_pylist() == source.column("id").to_pylist()  # input order
    assert pairs.column("chosen").to_pylist() == source.column("chosen").to_pylist()
    first = (synth_corpus / source.column("image")[0].as_py()).read_bytes()
    assert pairs.column("image_id")[0].as_py() == hashlib.sha1(first).hexdigest()
    store = ImageStore.load(embeddings)
    assert len(store) == 240 and (store.rows(pairs.column("image_id")) >= 0).all()
    for column in ("prompt_embedding", "chosen_embedding"):
        norms = np.linalg.norm(vectors_to_numpy(pairs.column(column)), axis=1)
        assert np.allclose(norms, 1.0, atol=2e-3)
    assert np.allclose(np.linalg.norm(store.vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)
    uri = read_table(embeddings.shard_paths("images"), ["uri"]).column(0)[0].as_py()
    assert Path(uri).is_absolute() and Path(uri).read_bytes() == first


def test_decoding_workers_change_neither_order_nor_bytes(small_pairs: Path, tmp_path: Path) -> None:
    run_embed(small_pairs, tmp_path / "inline", tasks=2, num_workers=0, batch_size=8)
    run_embed(small_pairs, tmp_path / "workers", tasks=2, num_workers=2, batch_size=8)
    assert output_files(tmp_path / "inline") == output_files(tmp_path / "workers")


def test_duplicate_images_are_embedded_once_per_task(tmp_path: Path) -> None:
    write_pngs(tmp_path / "img", ["a.png", "b.png"])
    (tmp_path / "img" / "copy_of_a.png").write_bytes((tmp_path / "img" / "a.png").read_bytes())
    images = ["img/a.png", "img/b.png", "img/copy_of_a.png", "img/a.png"]
    pairs = write_pairs(tmp_path / "pairs.jsonl", pairs_rows(images))
    manifest = run_embed(pairs, tmp_path / "emb", corpus=tmp_path / "img")
    assert manifest is not None
    assert manifest.stats == {"duplicates": 5, "images": 2, "items": 7, "pairs": 4}
    ids = read_table(manifest.shard_paths("pairs"), ["image_id"]).column(0).to_pylist()
    assert ids[0] == ids[2] == ids[3] != ids[1]


def test_corpus_as_folder_tar_or_table_gives_the_same_embeddings(tmp_path: Path) -> None:
    names = [f"{i}.png" for i in range(5)]
    write_pngs(tmp_path / "corpus", names, first_seed=50)
    write_pngs(tmp_path / "p", ["pos.png"])
    pairs = write_pairs(tmp_path / "p" / "pairs.csv", pairs_rows(["pos.png"]))
    write_tar(tmp_path / "corpus.tar", {n: (tmp_path / "corpus" / n).read_bytes() for n in names})
    write_pairs(tmp_path / "corpus.parquet", {"image": [f"corpus/{n}" for n in names]})
    vectors = {}
    for kind, corpus in [("folder", "corpus"), ("tar", "corpus.tar"), ("table", "corpus.parquet")]:
        manifest = run_embed(pairs, tmp_path / kind, corpus=tmp_path / corpus)
        assert manifest is not None and manifest.stats["images"] == 6, kind
        store = ImageStore.load(manifest)
        vectors[kind] = store.vectors[np.argsort(store.ids)]
        assert manifest.meta["corpus_items"] == 5
    assert np.array_equal(vectors["folder"], vectors["tar"])
    assert np.array_equal(vectors["folder"], vectors["table"])


def test_bad_inputs_become_failures_with_reasons(tmp_path: Path) -> None:
    reasons = write_bad_images(tmp_path / "corpus")
    write_pngs(tmp_path / "corpus", ["good.png"])
    write_pngs(tmp_path, ["p0.png", "p1.png"], first_seed=20)
    bad = {
        "corpus/truncated.png": "undecodable image",
        "gone.png": "missing file",
        "corpus/empty.png": "empty file",
    }
    rows = pairs_rows(["p0.png", *bad, "p1.png"])
    rows["prompt"][4] = "  "
    pairs = write_pairs(tmp_path / "pairs.parquet", rows)
    with pytest.raises(UserError, match=r"embed: 7 of 9 items failed .* --max-failure-rate"):
        run_embed(pairs, tmp_path / "strict", corpus=tmp_path / "corpus")
    manifest = run_embed(pairs, tmp_path / "emb", {"max_failure_rate": 0.9}, corpus=tmp_path / "corpus")
    assert manifest is not None
    assert manifest.stats == {"duplicates": 0, "failures": 7, "images": 3, "items": 9, "pairs": 1}
    failures = pq.read_table(tmp_path / "emb" / "_failures" / "00000.parquet").to_pylist()
    found = {row["item"]: row["reason"] for row in failures}
    table = tmp_path / "pairs.parquet"
    expected = {f"{table} row {i + 1}": reason for i, reason in enumerate(bad.values())}
    expected[f"{table} row 4"] = "empty prompt"
    expected |= {str(tmp_path / "corpus" / name): reason for name, reason in reasons.items()}
    assert found == expected
    assert read_table(manifest.shard_paths("pairs"), ["pair_id"]).column(0).to_pylist() == ["row-000000000"]


def test_two_runs_on_the_same_broken_images_write_identical_failure_tables(tmp_path: Path) -> None:
    """A detail once held `<_io.BytesIO object at 0x7f...>`, different on every run."""
    reasons = write_bad_images(tmp_path / "corpus")
    write_pngs(tmp_path, ["p0.png"], first_seed=20)
    pairs = write_pairs(tmp_path / "pairs.parquet", pairs_rows(["p0.png", "corpus/text.jpg"]))
    tables = []
    for run in ("a", "b"):
        run_embed(pairs, tmp_path / run, {"max_failure_rate": 0.9}, corpus=tmp_path / "corpus")
        tables.append((tmp_path / run / "_failures" / "00000.parquet").read_bytes())
    assert tables[0] == tables[1]
    rows = pq.read_table(tmp_path / "a" / "_failures" / "00000.parquet").to_pylist()
    assert len(rows) == len(reasons) + 1
    for row in rows:
        assert " at 0x" not in row["detail"] and row["detail"], row
    text = next(row for row in rows if row["item"] == str(tmp_path / "corpus" / "text.jpg"))
    assert text["detail"] == "no image format recognised in its 21 bytes"


def test_changed_config_is_refused_in_one_line(small_pairs: Path, tmp_path: Path) -> None:
    run_embed(small_pairs, tmp_path / "emb")
    with pytest.raises(OutputMadeOtherwise) as error:  # a UserError: one line, no traceback
        run_embed(small_pairs, tmp_path / "emb", seed=1)
    assert "--overwrite" in str(error.value) and "seed: 0 -> 1" in str(error.value)
    assert "\n" not in str(error.value)
    assert run_embed(small_pairs, tmp_path / "emb", {"overwrite": True}, seed=1) is not None


def test_settings_that_change_the_bytes_are_refused_on_resume(
    small_pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch size, device and autocast dtype can change embeddings' last bits: a resume may not mix them."""
    run_embed(small_pairs, tmp_path / "emb")
    with pytest.raises(UserError, match=r"batch_size: 16 -> 7.*--overwrite"):
        run_embed(small_pairs, tmp_path / "emb", batch_size=7)
    monkeypatch.setattr(embed_stage, "compute_identity", lambda device: "cuda bfloat16-autocast")
    with pytest.raises(UserError, match=r"another config or inputs"):
        run_embed(small_pairs, tmp_path / "emb")
    cfg = embed_stage.EmbedConfig(pairs=small_pairs, out=tmp_path / "mixed", model=TINY, num_workers=0)
    planned = embed_stage.EmbedStage().plan(cfg)  # as a driver with a GPU would plan it
    monkeypatch.undo()
    with pytest.raises(
        UserError, match=r"--device auto: task 0 computes in cpu float32, the run was planned in cuda"
    ):
        embed_stage.EmbedStage().run_task(cfg, planned, TaskContext(cfg.out, 0, 1))


def test_slurm_array_tasks_together_equal_one_local_run(
    small_pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = small_pairs
    run_embed(pairs, tmp_path / "local", tasks=3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    for task_id in ("1", "0"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task_id)
        manifest = run_embed(pairs, tmp_path / "slurm", {"executor": "slurm"}, tasks=3)
        assert (manifest is None) == (task_id == "1")  # the last array task to finish writes the manifest
        if task_id == "1":
            assert sorted(p.name for p in (tmp_path / "slurm" / "_stats").iterdir()) == ["00001.json"]
    assert output_files(tmp_path / "slurm") == output_files(tmp_path / "local")


def test_unknown_model_fails_before_any_work(small_pairs: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--model ViT-Nope: not a known open_clip model; .*local-dir:PATH"):
        run_embed(small_pairs, tmp_path / "emb", model="ViT-Nope")
    with pytest.raises(UserError, match=r"--pretrained nope: not a tag of misp-tiny-clip"):
        run_embed(small_pairs, tmp_path / "emb", pretrained="nope")
    assert not (tmp_path / "emb").exists()


def test_inline_image_bytes_in_the_pairs_table(tmp_path: Path) -> None:
    import pyarrow as pa

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": png(i), "path": f"{i}.png"} for i in range(3)], struct)
    pq.write_table(pa.table({**pairs_rows([None] * 3), "image": images}), tmp_path / "hf.parquet")
    manifest = run_embed(tmp_path / "hf.parquet", tmp_path / "emb")
    assert manifest is not None and manifest.stats["pairs"] == 3
    uris = read_table(manifest.shard_paths("images"), ["uri"]).column(0).to_pylist()
    assert [read_uri(uri) for uri in uris] == [png(i) for i in range(3)], "each uri finds its bytes"

"""The publish core: images embedded and checked, the Hub rows load with `datasets`, the card is portable."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from misp_dpo.image_uris import read_uri
from misp_dpo.mining.card import CardFacts, card_text, yaml_features
from misp_dpo.mining.exports import SWIFT_IMAGE_ROWS, SWIFT_TEXT_ROWS, TRL_ROWS, publish_batch
from misp_dpo.mining.publish import HF_ROWS, PublishSettings
from tests.publish.fixtures import negatives_table

ABSOLUTE = re.compile(rb"(?<![\w.])/(?:home|tmp|work|root|usr|var|mnt|Users)/|file:/|[A-Za-z]:\\\\")


def reader(root: Path):  # noqa: ANN201
    return lambda uri: read_uri(uri, root)


def test_hf_rows_load_as_pil_images_and_keep_their_sha1(tmp_path: Path) -> None:
    table = negatives_table(tmp_path / "corpus")
    published = publish_batch(table, reader(tmp_path / "corpus"), PublishSettings())
    rows = published.tables["train"]
    assert published.failures == [] and rows.num_rows == 5 and published.counts["dropped_pairs"] == 0
    out = tmp_path / "hub"
    (out / "data").mkdir(parents=True)
    pq.write_table(rows, out / "data" / "train-00000.parquet")
    facts = CardFacts(
        pretty_name="tiny",
        made_by="publish --format hf",
        version="0",
        mine_config={"negatives": 3},
        mine_meta={"strategy": "misp", "sae_dir": "/home/someone/sae"},
        stats={"pairs": 5},
        summary={},
        histograms=[],
        data_files={"default": "data/train-*"},
        rows=5,
        features=json.loads(HF_ROWS.metadata[b"huggingface"])["info"]["features"],
    )
    (out / "README.md").write_text(card_text(facts))
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(str(out), split="train")
    assert len(loaded) == 5
    row = loaded[0]
    assert row["positive"].size == (24, 24) and len(row["negatives"]) == 3
    negative = row["negatives"][0]
    assert negative["image"].mode == "RGB" and negative["rank"] == 0
    for stored in pq.read_table(out / "data" / "train-00000.parquet").to_pylist():
        assert hashlib.sha1(stored["positive"]["bytes"]).hexdigest() == stored["positive_id"]
        for n in stored["negatives"]:
            assert hashlib.sha1(n["image"]["bytes"]).hexdigest() == n["image_id"]
            assert n["image"]["path"] == f"{n['image_id']}.png"
    for path in out.rglob("*"):
        if path.is_file():
            assert not ABSOLUTE.search(path.read_bytes()), path


def test_a_changed_image_is_a_counted_failure_and_its_pair_is_dropped(tmp_path: Path) -> None:
    table = negatives_table(tmp_path / "corpus")
    (tmp_path / "corpus" / "images" / "3.png").write_bytes(b"\x89PNG not the mined image")
    (tmp_path / "corpus" / "images" / "0.png").unlink()
    published = publish_batch(table, reader(tmp_path / "corpus"), PublishSettings())
    reasons = sorted(reason for _, reason, _ in published.failures)
    assert reasons == ["image_id mismatch", "unreadable image"]
    # image 0 is pair 0's positive; image 3 is a negative of pairs 0, 1 and 2 and pair 3's positive
    assert published.counts["dropped_pairs"] == 4
    assert published.tables["train"].column("pair_id").to_pylist() == ["pair-4"]


def test_card_features_match_what_datasets_writes() -> None:
    datasets = pytest.importorskip("datasets")
    for schema in (HF_ROWS, SWIFT_IMAGE_ROWS, SWIFT_TEXT_ROWS, TRL_ROWS):
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        assert yaml_features(features) == datasets.Features.from_dict(features)._to_yaml_list()
        assert datasets.Features.from_dict(features).arrow_schema.names == schema.names


def test_card_carries_the_hub_fields_and_the_score_formula(tmp_path: Path) -> None:
    from huggingface_hub import DatasetCard

    config = {
        "negatives": 3,
        "weights": [1.0, 0.5],
        "relevance": 0.25,
        "beta_div": 1.0,
        "tau": 1.0,
        "uri_root": "/work/data/coco",
    }
    facts = CardFacts(
        pretty_name="demo",
        made_by="mine",
        version="0",
        mine_config=config,
        mine_meta={
            "strategy": "misp",
            "candidates_dir": "/tmp/x/cand",
            "sae": {"variant": "paper", "latents": 128, "dir": "/tmp/x/sae"},
        },
        stats={"pairs": 1500, "negatives": 4500},
        histograms=["hist-score.png"],
        summary={"score": {"mean": 0.5, "min": 0.1, "max": 0.9}},
        data_files={"default": "train-*.parquet"},
        rows=1500,
        license="cc-by-4.0",
    )
    text = card_text(facts)
    card = DatasetCard(text)
    data = card.data.to_dict()
    assert data["license"] == "cc-by-4.0" and data["size_categories"] == ["1K<n<10K"]
    assert data["pretty_name"] == "demo" and "image-text-to-text" in data["task_categories"]
    assert data["configs"][0]["data_files"][0]["path"] == "train-*.parquet"
    assert "dataset_info" not in data  # mine's rows hold uris: no image features to declare
    assert "s_i = 1 * l_i / max_pool(l) + 0.5 * v_i / max_pool(v) + 0.25 * (sim_i" in text
    assert "![" in text and "hist-score.png" in text
    assert not ABSOLUTE.search(text.encode()), text


def test_swift_and_trl_rows(tmp_path: Path) -> None:
    table = negatives_table(tmp_path / "corpus")
    swift = publish_batch(table, reader(tmp_path / "corpus"), PublishSettings(format="swift"))
    images, texts = swift.tables["rejected_images"], swift.tables["rejected_response"]
    assert images.num_rows == 3 + 3 + 1 + 3 + 3 and texts.num_rows == 4  # pair 1 has no rejected text
    first = images.slice(0, 1).to_pylist()[0]
    assert first["messages"][0] == {"role": "user", "content": "<image>What colour is the square 0?"}
    assert first["messages"][1]["role"] == "assistant" and len(first["rejected_images"]) == 1
    trl = publish_batch(table, reader(tmp_path / "corpus"), PublishSettings(format="trl"))
    rows = trl.tables["train"]
    assert rows.num_rows == 4 and trl.counts["pairs_without_rejected_text"] == 1
    assert rows.column("prompt")[0].as_py() == [{"role": "user", "content": "What colour is the square 0?"}]
    assert isinstance(pa.table(rows), pa.Table)


def test_portable_keeps_only_the_last_component_of_absolute_paths() -> None:
    from misp_dpo.mining.card import portable

    values = {
        "clip": "local-dir:/home/me/runs/clip",
        "dir": "/data/coco/negatives",
        "uri": "tar://img.png::/data/shard-0.tar",
        "file": "file:///srv/x/y.png",
        "url": "https://example.org/a/b",
        "formula": "w_l l_i/max_pool l",
        "nested": [{"sae": "/tmp/run/sae"}],
    }
    assert portable(values) == {
        "clip": "local-dir:clip",
        "dir": "negatives",
        "uri": "tar://img.png::shard-0.tar",
        "file": "y.png",
        "url": "https://example.org/a/b",
        "formula": "w_l l_i/max_pool l",
        "nested": [{"sae": "sae"}],
    }

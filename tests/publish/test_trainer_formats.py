"""The exports as the trainers read them: TRL's own vision DPO collator, ms-swift's documented rows.

ms-swift: the schema is the one documented in ms-swift's docs/source_en/Customization/Custom-dataset.md
(sections "RLHF" and "Multimodal") at ms-swift 4.6.0.dev0, commit 3602360a562313afbf2ef6065fdf61f271a2c5b9
(main, after the v4.5.2 tag), and its preprocessor swift/dataset/preprocessor/core.py
(`_cast_mm_data`: `images` / `rejected_images` as paths or `{bytes, path}` structs;
`_check_rejected_response`: a `rejected_response` key holding None is an error). ms-swift pins older
transformers/peft/datasets than this project, so it is not installed here: the fixture rows below
are the documented examples, and the export must have their shape.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from misp_dpo.image_uris import read_uri
from misp_dpo.mining.exports import publish_batch
from misp_dpo.mining.publish import PublishSettings
from tests.publish.fixtures import negatives_table

# The documented rows (Custom-dataset.md, "RLHF"): an image negative, and a text negative whose
# rejected side keeps `images`.
SWIFT_DOCUMENTED = [
    {
        "messages": [
            {"role": "user", "content": "<image>What is this?"},
            {"role": "assistant", "content": "This is a kitten."},
        ],
        "images": ["kitten.png"],
        "rejected_images": ["puppy.png"],
    },
    {
        "messages": [
            {"role": "user", "content": "<image>What is this?"},
            {"role": "assistant", "content": "This is a kitten."},
        ],
        "images": ["kitten.png"],
        "rejected_response": "This is a puppy.",
    },
]


def _swift_shape(row: dict) -> tuple:  # type: ignore[type-arg]
    """What ms-swift's preprocessor checks: roles, one <image> tag per image, a rejected side."""
    roles = tuple(m["role"] for m in row["messages"])
    tags = sum(m["content"].count("<image>") for m in row["messages"])
    rejected = tuple(k for k in ("rejected_images", "rejected_response") if k in row)
    assert tags == len(row["images"]), row
    assert rejected, "ms-swift needs rejected_images or rejected_response"
    if "rejected_response" in row:
        response = row["rejected_response"]
        assert response is not None and response != row["messages"][-1]["content"]
    if "rejected_images" in row:
        assert len(row["rejected_images"]) == len(row["images"])
    return roles, rejected


def test_swift_rows_have_the_documented_shape(tmp_path: Path) -> None:
    table = negatives_table(tmp_path / "corpus")
    published = publish_batch(
        table, lambda u: read_uri(u, tmp_path / "corpus"), PublishSettings(format="swift")
    )
    documented = {_swift_shape(row) for row in SWIFT_DOCUMENTED}
    for name, rows in published.tables.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(rows, path)
        for row in pq.read_table(path).to_pylist():
            assert _swift_shape(row) in documented
            for image in row["images"] + row.get("rejected_images", []):
                assert set(image) == {"bytes", "path"} and "/" not in image["path"]  # _cast_mm_data's dicts


@pytest.mark.slow
def test_trl_collator_processes_the_trl_export(tmp_path: Path) -> None:
    """TRL 1.16's DataCollatorForVisionPreference on the export loaded with `datasets` (tiny LLaVA)."""
    datasets = pytest.importorskip("datasets")
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    from misp_dpo.dpo.tiny import tiny_processor

    table = negatives_table(tmp_path / "corpus")
    published = publish_batch(
        table, lambda u: read_uri(u, tmp_path / "corpus"), PublishSettings(format="trl")
    )
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(published.tables["train"], tmp_path / "hub" / "data" / "train-00000.parquet")
    loaded = datasets.load_dataset("parquet", data_dir=str(tmp_path / "hub"), split="train")
    assert len(loaded) == 4 and loaded[0]["images"][0].size == (24, 24)
    processor = tiny_processor()
    collator = dpo_trainer.DataCollatorForVisionPreference(processor)
    batch = collator([dict(loaded[i]) for i in range(len(loaded))])
    assert batch["input_ids"].shape[0] == 2 * len(loaded)  # chosen and rejected of each row
    assert batch["pixel_values"].shape[0] == 2 * len(loaded)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_token).sum(dim=1).min() > 0  # every sequence sees the image
    assert batch["completion_mask"].sum(dim=1).min() > 0

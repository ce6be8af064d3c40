"""The Markdown summary, the held-out table lookup in a folder, and the model card."""

from __future__ import annotations

from pathlib import Path

import pytest

from misp_dpo.dpo.model import base_reference, model_card
from misp_dpo.errors import UserError
from misp_dpo.eval.preference import find_pairs_table
from misp_dpo.eval.summary import summary_table


def test_summary_rows_per_split_then_model() -> None:
    scores = {"accuracy": 0.75, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 0.5, "n": 8}
    metrics = {
        "models": {
            "base": {"pope": {"random": scores, "adversarial": scores}},
            "trained": {
                "pope": {"random": {**scores, "accuracy": 1.0}},
                "preference": {
                    "image_accuracy": 0.5,
                    "image_margin": 0.25,
                    "text_accuracy": None,
                    "n": 4,
                    "by_kind": {"size": {"image_accuracy": 0.0, "image_margin": -1.0, "n": 2}},
                },
            },
        }
    }
    lines = summary_table(metrics).splitlines()
    assert lines[0] == "| model | split | accuracy | precision | recall | f1 | yes_ratio | n |"
    assert lines[2] == "| base | random | 0.750 | 0.500 | 1.000 | 0.667 | 0.500 | 8 |"
    assert lines[3].startswith("| trained | random | 1.000 |")
    assert lines[4].startswith("| base | adversarial |")
    assert lines[-5] == "| trained | 0.500 | 0.250 | - | 4 |"
    assert lines[-3:] == [
        "| image accuracy per kind of negative | trained |",
        "|---|---|",
        "| size | 0.000 |",
    ]


def test_pairs_folder_lookup(tmp_path: Path) -> None:
    (tmp_path / "pairs.parquet").write_bytes(b"")
    assert find_pairs_table(tmp_path) == tmp_path / "pairs.parquet"  # the only table
    (tmp_path / "other.jsonl").write_text("")
    with pytest.raises(UserError, match="heldout_pairs.parquet or exactly one table, found 2; name the file"):
        find_pairs_table(tmp_path)
    (tmp_path / "heldout_pairs.parquet").write_bytes(b"")
    assert find_pairs_table(tmp_path) == tmp_path / "heldout_pairs.parquet"
    assert find_pairs_table(tmp_path / "x.jsonl") == tmp_path / "x.jsonl"


def test_model_card_and_base_reference(tmp_path: Path) -> None:
    assert base_reference("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    (tmp_path / "base").mkdir()
    assert base_reference(str(tmp_path / "base")) == str((tmp_path / "base").resolve())
    card = model_card("llava-hf/llava-1.5-7b-hf", True, {"dataset": "runs/negatives", "loss": {"beta": 0.5}})
    assert "base_model: llava-hf/llava-1.5-7b-hf" in card and "library_name: peft" in card
    assert "- dataset: `runs/negatives`" in card and "- loss: beta=0.5" in card
    assert "AutoPeftModel.from_pretrained" in card
    local = model_card(str(tmp_path / "base"), False, {})
    assert "base_model:" not in local  # hub metadata only names hub ids
    assert "AutoModelForImageTextToText" in local

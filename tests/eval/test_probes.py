"""Probe tables: our format in JSONL / Parquet / CSV, the public POPE files, the merged form; bad tables."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from misp_dpo.dpo.data import load_image
from misp_dpo.errors import UserError
from misp_dpo.eval.probes import PROBES, load_probes, parse_probe_spec
from tests.eval.fixtures import ROWS, write_jsonl, write_ours, write_pope

SPLITS = [split for *_, split in ROWS]
LABELS = [label for _, _, label, _, _ in ROWS]
COLORS = [color for color, *_ in ROWS]


def _pixel(uri: str) -> tuple[int, int, int]:
    return load_image(uri, Path("/nonexistent")).getpixel((0, 0))  # type: ignore[return-value]


RGB = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255)}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_our_format_loads_in_every_table_format(tmp_path: Path, fmt: str) -> None:
    probes = load_probes([str(write_ours(tmp_path, fmt))])
    assert probes.schema == PROBES
    assert probes.num_rows == 6
    assert probes.column("split").to_pylist() == SPLITS
    assert probes.column("label").to_pylist() == LABELS
    assert probes.column("id").to_pylist() == [f"q{i}" for i in range(6)]
    assert probes.column("attribute").to_pylist() == [a for _, _, _, a, _ in ROWS]
    assert probes.column("question").to_pylist()[1] == "Is the square blue?"
    assert [_pixel(uri) for uri in probes.column("uri").to_pylist()] == [RGB[c] for c in COLORS]


def test_public_pope_files_load_as_they_are(tmp_path: Path) -> None:
    one, unnamed, merged = write_pope(tmp_path / "pope")
    root = tmp_path / "pope" / "val2014"
    by_name = load_probes([str(one)], image_root=root)
    assert by_name.column("split").to_pylist() == ["adversarial"] * 6
    assert by_name.column("id").to_pylist() == [str(i) for i in range(1, 7)]
    assert by_name.column("question").to_pylist()[0] == "Is there a red square in the image?"
    assert by_name.column("attribute").null_count == 6
    assert [_pixel(uri) for uri in by_name.column("uri").to_pylist()] == [RGB[c] for c in COLORS]
    named = load_probes([f"{unnamed}:popular"], image_root=root)
    assert named.column("split").to_pylist() == ["popular"] * 6
    overridden = load_probes([f"{one}:random"], image_root=root)  # FILE:SPLIT wins over the name
    assert overridden.column("split").to_pylist() == ["random"] * 6
    merged_probes = load_probes([str(merged)], image_root=root)
    assert merged_probes.column("split").to_pylist() == SPLITS
    both = load_probes([str(one), f"{unnamed}:random"], image_root=root)
    assert both.num_rows == 12


def test_split_names_and_missing_split(tmp_path: Path) -> None:
    assert parse_probe_spec("a/coco_pope_random.json").split is None
    assert parse_probe_spec("a/b.json:popular").split == "popular"
    with pytest.raises(UserError, match="'hard' is not a split"):
        parse_probe_spec("b.json:hard")
    _, unnamed, _ = write_pope(tmp_path)
    with pytest.raises(
        UserError, match=r"pope_any.jsonl: no split; add a category column or name it as .*:random"
    ):
        load_probes([str(unnamed)])


def test_missing_column_is_one_line_naming_file_and_fix(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"image": "a.png", "question": "Is it red?", "category": "random"}]
    )
    with pytest.raises(UserError) as error:
        load_probes([str(path)])
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "no column 'label'" in message
    assert "needs image, question (or text) and label" in message


def test_label_not_yes_no_names_the_row(tmp_path: Path) -> None:
    rows = [
        {"image": "a.png", "question": "Is it red?", "label": label, "category": "random"}
        for label in ("Yes", "no", "maybe")
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(UserError, match=r"p.jsonl: row 2: label 'maybe' is not yes or no; write yes or no"):
        load_probes([str(path)])
    rows[2]["label"] = " NO "
    assert load_probes([str(write_jsonl(path, rows))]).column("label").to_pylist() == ["yes", "no", "no"]


def test_bad_category_and_empty_question(tmp_path: Path) -> None:
    row = {"image": "a.png", "question": "Is it red?", "label": "yes", "category": "hard"}
    with pytest.raises(UserError, match=r"row 0: category 'hard' is not random, popular or adversarial"):
        load_probes([str(write_jsonl(tmp_path / "a.jsonl", [row]))])
    row = {**row, "category": "random", "question": ""}
    with pytest.raises(UserError, match=r"row 0: empty question"):
        load_probes([str(write_jsonl(tmp_path / "b.jsonl", [row]))])


def test_unreadable_image_is_only_located_here(tmp_path: Path) -> None:
    """A missing image file loads fine: it becomes a counted failure when the image is read."""
    row = {"image": "gone.png", "question": "Is it red?", "label": "yes", "category": "random"}
    probes = load_probes([str(write_jsonl(tmp_path / "p.jsonl", [row]))])
    assert probes.column("uri").to_pylist() == [str(tmp_path / "gone.png")]
    assert isinstance(probes, pa.Table)

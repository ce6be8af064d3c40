"""Probe tables of 6 rows in every accepted form, with small generated images."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

COLORS = ("red", "green", "blue")
# (colour of the square, question colour, label, attribute, split)
ROWS = [
    ("red", "red", "yes", "color", "random"),
    ("red", "blue", "no", "color", "random"),
    ("green", "green", "yes", "color", "popular"),
    ("green", "red", "no", "shape", "popular"),
    ("blue", "blue", "yes", "shape", "adversarial"),
    ("blue", "green", "no", "shape", "adversarial"),
]


def png(color: str, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path) -> list[str]:
    """One image per row, named like COCO files; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (color, *_) in enumerate(ROWS):
        name = f"COCO_val2014_{i:012d}.png"
        (folder / name).write_bytes(png(color))
        names.append(name)
    return names


def ours_rows(images: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"q{i}",
            "image": images[i],
            "question": f"Is the square {asked}?",
            "label": label,
            "category": split,
            "attribute": attribute,
        }
        for i, (_, asked, label, attribute, split) in enumerate(ROWS)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_ours(folder: Path, fmt: str) -> Path:
    """Our format as JSONL / CSV (paths relative to the table) or Parquet (HF {bytes, path} structs)."""
    images = write_images(folder / "images")
    rows = ours_rows([f"images/{name}" for name in images])
    if fmt == "jsonl":
        return write_jsonl(folder / "probes.jsonl", rows)
    table = pa.Table.from_pylist(rows)
    if fmt == "csv":
        pacsv.write_csv(table, folder / "probes.csv")
        return folder / "probes.csv"
    structs = pa.array(
        [{"bytes": (folder / r["image"]).read_bytes(), "path": Path(r["image"]).name} for r in rows],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = table.set_column(table.schema.get_field_index("image"), "image", structs)
    pq.write_table(table, folder / "probes.parquet")
    return folder / "probes.parquet"


def pope_rows(images: list[str], with_category: bool) -> list[dict[str, Any]]:
    """The public POPE layout: question_id, image (COCO file name), text, label [, category]."""
    rows = []
    for i, (_, asked, label, _, split) in enumerate(ROWS):
        row: dict[str, Any] = {
            "question_id": i + 1,
            "image": images[i],
            "text": f"Is there a {asked} square in the image?",
            "label": label,
        }
        if with_category:
            row["category"] = split
        rows.append(row)
    return rows


def write_pope(folder: Path) -> tuple[Path, Path, Path]:
    """coco_pope_adversarial.json (one split), pope_any.jsonl (one split, named by FILE:SPLIT) and
    llava_pope_test.jsonl (merged, with category); the images in folder/val2014, not next to them."""
    images = write_images(folder / "val2014")
    folder.mkdir(parents=True, exist_ok=True)
    one = write_jsonl(folder / "coco_pope_adversarial.json", pope_rows(images, False))
    unnamed = write_jsonl(folder / "pope_any.jsonl", pope_rows(images, False))
    merged = write_jsonl(folder / "llava_pope_test.jsonl", pope_rows(images, True))
    return one, unnamed, merged

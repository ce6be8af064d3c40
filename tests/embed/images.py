"""Small image files for the embed tests: valid PNGs and every kind of bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(seed: int, size: int = 32) -> bytes:
    """A distinct small PNG per seed (random pixels, so no two seeds share bytes)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pngs(folder: Path, names: list[str], first_seed: int = 0) -> list[Path]:
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(first_seed + i))
        paths.append(path)
    return paths


def write_bad_images(folder: Path) -> dict[str, str]:
    """One file per failure kind; returns file name -> the reason embed must record."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "truncated.png").write_bytes(png(100)[:300])
    (folder / "text.jpg").write_text("this is not an image\n")
    (folder / "empty.png").write_bytes(b"")
    return {"truncated.png": "undecodable image", "text.jpg": "not an image", "empty.png": "empty file"}


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """An uncompressed webdataset-style shard: members in the given order."""
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def pairs_rows(images: list[object], prefix: str = "q") -> dict[str, list[object]]:
    n = len(images)
    return {
        "prompt": [f"{prefix} prompt {i}" for i in range(n)],
        "chosen": [f"chosen answer {i}" for i in range(n)],
        "rejected": [f"rejected answer {i}" for i in range(n)],
        "image": images,
    }


def write_pairs(path: Path, columns: dict[str, list[object]]) -> Path:
    """The same rows as Parquet, JSONL or CSV, by the path's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.table(columns), path, row_group_size=7)  # several row groups
    elif path.suffix == ".jsonl":
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(pa.table(columns), path)
    return path

"""A tiny negatives table over real PNG files, whose image ids are the sha1 of their bytes."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
from PIL import Image

from misp_dpo.pipelines import schemas

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def write_images(root: Path, n: int) -> list[tuple[str, str]]:
    """n distinct PNGs under root/images; (image_id, uri relative to root) each."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        image = Image.new("RGB", (24, 24), COLOURS[i % len(COLOURS)])
        image.putpixel((i % 24, i // 24), (i, i, i))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        (root / "images" / f"{i}.png").write_bytes(data)
        out.append((hashlib.sha1(data).hexdigest(), f"images/{i}.png"))
    return out


def negatives_table(root: Path, pairs: int = 5, negatives: int = 3) -> pa.Table:
    """Pair p: positive image p, negatives the next ones (pair 2 only one); pair 1 has no rejected text."""
    images = write_images(root, pairs + negatives + 1)
    rows = []
    for p in range(pairs):
        count = negatives if p != 2 else 1  # a short pair
        rows.append(
            {
                "pair_id": f"pair-{p}",
                "prompt": f"What colour is the square {p}?",
                "chosen": f"It is colour {p}.",
                "rejected": None if p == 1 else f"It is colour {p + 1}.",
                "positive": {"image_id": images[p][0], "uri": images[p][1]},
                "negatives": [
                    {
                        "image_id": images[p + k + 1][0],
                        "uri": images[p + k + 1][1],
                        "rank": k,
                        "sim_image": 0.9 - k / 10,
                        "sim_prompt": 0.3,
                        "recon_error": 0.5 + k,
                        "deviation": 2.0 - k,
                        "diversity_gain": 0.1 * k,
                        "score": 1.0 - k / 10,
                        "proposal": 0.2,
                    }
                    for k in range(count)
                ],
            }
        )
    return pa.Table.from_pylist(rows, schema=schemas.NEGATIVES)

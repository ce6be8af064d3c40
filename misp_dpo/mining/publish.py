"""Publishing a negatives dataset: its images embedded, so the folder travels and loads on its own.

`negatives/` locates images by `uri` only; a Hub dataset must carry them. Each image is read once
per batch, its sha1 checked against its `image_id` (a mismatch is a failure: the uri no longer
points at the mined image), and stored as the `datasets` Image feature, a `{bytes, path}` struct
whose `path` is the relative name `IMAGE_ID.EXT`. The Parquet schema carries the `huggingface`
features metadata that `datasets` itself writes, so `datasets.load_dataset("parquet", ...)` returns
PIL images without any other file. The other formats (`exports.py`) reuse the embedded images.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from misp_dpo.config import option

PublishFormat = Literal["hf", "swift", "trl"]
ReadImage = Callable[[str], bytes]  # uri -> bytes (OSError / ValueError when unreadable)

IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
SCORE_FIELDS = ("sim_image", "sim_prompt", "recon_error", "deviation", "diversity_gain", "score", "proposal")
_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"), (b"RIFF", "webp"), (b"BM", "bmp"))


@dataclass(frozen=True, kw_only=True)
class PublishSettings:
    format: PublishFormat = option(
        "hf",
        "hf: one row per pair, positive and every negative embedded (the datasets Image feature); "
        "swift: ms-swift DPO rows, one rejected image per row (images / rejected_images) and one row "
        "per rejected text (rejected_response); trl: TRL's vision DPO columns (images / prompt / "
        "chosen / rejected) for pairs with a rejected text: the negative images are LOST there",
    )
    license: str = option("other", "license id of the card (the Hub's `license` field: cc-by-4.0, mit, ...)")
    pretty_name: str = option("", "the card's title (default: the negatives folder's name)")


def hf_value(dtype: str) -> dict[str, str]:
    return {"dtype": dtype, "_type": "Value"}


HF_IMAGE: dict[str, Any] = {"_type": "Image"}


def hf_list(feature: Any) -> dict[str, Any]:
    return {"feature": feature, "_type": "List"}


def with_features(schema: pa.Schema, features: dict[str, Any], name: str) -> pa.Schema:
    """`schema` with the `datasets` features (what `Dataset.to_parquet` writes) and our schema id."""
    metadata = {
        b"huggingface": json.dumps({"info": {"features": features}}).encode(),
        b"misp_dpo.schema": f"{name}/1".encode(),
    }
    return schema.with_metadata(metadata)


_NEGATIVE_FEATURES = {
    "image": HF_IMAGE,
    "image_id": hf_value("string"),
    "rank": hf_value("int32"),
    **{name: hf_value("float32") for name in SCORE_FIELDS},
}
HF_NEGATIVE = pa.struct(
    [
        pa.field("image", IMAGE),
        pa.field("image_id", pa.string()),
        pa.field("rank", pa.int32()),
        *[pa.field(name, pa.float32()) for name in SCORE_FIELDS],
    ]
)
HF_ROWS = with_features(
    pa.schema(
        [
            pa.field("pair_id", pa.string()),
            pa.field("prompt", pa.string()),
            pa.field("chosen", pa.string()),
            pa.field("rejected", pa.string()),
            pa.field("positive", IMAGE),
            pa.field("positive_id", pa.string()),
            pa.field("negatives", pa.list_(HF_NEGATIVE)),
        ]
    ),
    {
        **{name: hf_value("string") for name in ("pair_id", "prompt", "chosen", "rejected")},
        "positive": HF_IMAGE,
        "positive_id": hf_value("string"),
        "negatives": hf_list(_NEGATIVE_FEATURES),
    },
    "published_hf",
)


@dataclass
class Published:
    """One batch as published: tables by shard prefix, counts and per-image failures."""

    tables: dict[str, pa.Table]
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (item, reason, detail)


def image_extension(data: bytes) -> str:
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "bin")


@dataclass
class EmbeddedImages:
    """The distinct images of a batch, read and checked once each."""

    read: ReadImage
    cells: dict[str, tuple[bytes, str] | None] = field(default_factory=dict)  # image_id -> (bytes, path)
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, image_id: str, uri: str | None) -> bool:
        if image_id not in self.cells:
            self.cells[image_id] = self._load(image_id, uri)
        return self.cells[image_id] is not None

    def _load(self, image_id: str, uri: str | None) -> tuple[bytes, str] | None:
        try:
            data = self.read(uri or "")
        except (OSError, ValueError) as error:
            self.failures.append((uri or image_id, "unreadable image", str(error)))
            return None
        digest = hashlib.sha1(data).hexdigest()
        if digest != image_id:
            detail = f"sha1 of the bytes is {digest}, the dataset says {image_id}"
            self.failures.append((uri or image_id, "image_id mismatch", detail))
            return None
        return data, f"{image_id}.{image_extension(data)}"

    def column(self, image_ids: list[str]) -> pa.StructArray:
        cells = [self.cells[i] for i in image_ids]
        data = pa.array([c[0] if c else None for c in cells], pa.binary())
        paths = pa.array([c[1] if c else None for c in cells], pa.string())
        return pa.StructArray.from_arrays([data, paths], fields=list(IMAGE))


@dataclass
class BatchImages:
    """A negatives batch with its images read: which pairs are whole, the flat negatives, offsets."""

    table: pa.Table  # the pairs whose every image was read and checked
    images: EmbeddedImages
    flat: pa.StructArray  # the kept pairs' negatives, flattened in (pair, rank) order
    offsets: np.ndarray  # int32, flat[offsets[p]:offsets[p + 1]] are pair p's negatives
    dropped: int


def read_batch_images(batch: pa.Table, read: ReadImage) -> BatchImages:
    """Read every image of a `negatives` batch; pairs with an unreadable or mismatching image go."""
    images = EmbeddedImages(read)
    positives = batch.column("positive").combine_chunks()
    negatives = batch.column("negatives").combine_chunks()
    pos_ids, pos_uris = positives.field("image_id").to_pylist(), positives.field("uri").to_pylist()
    pos_ok = [images.add(i, u) for i, u in zip(pos_ids, pos_uris, strict=True)]
    flat = negatives.flatten()
    neg_ok = np.array(
        [
            images.add(i, u)
            for i, u in zip(flat.field("image_id").to_pylist(), flat.field("uri").to_pylist(), strict=True)
        ],
        dtype=bool,
    )
    offsets = negatives.offsets.to_numpy()
    offsets = offsets - offsets[0]  # a sliced list array's offsets start where the slice does
    owner = np.repeat(np.arange(len(batch)), np.diff(offsets))
    bad_negatives = np.bincount(owner, weights=~neg_ok, minlength=len(batch))
    keep = np.array(pos_ok, dtype=bool) & (bad_negatives == 0)
    kept_negatives = np.repeat(keep, np.diff(offsets))
    table = batch.filter(pa.array(keep))
    new_offsets = np.concatenate([[0], np.cumsum(np.diff(offsets)[keep])]).astype(np.int32)
    return BatchImages(table, images, flat.filter(pa.array(kept_negatives)), new_offsets, int((~keep).sum()))


def hf_rows(batch: BatchImages) -> pa.Table:
    """One row per pair: the positive and every negative embedded, scores beside each negative."""
    table, flat = batch.table, batch.flat
    positives = table.column("positive").combine_chunks()
    negative_fields = [batch.images.column(flat.field("image_id").to_pylist()), flat.field("image_id")]
    negative_fields += [flat.field("rank")] + [flat.field(name).cast(pa.float32()) for name in SCORE_FIELDS]
    negatives = pa.ListArray.from_arrays(
        pa.array(batch.offsets), pa.StructArray.from_arrays(negative_fields, fields=list(HF_NEGATIVE))
    )
    columns = {name: table.column(name) for name in ("pair_id", "prompt", "chosen", "rejected")}
    return pa.table(
        {
            **columns,
            "positive": batch.images.column(positives.field("image_id").to_pylist()),
            "positive_id": positives.field("image_id"),
            "negatives": negatives,
        },
        schema=HF_ROWS,
    )

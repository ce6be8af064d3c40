"""Rows by format: `publish_batch` (the publish entry point) and the rows other trainers load as they are.

ms-swift (docs/source_en/Customization/Custom-dataset.md, "RLHF" and "Multimodal", ms-swift 4.6.0.dev0
at commit 3602360a; the same text since 3.8): `messages` (user turn with an `<image>` tag, then
the chosen assistant turn), `images` and `rejected_images` (lists of paths, URLs or `{bytes, path}`
structs, which its preprocessor's `_cast_mm_data` accepts), and `rejected_response`. A row may
have `rejected_images` or `rejected_response`; with `rejected_response` alone the rejected side
keeps `images`. Its preprocessor raises on a `rejected_response` key whose value is None, and a
Parquet column gives every row the key, so image rows and text rows go to separate shards
(`rejected_images-*` and `rejected_response-*`), never one table with nulls.

TRL 1.x `DPOTrainer` on a vision dataset (`DataCollatorForVisionPreference`): `images` (a list),
conversational `prompt`, `chosen` and `rejected`. It compares two responses under one image set,
so the negative images have no place there: only pairs with a rejected text are exported.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from misp_dpo.mining.publish import (
    HF_IMAGE,
    IMAGE,
    BatchImages,
    Published,
    PublishSettings,
    ReadImage,
    hf_list,
    hf_rows,
    hf_value,
    read_batch_images,
    with_features,
)

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
_MESSAGE_FEATURES = {"role": hf_value("string"), "content": hf_value("string")}
_SWIFT_COMMON = [
    pa.field("pair_id", pa.string()),
    pa.field("messages", pa.list_(MESSAGE)),
    pa.field("images", pa.list_(IMAGE)),
]
_SWIFT_COMMON_FEATURES = {
    "pair_id": hf_value("string"),
    "messages": hf_list(_MESSAGE_FEATURES),
    "images": hf_list(HF_IMAGE),
}
SWIFT_IMAGE_ROWS = with_features(
    pa.schema(
        [
            *_SWIFT_COMMON,
            pa.field("rejected_images", pa.list_(IMAGE)),
            pa.field("rank", pa.int32()),
            pa.field("score", pa.float32()),
            pa.field("proposal", pa.float32()),
        ]
    ),
    {
        **_SWIFT_COMMON_FEATURES,
        "rejected_images": hf_list(HF_IMAGE),
        "rank": hf_value("int32"),
        "score": hf_value("float32"),
        "proposal": hf_value("float32"),
    },
    "published_swift_images",
)
SWIFT_TEXT_ROWS = with_features(
    pa.schema([*_SWIFT_COMMON, pa.field("rejected_response", pa.string())]),
    {**_SWIFT_COMMON_FEATURES, "rejected_response": hf_value("string")},
    "published_swift_texts",
)
TRL_ROWS = with_features(
    pa.schema(
        [
            pa.field("pair_id", pa.string()),
            pa.field("images", pa.list_(IMAGE)),
            pa.field("prompt", pa.list_(MESSAGE)),
            pa.field("chosen", pa.list_(MESSAGE)),
            pa.field("rejected", pa.list_(MESSAGE)),
        ]
    ),
    {
        "pair_id": hf_value("string"),
        "images": hf_list(HF_IMAGE),
        "prompt": hf_list(_MESSAGE_FEATURES),
        "chosen": hf_list(_MESSAGE_FEATURES),
        "rejected": hf_list(_MESSAGE_FEATURES),
    },
    "published_trl",
)


def _turns(roles: list[str], texts: list[pa.Array]) -> pa.ListArray:
    """Per row, the messages [{role: roles[k], content: texts[k][row]}]."""
    n = len(texts[0])
    content = pa.concat_arrays([t.cast(pa.string()) for t in texts])
    order = np.arange(n * len(roles)).reshape(len(roles), n).T.reshape(-1)  # row-major turns
    role = pa.array(np.repeat(np.array(roles, dtype=object)[None, :], n, axis=0).reshape(-1), pa.string())
    messages = pa.StructArray.from_arrays([role, content.take(pa.array(order))], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * len(roles)), messages)


def _singletons(images: pa.StructArray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.arange(len(images) + 1, dtype=np.int32)), images)


def _with_image_tag(prompts: pa.Array) -> pa.Array:
    """ms-swift places each image at an `<image>` tag; the prompt gets one in front unless it has it."""
    tagged = pc.binary_join_element_wise("<image>", prompts, "")
    return pc.if_else(pc.match_substring(prompts, "<image>"), prompts, tagged)


def swift_rows(batch: BatchImages) -> dict[str, pa.Table]:
    """One row per negative (`rejected_images`) and one per rejected text (`rejected_response`)."""
    table, flat = batch.table, batch.flat
    owner = pa.array(np.repeat(np.arange(table.num_rows), np.diff(batch.offsets)))
    prompts = _with_image_tag(table.column("prompt").combine_chunks())
    chosen = table.column("chosen").combine_chunks()
    positive = batch.images.column(table.column("positive").combine_chunks().field("image_id").to_pylist())
    image_rows = pa.table(
        {
            "pair_id": table.column("pair_id").take(owner),
            "messages": _turns(["user", "assistant"], [prompts.take(owner), chosen.take(owner)]),
            "images": _singletons(positive.take(owner)),
            "rejected_images": _singletons(batch.images.column(flat.field("image_id").to_pylist())),
            "rank": flat.field("rank"),
            "score": flat.field("score").cast(pa.float32()),
            "proposal": flat.field("proposal").cast(pa.float32()),
        },
        schema=SWIFT_IMAGE_ROWS,
    )
    texts = _with_text(table)
    text_rows = pa.table(
        {
            "pair_id": table.column("pair_id").take(texts),
            "messages": _turns(["user", "assistant"], [prompts.take(texts), chosen.take(texts)]),
            "images": _singletons(positive.take(texts)),
            "rejected_response": table.column("rejected").take(texts),
        },
        schema=SWIFT_TEXT_ROWS,
    )
    return {"rejected_images": image_rows, "rejected_response": text_rows}


def _with_text(table: pa.Table) -> pa.Array:
    """Rows whose rejected text exists and differs from the chosen one (ms-swift refuses equal ones)."""
    rejected, chosen = table.column("rejected"), table.column("chosen")
    usable = pc.and_(pc.invert(pc.is_null(rejected)), pc.not_equal(rejected, chosen))
    usable = pc.and_(usable, pc.greater(pc.utf8_length(rejected), 0))
    return pa.array(np.flatnonzero(usable.to_numpy(zero_copy_only=False)))


def trl_rows(batch: BatchImages) -> dict[str, pa.Table]:
    """TRL's conversational vision DPO rows of the pairs with a rejected text (positive image only)."""
    table = batch.table
    texts = _with_text(table)
    positive = batch.images.column(table.column("positive").combine_chunks().field("image_id").to_pylist())
    pick = table.take(texts)
    rows = pa.table(
        {
            "pair_id": pick.column("pair_id"),
            "images": _singletons(positive.take(texts)),
            "prompt": _turns(["user"], [pick.column("prompt").combine_chunks()]),
            "chosen": _turns(["assistant"], [pick.column("chosen").combine_chunks()]),
            "rejected": _turns(["assistant"], [pick.column("rejected").combine_chunks()]),
        },
        schema=TRL_ROWS,
    )
    return {"train": rows}


def publish_batch(batch: pa.Table, read: ReadImage, settings: PublishSettings) -> Published:
    """The entry point: a `negatives` batch as the rows of `settings.format`, by shard prefix."""
    images = read_batch_images(batch, read)
    counts = {"items": len(images.images.cells), "dropped_pairs": images.dropped}
    if settings.format == "hf":
        tables = {"train": hf_rows(images)}
    elif settings.format == "swift":
        tables = swift_rows(images)
    else:
        tables = trl_rows(images)
        counts["pairs_without_rejected_text"] = images.table.num_rows - tables["train"].num_rows
    counts["rows"] = sum(t.num_rows for t in tables.values())
    counts["num_bytes"] = sum(t.nbytes for t in tables.values())  # the card's split size, as datasets counts
    counts["pairs"] = images.table.num_rows
    return Published(tables, counts, images.images.failures)

"""The published dataset's rows (docs/method.md §5 `negatives/`), built column-wise from a selection.

Listwise: one row per pair with a `negatives` list in pick order. Pairwise: one row per (positive,
negative) for trainers that take a single rejected image. Both are assembled from flat numpy
arrays and offsets, never row by row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from misp_dpo.mining.strategies import Mined

PAIR_TEXT = ("pair_id", "prompt", "chosen", "rejected")
NEGATIVE_FIELDS = (
    "rank",
    "sim_image",
    "sim_prompt",
    "recon_error",
    "deviation",
    "diversity_gain",
    "score",
    "proposal",
)


def _image_ref(image_ids: pa.Array, uris: pa.Array) -> pa.StructArray:
    return pa.StructArray.from_arrays([image_ids, uris], names=["image_id", "uri"])


def flat_fields(mined: Mined, keep: np.ndarray) -> dict[str, pa.Array]:
    """Per-negative fields of the kept pairs' picks, flattened in row-major (pair, rank) order."""
    valid = (mined.picks >= 0) & keep[:, None]
    ranks = np.broadcast_to(np.arange(mined.picks.shape[1], dtype=np.int32), mined.picks.shape)
    columns: dict[str, pa.Array] = {"rank": pa.array(ranks[valid])}
    for name in NEGATIVE_FIELDS[1:]:
        block = getattr(mined, name)
        count = int(valid.sum())
        columns[name] = (
            pa.nulls(count, pa.float32()) if block is None else pa.array(block[valid].astype(np.float32))
        )
    return columns


def negatives_table(
    pairs: pa.Table,
    positive_ids: pa.Array,
    positive_uris: pa.Array,
    mined: Mined,
    keep: np.ndarray,
    negative_ids: pa.Array,
    negative_uris: pa.Array,
) -> pa.Table:
    """Listwise rows of the kept pairs; `negative_ids/uris` are the kept picks, flattened."""
    counts = mined.counts[keep]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    fields = {"image_id": negative_ids, "uri": negative_uris, **flat_fields(mined, keep)}
    negatives = pa.ListArray.from_arrays(
        pa.array(offsets), pa.StructArray.from_arrays(list(fields.values()), names=list(fields))
    )
    take = pa.array(np.flatnonzero(keep))
    columns = {name: pairs.column(name).take(take) for name in PAIR_TEXT}
    positive = _image_ref(positive_ids.take(take), positive_uris.take(take))
    return pa.table({**columns, "positive": positive, "negatives": negatives})


def pairwise_table(
    pairs: pa.Table,
    positive_ids: pa.Array,
    positive_uris: pa.Array,
    mined: Mined,
    keep: np.ndarray,
    negative_ids: pa.Array,
    negative_uris: pa.Array,
) -> pa.Table:
    """One row per kept (positive, negative), in the same order as the listwise negatives."""
    valid = (mined.picks >= 0) & keep[:, None]
    owner = pa.array(np.nonzero(valid)[0])
    fields = flat_fields(mined, keep)
    columns = {name: pairs.column(name).take(owner) for name in PAIR_TEXT}
    return pa.table(
        {
            **columns,
            "image": _image_ref(positive_ids.take(owner), positive_uris.take(owner)),
            "rejected_image": _image_ref(negative_ids, negative_uris),
            "rank": fields["rank"],
            "score": fields["score"],
            "proposal": fields["proposal"],
        }
    )

"""Reference log-probs: one pass before training, so no reference model sits in memory while training.

For every pair: log pi_ref(chosen | x, m) for the positive and each stored negative, and
log pi_ref(rejected | x, m_p) when the pair has a rejected response, as rows (pair_id, image_id,
response, logp). A pair with an image that cannot be read is reported as a failure and left out.
`ReferenceLogps` lines the rows up with the dataset as dense arrays (NaN where missing).
`reference_pass` is what training runs: the rows from a `ReferenceCache` when it holds them for this
policy, else computed (split over torchrun ranks) and handed to the cache, so a resumed or repeated
run skips the pass; the cache's storage (a Parquet file of the train stage) is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from misp_dpo.dpo.data import PairRecord, PreferenceData, SampleError, load_image
from misp_dpo.dpo.distributed import DistInfo, barrier, gather_objects
from misp_dpo.dpo.model import Policy
from misp_dpo.dpo.sequences import SequenceEncoder, collate, sequence_logps
from misp_dpo.log import progress

CHOSEN, REJECTED = "chosen", "rejected"
Failure = tuple[str, str, str]  # (pair_id, reason, detail)
Key = tuple[str, str, str]  # (pair_id, image_id, response)
Item = tuple[str, str, Image.Image]  # (prompt, response, image)


def pair_items(record: PairRecord, data: PreferenceData) -> tuple[list[Key], list[Item]]:
    """Every sequence the reference pass needs for one pair; SampleError when the pair is unusable."""
    if not record.prompt.strip() or not record.chosen.strip():
        raise SampleError("empty prompt or chosen response", f"pair {record.pair_id}")
    positive = load_image(record.positive.uri, data.root)
    keys = [(record.pair_id, record.positive.image_id, CHOSEN)]
    items = [(record.prompt, record.chosen, positive)]
    for negative in record.negatives:
        keys.append((record.pair_id, negative.image_id, CHOSEN))
        items.append((record.prompt, record.chosen, load_image(negative.uri, data.root)))
    if record.rejected:
        keys.append((record.pair_id, record.positive.image_id, REJECTED))
        items.append((record.prompt, record.rejected, positive))
    return keys, items


@torch.no_grad()
def _flush(policy: Policy, encoder: SequenceEncoder, items: list[Item], dtype: torch.dtype) -> list[float]:
    batch = collate([encoder.encode(items)], encoder.tokenizer.pad_token_id or 0).to(policy.device, dtype)
    with policy.as_reference():
        return sequence_logps(policy.model, batch).double().cpu().tolist()


def compute_reference(
    policy: Policy, data: PreferenceData, rows: np.ndarray, batch_size: int, show_progress: bool = True
) -> tuple[pa.Table, list[Failure]]:
    """Reference log-probs of `rows` (a table of pair_id, image_id, response, logp) and the failures."""
    encoder = SequenceEncoder(policy.processor)
    dtype = next(policy.model.parameters()).dtype
    was_training = policy.model.training
    policy.model.eval()
    keys: list[Key] = []
    logps: list[float] = []
    failures: list[Failure] = []
    pending: list[Item] = []
    bar = progress(total=len(rows), desc="reference log-probs", unit="pair", disable=not show_progress)
    for lo in range(0, len(rows), 64):
        for record in data.records(rows[lo : lo + 64]):
            try:
                pair_keys, items = pair_items(record, data)
            except SampleError as error:
                failures.append((record.pair_id, error.reason, error.detail))
            else:
                keys.extend(pair_keys)
                pending.extend(items)
            if len(pending) >= batch_size:
                logps.extend(_flush(policy, encoder, pending, dtype))
                pending = []
            bar.update(1)
    if pending:
        logps.extend(_flush(policy, encoder, pending, dtype))
    bar.close()
    policy.model.train(was_training)
    return reference_table(keys, logps), failures


class ReferenceCache(Protocol):
    """Where reference log-probs persist between runs, keyed by the policy's `identity`."""

    def load(self, identity: dict[str, Any]) -> tuple[pa.Table, list[Failure]] | None:
        """The stored rows and failures for a policy of `identity`; None when nothing is stored."""

    def save(self, table: pa.Table, identity: dict[str, Any], failures: list[Failure]) -> None:
        """Store a pass's rows and failures (called on rank 0 only)."""


def reference_pass(
    policy: Policy, data: PreferenceData, batch_size: int, dist: DistInfo, cache: ReferenceCache
) -> tuple[pa.Table, list[Failure]]:
    """Every pair's reference rows and the failures: from `cache`, else computed, each rank taking
    rows rank, rank + world, ..., gathered on every rank and saved by rank 0."""
    cached = cache.load(policy.identity)
    if cached is not None:
        table, failures = cached
    else:
        rows = np.arange(dist.rank, len(data), dist.world)
        table, failures = compute_reference(policy, data, rows, batch_size, dist.is_main)
        parts = gather_objects((table, failures))
        table = pa.concat_tables([t for t, _ in parts])
        failures = sorted(f for _, fs in parts for f in fs)
        if dist.is_main:
            cache.save(table, policy.identity, failures)
    barrier()
    return table, failures


def reference_table(keys: list[Key], logps: list[float]) -> pa.Table:
    pair_ids, image_ids, responses = (list(c) for c in zip(*keys, strict=True)) if keys else ([], [], [])
    return pa.table(
        {
            "pair_id": pa.array(pair_ids, pa.string()),
            "image_id": pa.array(image_ids, pa.string()),
            "response": pa.array(responses, pa.string()),
            "logp": pa.array(logps, pa.float64()),
        }
    )


@dataclass(frozen=True)
class ReferenceLogps:
    """Reference log-probs aligned with the dataset's rows; NaN where the cache has no entry."""

    positive: np.ndarray  # (P,) chosen | positive image
    negatives: np.ndarray  # (P, N_max) chosen | negative i
    rejected: np.ndarray  # (P,) rejected | positive image

    def trainable(self, counts: np.ndarray) -> np.ndarray:
        """Rows with every reference log-prob the image term needs (failed pairs have none)."""
        slots = np.arange(self.negatives.shape[1])[None, :] < counts[:, None]
        complete = np.where(slots, np.isfinite(self.negatives), True).all(axis=1)
        return np.flatnonzero(np.isfinite(self.positive) & complete & (counts > 0))


def align_reference(table: pa.Table, data: PreferenceData) -> ReferenceLogps:
    """Join the cache rows to the dataset by (pair_id, image_id, response), vectorised in Arrow."""
    rows = pa.array(np.arange(len(data)), pa.int64())
    pairs = pa.table(
        {
            "pair_id": data.table.column("pair_id"),
            "image_id": pc.struct_field(data.table.column("positive"), "image_id"),
            "row": rows,
        }
    )
    negatives = data.table.column("negatives")
    starts = np.cumsum(data.counts) - data.counts
    slot = np.arange(int(data.counts.sum())) - np.repeat(starts, data.counts)
    flat = pa.table(
        {
            "pair_id": pc.take(
                data.table.column("pair_id"), pa.array(np.repeat(np.arange(len(data)), data.counts))
            ),
            "image_id": pc.struct_field(pc.list_flatten(negatives), "image_id"),
            "row": pa.array(np.repeat(np.arange(len(data)), data.counts), pa.int64()),
            "slot": pa.array(slot, pa.int64()),
        }
    )
    out = ReferenceLogps(
        positive=np.full(len(data), np.nan),
        negatives=np.full((len(data), data.max_negatives), np.nan),
        rejected=np.full(len(data), np.nan),
    )
    for response, keys, target in ((CHOSEN, pairs, out.positive), (REJECTED, pairs, out.rejected)):
        joined = _join(keys, table, response)
        target[joined.column("row").to_numpy()] = joined.column("logp").to_numpy()
    joined = _join(flat, table, CHOSEN)
    out.negatives[joined.column("row").to_numpy(), joined.column("slot").to_numpy()] = joined.column(
        "logp"
    ).to_numpy()
    return out


def _join(keys: pa.Table, table: pa.Table, response: str) -> pa.Table:
    subset = table.filter(pc.equal(table.column("response"), response)).select(
        ["pair_id", "image_id", "logp"]
    )
    joined: Any = keys.join(subset, keys=["pair_id", "image_id"], join_type="inner")
    return joined.combine_chunks()

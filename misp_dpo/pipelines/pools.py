"""Reading candidate pools with their embeddings, batched and padded, for the SAE and mine stages.

`candidates/` holds one row per pair of `embeddings/`, in the same global order (the candidates
stage's contract), so a pool batch joins the two by position and checks the pair ids agree.
Candidate ids become store rows by binary search and embeddings are gathered into a padded
(P, K, D) block with a mask: the cores then work on whole batches without Python loops.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from misp_dpo.errors import UserError
from misp_dpo.mining.mine import PoolBatch
from misp_dpo.pipelines.embeddings import ImageStore
from misp_dpo.pipelines.io import iter_row_range, vectors_to_numpy
from misp_dpo.pipelines.manifest import Manifest

PAIR_COLUMNS = ["pair_id", "prompt", "chosen", "rejected", "image_id", "prompt_embedding", "chosen_embedding"]


def _shards(manifest: Manifest, prefix: str) -> tuple[list, list[int]]:
    paths = manifest.shard_paths(prefix)
    return paths, [pq.read_metadata(p).num_rows for p in paths]


def pool_rows(candidates: Manifest) -> int:
    return candidates.rows("candidates")


def iter_pools(
    candidates: Manifest, embeddings: Manifest, store: ImageStore, lo: int, hi: int, batch_size: int = 256
) -> Iterator[PoolBatch]:
    """Pool batches for global pair rows [lo, hi)."""
    cand_paths, cand_counts = _shards(candidates, "candidates")
    pair_paths, pair_counts = _shards(embeddings, "pairs")
    if sum(cand_counts) != sum(pair_counts):
        raise UserError(
            f"{candidates.root}: {sum(cand_counts)} pools for {sum(pair_counts)} pairs in {embeddings.root}; "
            "the candidates were made from other embeddings: rerun `misp-dpo candidates` with --overwrite"
        )
    pool_batches = iter_row_range(cand_paths, cand_counts, lo, hi, ["pair_id", "candidates"], batch_size)
    pair_batches = iter_row_range(pair_paths, pair_counts, lo, hi, PAIR_COLUMNS, batch_size)
    pending: pa.Table | None = None
    for pool in pool_batches:
        need = pool.num_rows
        while pending is None or pending.num_rows < need:
            more = pa.Table.from_batches([next(pair_batches)])
            pending = more if pending is None else pa.concat_tables([pending, more])
        pairs, pending = pending.slice(0, need), pending.slice(need)
        yield _pool_batch(pool, pairs, store)


def _pool_batch(pool: pa.RecordBatch, pairs: pa.Table, store: ImageStore) -> PoolBatch:
    if not pool.column(0).equals(pairs.column("pair_id").combine_chunks()):
        raise UserError(
            "candidates and embeddings disagree on pair order; rerun `misp-dpo candidates --overwrite`"
        )
    lists = pool.column(1)
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(lists)
    n_pairs, width = len(lengths), int(lengths.max(initial=0))
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    slot = np.arange(len(starts)) - starts
    owner = np.repeat(np.arange(n_pairs), lengths)
    rows = np.full((n_pairs, width), -1, dtype=np.int64)
    flat_rows = store.rows(flat.field("image_id"))
    if (flat_rows < 0).any():
        raise UserError(
            "a candidate image is missing from the embeddings; rerun `misp-dpo candidates --overwrite`"
        )
    rows[owner, slot] = flat_rows
    mask = rows >= 0
    candidates = np.zeros((n_pairs, width, store.vectors.shape[1]), dtype=np.float32)
    candidates[mask] = store.vectors[rows[mask]]
    sims = {}
    for name in ("sim_image", "sim_prompt"):
        sims[name] = np.zeros((n_pairs, width), dtype=np.float32)
        sims[name][owner, slot] = flat.field(name).to_numpy(zero_copy_only=False)
    positive_rows = store.rows(pairs.column("image_id"))
    return PoolBatch(
        pairs=pairs.select(["pair_id", "prompt", "chosen", "rejected", "image_id"]),
        positive=store.vectors[positive_rows].astype(np.float32),
        prompt=vectors_to_numpy(pairs.column("prompt_embedding")),
        chosen=vectors_to_numpy(pairs.column("chosen_embedding")),
        candidates=candidates,
        mask=mask,
        rows=rows,
        sim_image=sims["sim_image"],
        sim_prompt=sims["sim_prompt"],
    )

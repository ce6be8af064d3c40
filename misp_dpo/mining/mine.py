"""The `mine` stage's core: one padded batch of pools in, the published rows of those pairs out.

`mine_pools` cleans each pool (the positive and repeats out), encodes it with the SAE when one is
given, selects the negatives (`misp_dpo.mining.strategies`) and builds the listwise or pairwise rows
(`misp_dpo.mining.dataset`). It reads and writes nothing: the stage wrapper streams the batches in
and the tables out, and adds the returned counts and failures to its task's stats.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from misp_dpo.config import option
from misp_dpo.image_uris import relative_to
from misp_dpo.mining.dataset import negatives_table, pairwise_table
from misp_dpo.mining.scores import PoolCodes, PoolEncoder, encode
from misp_dpo.mining.selection import clean_pool, pair_seeds, top_latents
from misp_dpo.mining.strategies import NEEDS_SEEDS, Mined, SelectionParams, SelectionPools, select_negatives


@dataclass
class PoolBatch:
    """P pairs and their pools padded to the widest pool K; padding has mask False and row -1."""

    pairs: pa.Table  # pair_id, prompt, chosen, rejected, image_id of the positive
    positive: np.ndarray  # (P, D) float32, v(m_p)
    prompt: np.ndarray  # (P, D) float32, t(x)
    chosen: np.ndarray  # (P, D) float32, text embedding of the chosen response
    candidates: np.ndarray  # (P, K, D) float32, v(m_c), zeros where padded
    mask: np.ndarray  # (P, K) bool
    rows: np.ndarray  # (P, K) int64 rows of the image table, -1 where padded
    sim_image: np.ndarray  # (P, K) float32
    sim_prompt: np.ndarray  # (P, K) float32

    def __len__(self) -> int:
        return self.pairs.num_rows


class Images(NamedTuple):
    """The image table the pools' rows index: ids (bytes) and uris, row-aligned."""

    ids: np.ndarray
    uris: pa.Array


@dataclass(frozen=True, kw_only=True)
class MineSettings:
    """What `mine_pools` picks and how it writes the rows (the `mine` stage nests it)."""

    selection: SelectionParams = option(SelectionParams(), "how negatives are scored and picked")
    drop_short: bool = option(False, "drop pairs whose filtered pool has fewer than N candidates")
    format: Literal["listwise", "pairwise"] = option(
        "listwise",
        "listwise: one row per pair with a list of negatives; pairwise (deprecated): one row per "
        "negative, use `misp-dpo publish NEGATIVES --format swift|trl` for trainers instead",
    )
    uri_root: Path | None = option(
        None,
        "write image locations under this folder relative to it (files, tar shards, tables), so the "
        "dataset can be published with that folder; readers take it as --image-root",
    )


class MinedRows(NamedTuple):
    """One batch's published rows, the counts for the stats and the pairs that failed."""

    table: pa.Table
    counts: Counter[str]
    failures: list[tuple[str, str, str]]  # (item, reason, detail)


def mine_pools(
    batch: PoolBatch,
    positive_rows: np.ndarray,
    images: Images,
    settings: MineSettings,
    seed: int,
    encoder: PoolEncoder | None = None,
    timings: dict[str, float] | None = None,
) -> MinedRows:
    """Clean, encode, select and build the rows of one pool batch.

    `positive_rows` are the positives' rows in `images`; `timings` (seconds per phase) is added to.
    """
    timings = timings if timings is not None else defaultdict(float)
    counts: Counter[str] = Counter()
    mask, positives, repeats = clean_pool(batch.rows, batch.mask, positive_rows)
    counts["removed_positive"] += positives
    counts["removed_repeats"] += repeats
    started = time.perf_counter()
    codes: PoolCodes | None = None
    if encoder is not None:
        codes = encode(encoder, batch.positive, batch.candidates, batch.prompt, mask)
    timings["encode"] += time.perf_counter() - started
    started = time.perf_counter()
    params = settings.selection
    seeds = (
        pair_seeds(batch.pairs.column("pair_id").to_pylist(), seed)
        if params.strategy in NEEDS_SEEDS
        else None
    )
    pools = SelectionPools(batch.positive, batch.candidates, mask, batch.sim_image, batch.sim_prompt, seeds)
    mined = select_negatives(pools, params, codes)
    timings["select"] += time.perf_counter() - started
    started = time.perf_counter()
    failures = _failures(batch, mined)
    keep = _keep(settings, len(batch), mined, counts)
    if codes is not None:  # stats hold integers (tasks merge exactly): the sum in millionths
        coverage = latent_coverage(codes.codes, mask, mined.picks)[keep]
        coverage = coverage[np.isfinite(coverage)]
        counts["sae_coverage_pairs"] += len(coverage)
        counts["sae_coverage_millionths"] += int(np.rint(coverage * 1e6).sum())
    picked_rows = np.take_along_axis(batch.rows, np.maximum(mined.picks, 0), axis=1)
    flat_rows = picked_rows[(mined.picks >= 0) & keep[:, None]]
    ids = pa.array(images.ids[flat_rows], pa.binary()).cast(pa.string())
    uris = _located(images.uris.take(pa.array(flat_rows)), settings.uri_root, counts)
    positive_ids = pa.array(images.ids[positive_rows], pa.binary()).cast(pa.string())
    positive_uris = _located(images.uris.take(pa.array(positive_rows)), settings.uri_root, counts)
    build = negatives_table if settings.format == "listwise" else pairwise_table
    table = build(batch.pairs, positive_ids, positive_uris, mined, keep, ids, uris)
    timings["build"] += time.perf_counter() - started
    return MinedRows(table, counts, failures)


COVERAGE_TOP = 8  # latents per negative counted by the report's label-free SAE latent coverage


def latent_coverage(codes: np.ndarray, mask: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Per pair, how much of what its negatives change in SAE latents only one of them changes
    (the label-free side of coverage, shown by the report); NaN for a pair without negatives.

    Each candidate's COVERAGE_TOP strongest changes beyond its pool's mean are weighted to sum 1
    (`top_latents`, as in the latent-coverage objective); a pair's coverage is sum_l max_j a_jl
    over its picks j, divided by their number: 1 when every negative changes latents no other one
    does, 1/N when all change the same ones in the same proportions.
    """
    chosen_index, chosen_weight = top_latents(codes, mask, COVERAGE_TOP, rows=picks)  # (P, N, t)
    picked = picks >= 0
    covered = np.zeros((len(picks), 2 * codes.shape[2]))
    owner = np.repeat(np.arange(len(picks)), chosen_index.shape[1] * chosen_index.shape[2])
    np.maximum.at(covered, (owner, chosen_index.reshape(-1)), chosen_weight.reshape(-1))
    count = picked.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, covered.sum(axis=1) / count, np.nan)


def _located(uris: pa.Array, root: Path | None, counts: Counter[str]) -> pa.Array:
    """The uris as published: relative to `uri_root` when given (those outside it counted)."""
    if root is None:
        return uris
    relative = relative_to(uris, root)
    counts["uris_outside_root"] += int(pc.sum(pc.equal(relative, uris)).as_py() or 0)  # left as they were
    return relative


def _failures(batch: PoolBatch, mined: Mined) -> list[tuple[str, str, str]]:
    return [
        (
            f"pair {batch.pairs.column('pair_id')[int(row)].as_py()}",
            "non-finite score",
            "an embedding or the SAE's output for this pair's pool is NaN or infinite",
        )
        for row in np.flatnonzero(mined.invalid)
    ]


def _keep(settings: MineSettings, items: int, mined: Mined, counts: Counter[str]) -> np.ndarray:
    """Which pairs are written: not failed, and (with drop_short) not short of N negatives."""
    picked = mined.counts
    short = (picked < settings.selection.negatives) & ~mined.invalid
    keep = ~mined.invalid & ~short if settings.drop_short else ~mined.invalid
    counts["items"] += items
    counts["pairs"] += int(keep.sum())
    counts["negatives"] += int(picked[keep].sum())
    counts["short_pairs"] += int(short.sum())
    counts["empty_pools"] += int(((picked == 0) & ~mined.invalid).sum())
    if settings.drop_short:
        counts["dropped_short"] += int(short.sum())
    return keep

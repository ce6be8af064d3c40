"""`misp-dpo mine`: pick N negatives per pair from its candidate pool and publish the dataset.

Task t of T handles global pair rows `task_rows(P, t, T)` of the candidates output, streamed as
padded pool batches; the cores score and select (`misp_dpo.mining.strategies`) and build the rows
(`misp_dpo.mining.dataset`); `finalize` writes the dataset card.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from misp_dpo.config import option, to_dict
from misp_dpo.errors import UserError
from misp_dpo.image_uris import relative_to
from misp_dpo.log import LOGGER, log_event
from misp_dpo.mining.scores import PoolCodes, PoolEncoder, encode
from misp_dpo.mining.selection import clean_pool, pair_seeds
from misp_dpo.mining.strategies import (
    NEEDS_SAE,
    NEEDS_SEEDS,
    Pools,
    SelectionParams,
    Strategy,
    select_negatives,
)
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.embeddings import ClipModelInfo, ImageStore, upstream_embeddings
from misp_dpo.pipelines.io import task_rows
from misp_dpo.pipelines.manifest import manifest_hash, read_manifest
from misp_dpo.pipelines.pools import PoolBatch, iter_pools
from misp_dpo.pipelines.stage import Plan, ShardedConfig, Stage, TaskContext, TaskResources

PREFIX = schemas.NEGATIVES_SHARD_PREFIX
CARD = "README.md"


@dataclass(frozen=True, kw_only=True)
class MineConfig(ShardedConfig):
    candidates: Path = option(help="output folder of `misp-dpo candidates`", hashed=False)
    sae: Path | None = option(
        None,
        "output folder of `misp-dpo sae`: needed by --strategy misp; optional for the others, which then "
        "record the SAE's l_i and v_i without selecting by them",
        hashed=False,
    )
    negatives: int = option(3, "N: negatives picked per pair (the paper's best is 3)")
    strategy: Strategy = option(
        "misp",
        "misp: SAE scores + greedy diversity (the paper); maxmin: the same greedy on raw CLIP differences; "
        "nearest: the N most similar to the positive; random: N uniform draws (seeded per pair)",
    )
    weights: tuple[float, ...] = option((1.0, 1.0), "w_l,w_v: weights of the normalised l_i and v_i in s_i")
    beta_div: float = option(1.0, "weight of the diversity term min_j (1 - cos(z_i, z_j)) in the greedy pick")
    relevance: float = option(
        0.0,
        "[ours] weight of the similarity to the positive (min-max normalised over the pool) added to "
        "s_i: pulls picks towards harder negatives; 0 is the paper's score",
    )
    tau: float = option(1.0, "temperature of the proposal q_i = softmax over the pool of s_i / tau")
    drop_short: bool = option(False, "drop pairs whose filtered pool has fewer than N candidates")
    format: Literal["listwise", "pairwise"] = option(
        "listwise", "listwise: one row per pair with a list of negatives; pairwise: one row per negative"
    )
    uri_root: Path | None = option(
        None,
        "write image locations under this folder relative to it (files, tar shards, tables), so the "
        "dataset can be published with that folder; readers take it as --image-root",
    )
    batch_size: int = option(256, "pairs scored together (memory ~ batch x pool x (D + latents) floats)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where the SAE runs", hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.negatives < 1:
            raise ValueError(f"negatives must be at least 1, got {self.negatives}")
        if len(self.weights) != 2 or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(
                f"weights must be two non-negative numbers w_l,w_v, not both 0; got {self.weights}"
            )
        if self.beta_div < 0:
            raise ValueError(f"beta_div must be non-negative, got {self.beta_div}")
        if self.relevance < 0:
            raise ValueError(f"relevance must be non-negative, got {self.relevance}")
        if self.tau <= 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def params(self) -> SelectionParams:
        w_l, w_v = self.weights
        return SelectionParams(
            self.strategy, self.negatives, (w_l, w_v), self.beta_div, self.tau, self.relevance
        )


def load_sae_encoder(folder: Path, device: str) -> PoolEncoder:
    """The trained SAE of an `sae` output (imported lazily: torch is only needed with an SAE)."""
    from misp_dpo.sae import load_sae

    return load_sae(folder, device=device)


@dataclass(frozen=True)
class MineWork:
    candidates: Path
    embeddings: Path
    total: int


class MineStage(Stage[MineConfig]):
    """Pick N hard, mutually different negatives per pair (MISP scores + greedy) and publish negatives/."""

    name = "mine"
    config = MineConfig
    resources = TaskResources(cpus=1.0, gpus=1.0)  # the SAE encodes on a GPU where there is one

    def plan(self, cfg: MineConfig) -> Plan:
        candidates = read_manifest(cfg.candidates, "candidates", "--candidates")
        embeddings, clip = upstream_embeddings(candidates, "--candidates")
        if cfg.strategy in NEEDS_SAE and cfg.sae is None:
            raise UserError(
                f"--sae: --strategy {cfg.strategy} scores candidates with an SAE; pass --sae DIR (the output "
                "of `misp-dpo sae`), or use --strategy maxmin|nearest|random, which need none"
            )
        inputs = {"candidates": manifest_hash(candidates.root), "embeddings": manifest_hash(embeddings.root)}
        sae_meta = None
        if cfg.sae is not None:
            sae_meta = self._check_sae(cfg.sae, clip)
            inputs["sae"] = manifest_hash(cfg.sae)
        meta = {
            "clip": clip.as_meta(),
            "embeddings_dir": str(embeddings.root.resolve()),
            "candidates_dir": str(candidates.root.resolve()),
            "sae": sae_meta,
            "strategy": cfg.strategy,
            "negatives": cfg.negatives,
            "format": cfg.format,
            "uri_root": str(cfg.uri_root.resolve()) if cfg.uri_root is not None else None,
            "schema": schemas.schema_id(self.schema(cfg)),
        }
        total = candidates.rows("candidates")
        work = MineWork(candidates.root, embeddings.root, total)
        return Plan(num_tasks=cfg.tasks, inputs=inputs, meta=meta, work=work)

    def _check_sae(self, folder: Path, clip: ClipModelInfo) -> dict[str, Any]:
        """Refuse, in one line and before any work, an SAE trained on another CLIP's embeddings."""
        manifest = read_manifest(folder, "sae", "--sae")
        encoder = load_sae_encoder(folder, "cpu")
        sae_clip = ClipModelInfo.from_meta({"clip": encoder.clip}, f"--sae {folder}")
        clip.check_same(sae_clip, f"--sae {folder}")
        return {
            "dir": str(folder.resolve()),
            "variant": encoder.variant,
            "latents": int(encoder.latents),
            "manifest_sha256": manifest_hash(manifest.root),
        }

    @staticmethod
    def schema(cfg: MineConfig) -> pa.Schema:
        return schemas.NEGATIVES if cfg.format == "listwise" else schemas.NEGATIVES_PAIRWISE

    def run_task(self, cfg: MineConfig, plan: Plan, ctx: TaskContext) -> None:
        from misp_dpo.pipelines.manifest import read_manifest as read

        work: MineWork = plan.work
        candidates, embeddings = read(work.candidates, "candidates"), read(work.embeddings, "embed")
        lo, hi = task_rows(work.total, ctx.task, ctx.num_tasks)
        store = ImageStore.load(embeddings)
        encoder = load_sae_encoder(cfg.sae, cfg.device) if cfg.sae is not None else None
        timings = {"read": 0.0, "encode": 0.0, "select": 0.0, "build": 0.0, "write": 0.0}
        with ctx.writer(PREFIX, self.schema(cfg)) as writer:
            started = time.perf_counter()
            for batch in iter_pools(candidates, embeddings, store, lo, hi, cfg.batch_size):
                timings["read"] += time.perf_counter() - started
                table = mine_batch(cfg, batch, store, encoder, ctx, timings)
                started = time.perf_counter()
                writer.write(table)
                timings["write"] += time.perf_counter() - started
                started = time.perf_counter()
        log_event(
            "mine timings", task=ctx.task, pairs=hi - lo, **{k: round(v, 3) for k, v in timings.items()}
        )

    def finalize(self, cfg: MineConfig, plan: Plan, out: Path, stats: dict[str, Any]) -> list[str]:
        """Warn about short pairs and write the dataset card with its histograms."""
        outside = stats.get("uris_outside_root", 0)
        if outside:
            LOGGER.warning(
                f"mine: {outside} image locations are not under --uri-root {cfg.uri_root} and stay "
                "absolute (stats key uris_outside_root)"
            )
        short, dropped = stats.get("short_pairs", 0), stats.get("dropped_short", 0)
        if short:
            what = (
                "dropped (--drop-short)" if dropped else "kept with fewer negatives (--drop-short drops them)"
            )
            LOGGER.warning(f"mine: {short} pairs had fewer than {cfg.negatives} candidates; {what}")
        return write_card(out, to_dict(cfg, hashed_only=True), plan.meta, stats)


def write_card(out: Path, config: dict[str, Any], meta: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """README.md and its histogram PNGs next to the shards; returns their names for the manifest."""
    from misp_dpo import __version__
    from misp_dpo.mining.card import card_markdown
    from misp_dpo.mining.plots import gather_fields, render_histograms, summary
    from misp_dpo.pipelines.io import atomic_path, iter_batches

    values = gather_fields(iter_batches(sorted(out.glob(f"{PREFIX}-*.parquet"))))
    images = render_histograms(values)
    for name, png in images.items():
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(png)
    text = card_markdown(
        config, meta, stats, summary(values), list(images), __version__, f"{PREFIX}-*.parquet"
    )
    with atomic_path(out / CARD) as tmp:
        tmp.write_text(text)
    return [*images, CARD]


def _positives(batch: PoolBatch, store: ImageStore) -> np.ndarray:
    rows = store.rows(batch.pairs.column("image_id"))
    if (rows < 0).any():
        raise UserError(
            "a positive image is missing from the embeddings' images; rerun `misp-dpo embed` with --overwrite"
        )
    return rows


def mine_batch(
    cfg: MineConfig,
    batch: PoolBatch,
    store: ImageStore,
    encoder: PoolEncoder | None,
    ctx: TaskContext,
    timings: dict[str, float],
) -> pa.Table:
    """Clean, encode, select and build the rows of one pool batch; counts go to the task's stats."""
    from misp_dpo.mining.dataset import negatives_table, pairwise_table

    positive_rows = _positives(batch, store)
    mask, positives, repeats = clean_pool(batch.rows, batch.mask, positive_rows)
    ctx.count("removed_positive", positives)
    ctx.count("removed_repeats", repeats)
    started = time.perf_counter()
    codes: PoolCodes | None = None
    if encoder is not None:
        codes = encode(encoder, batch.positive, batch.candidates, batch.prompt, mask)
    timings["encode"] += time.perf_counter() - started
    started = time.perf_counter()
    seeds = (
        pair_seeds(batch.pairs.column("pair_id").to_pylist(), cfg.seed)
        if cfg.strategy in NEEDS_SEEDS
        else None
    )
    pools = Pools(batch.positive, batch.candidates, mask, batch.sim_image, batch.sim_prompt, seeds)
    mined = select_negatives(pools, cfg.params(), codes)
    timings["select"] += time.perf_counter() - started
    started = time.perf_counter()
    keep = _keep(cfg, batch, mined, ctx)
    picked_rows = np.take_along_axis(batch.rows, np.maximum(mined.picks, 0), axis=1)
    flat_rows = picked_rows[(mined.picks >= 0) & keep[:, None]]
    ids = pa.array(store.ids[flat_rows], pa.binary()).cast(pa.string())
    uris = _located(store.uris.take(pa.array(flat_rows)), cfg.uri_root, ctx)
    positive_ids = pa.array(store.ids[positive_rows], pa.binary()).cast(pa.string())
    positive_uris = _located(store.uris.take(pa.array(positive_rows)), cfg.uri_root, ctx)
    build = negatives_table if cfg.format == "listwise" else pairwise_table
    table = build(batch.pairs, positive_ids, positive_uris, mined, keep, ids, uris)
    timings["build"] += time.perf_counter() - started
    return table


def _located(uris: pa.Array, root: Path | None, ctx: TaskContext) -> pa.Array:
    """The uris as published: relative to --uri-root when given (those outside it counted)."""
    if root is None:
        return uris
    relative = relative_to(uris, root)
    ctx.count("uris_outside_root", int(pc.sum(pc.equal(relative, uris)).as_py() or 0))  # left as they were
    return relative


def _keep(cfg: MineConfig, batch: PoolBatch, mined: Any, ctx: TaskContext) -> np.ndarray:
    """Which pairs are written: not failed, and (with --drop-short) not short of N negatives."""
    counts = mined.counts
    short = (counts < cfg.negatives) & ~mined.invalid
    keep = ~mined.invalid & ~short if cfg.drop_short else ~mined.invalid
    for row in np.flatnonzero(mined.invalid):
        ctx.fail(
            f"pair {batch.pairs.column('pair_id')[int(row)].as_py()}",
            "non-finite score",
            "an embedding or the SAE's output for this pair's pool is NaN or infinite",
        )
    ctx.count("items", len(batch))
    ctx.count("pairs", int(keep.sum()))
    ctx.count("negatives", int(counts[keep].sum()))
    ctx.count("short_pairs", int(short.sum()))
    ctx.count("empty_pools", int(((counts == 0) & ~mined.invalid).sum()))
    if cfg.drop_short:
        ctx.count("dropped_short", int(short.sum()))
    return keep

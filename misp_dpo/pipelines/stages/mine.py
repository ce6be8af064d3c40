"""`misp-dpo mine`: pick N negatives per pair from its candidate pool and publish the dataset.

Task t of T handles global pair rows `task_rows(P, t, T)` of the candidates output, streamed as
padded pool batches; `misp_dpo.mining.mine.mine_pools` cleans, scores, selects and builds the rows
of each batch; `finalize` writes the dataset card.

Over the 150-line aim: `plan` refuses an SAE from another CLIP before any work, and the card writer
(histograms, README.md) lives here; both belong with the card core (issue 15 is rewriting it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from misp_dpo import __version__
from misp_dpo.config import option, to_dict
from misp_dpo.errors import UserError
from misp_dpo.log import LOGGER, log_event
from misp_dpo.mining.card import card_markdown
from misp_dpo.mining.mine import Images, MineSettings, PoolBatch, mine_pools
from misp_dpo.mining.plots import gather_fields, render_histograms, summary
from misp_dpo.mining.scores import PoolEncoder
from misp_dpo.mining.strategies import NEEDS_SAE, check_sae_variant
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.embeddings import ClipModelInfo, ImageStore, upstream_embeddings
from misp_dpo.pipelines.io import atomic_path, iter_batches, task_rows
from misp_dpo.pipelines.manifest import manifest_hash, read_manifest
from misp_dpo.pipelines.pools import iter_pools
from misp_dpo.pipelines.stage import Plan, ShardedConfig, Stage, TaskContext, TaskResources
from misp_dpo.sae import load_sae

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
    settings: MineSettings = option(MineSettings(), "what is picked and how it is written")
    batch_size: int = option(256, "pairs scored together (memory ~ batch x pool x (D + latents) floats)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where the SAE runs", hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


def load_sae_encoder(folder: Path, device: str) -> PoolEncoder:
    """The trained SAE of an `sae` output, as the pool encoder mining scores with."""
    return load_sae(folder, device=device)  # type: ignore[return-value]  # sae's PoolCodes twin of mining's


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
        strategy = cfg.settings.selection.strategy
        if cfg.settings.format == "pairwise":
            LOGGER.warning(
                "mine: --format pairwise is deprecated; mine the listwise dataset and export it with "
                "`misp-dpo publish NEGATIVES --format swift` (one rejected image per row, ms-swift) or "
                "`--format trl` (TRL, rejected texts only)"
            )
        if strategy in NEEDS_SAE and cfg.sae is None:
            raise UserError(
                f"--sae: --strategy {strategy} scores candidates with an SAE; pass --sae DIR (the output of "
                "`misp-dpo sae`), or a --strategy that needs none (maxmin, nearest, random, topm, "
                "nearest-random)"
            )
        pool = candidates.meta.get("pool")
        if pool is not None and cfg.settings.selection.negatives > int(pool):
            raise UserError(
                f"--negatives {cfg.settings.selection.negatives}: the pools of --candidates {cfg.candidates} "
                f"hold at most {pool} images; ask for at most {pool}, or rerun `misp-dpo candidates` "
                "with a larger --pool"
            )
        inputs = {"candidates": manifest_hash(candidates.root), "embeddings": manifest_hash(embeddings.root)}
        sae_meta = None
        if cfg.sae is not None:
            sae_meta = self._check_sae(cfg.sae, clip)
            inputs["sae"] = manifest_hash(cfg.sae)
        try:
            check_sae_variant(cfg.settings.selection, sae_meta["variant"] if sae_meta else None)
        except ValueError as error:
            raise UserError(f"--sae {cfg.sae}: {error}") from None
        meta = {
            "clip": clip.as_meta(),
            "embeddings_dir": str(embeddings.root.resolve()),
            "candidates_dir": str(candidates.root.resolve()),
            "sae": sae_meta,
            "strategy": cfg.settings.selection.strategy,
            "negatives": cfg.settings.selection.negatives,
            "format": cfg.settings.format,
            "uri_root": str(cfg.settings.uri_root.resolve()) if cfg.settings.uri_root is not None else None,
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
        return schemas.NEGATIVES if cfg.settings.format == "listwise" else schemas.NEGATIVES_PAIRWISE

    def run_task(self, cfg: MineConfig, plan: Plan, ctx: TaskContext) -> None:
        work: MineWork = plan.work
        candidates = read_manifest(work.candidates, "candidates")
        embeddings = read_manifest(work.embeddings, "embed")
        lo, hi = task_rows(work.total, ctx.task, ctx.num_tasks)
        store = ImageStore.load(embeddings)
        encoder = load_sae_encoder(cfg.sae, cfg.device) if cfg.sae is not None else None
        timings = {"read": 0.0, "encode": 0.0, "select": 0.0, "build": 0.0, "write": 0.0}
        with ctx.writer(PREFIX, self.schema(cfg)) as writer:
            started = time.perf_counter()
            for batch in iter_pools(candidates, embeddings, store, lo, hi, cfg.batch_size):
                timings["read"] += time.perf_counter() - started
                table = _mine(cfg, batch, store, encoder, ctx, timings)
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
                f"mine: {outside} image locations are not under --uri-root {cfg.settings.uri_root} and stay "
                "absolute (stats key uris_outside_root)"
            )
        short, dropped = stats.get("short_pairs", 0), stats.get("dropped_short", 0)
        if short:
            what = (
                "dropped (--drop-short)" if dropped else "kept with fewer negatives (--drop-short drops them)"
            )
            LOGGER.warning(
                f"mine: {short} pairs had fewer than {cfg.settings.selection.negatives} candidates; {what}"
            )
        return write_card(out, to_dict(cfg, hashed_only=True), plan.meta, stats)


def write_card(out: Path, config: dict[str, Any], meta: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """README.md and its histogram PNGs next to the shards; returns their names for the manifest."""
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


def _mine(
    cfg: MineConfig,
    batch: PoolBatch,
    store: ImageStore,
    encoder: PoolEncoder | None,
    ctx: TaskContext,
    timings: dict[str, float],
) -> pa.Table:
    mined = mine_pools(
        batch,
        _positives(batch, store),
        Images(store.ids, store.uris),
        cfg.settings,
        cfg.seed,
        encoder,
        timings,
    )
    for failure in mined.failures:
        ctx.fail(*failure)
    for key, n in mined.counts.items():
        ctx.count(key, n)
    return mined.table

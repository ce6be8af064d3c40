"""`misp-dpo publish NEGATIVES --out DIR`: a Hub-ready folder with the images embedded.

Task t of T reads global rows `task_rows(P, t, T)` of the negatives, the core
(`misp_dpo.mining.exports.publish_batch`) reads and checks their images and builds the rows, and
the task writes `data/PREFIX-0000t.parquet`; `finalize` writes the card and its histograms
(`misp_dpo.mining.hub`) and, with `--repo-id`, uploads the folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from misp_dpo import __version__
from misp_dpo.config import option
from misp_dpo.errors import UserError
from misp_dpo.image_uris import read_uri
from misp_dpo.log import log_event
from misp_dpo.mining.card import dataset_name, portable
from misp_dpo.mining.exports import SWIFT_IMAGE_ROWS, SWIFT_TEXT_ROWS, TRL_ROWS, publish_batch
from misp_dpo.mining.hub import DATA_DIR, SHARD_PREFIXES, hub_card, upload
from misp_dpo.mining.plots import gather_fields
from misp_dpo.mining.publish import HF_ROWS, PublishSettings
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.io import atomic_path, iter_row_range, task_rows
from misp_dpo.pipelines.manifest import manifest_hash, read_manifest
from misp_dpo.pipelines.stage import Plan, ShardedConfig, Stage, TaskContext

SCHEMAS = {
    ("hf", "train"): HF_ROWS,
    ("swift", "rejected_images"): SWIFT_IMAGE_ROWS,
    ("swift", "rejected_response"): SWIFT_TEXT_ROWS,
    ("trl", "train"): TRL_ROWS,
}


@dataclass(frozen=True, kw_only=True)
class PublishConfig(ShardedConfig):
    negatives: Path = option(help="output folder of `misp-dpo mine`", argument=True, hashed=False)
    settings: PublishSettings = option(PublishSettings(), "what is published and how it is described")
    image_root: Path | None = option(
        None,
        "folder that relative image locations are resolved against (mine's --uri-root, wherever it "
        "now lives); default: the negatives folder",
        hashed=False,
    )
    repo_id: str = option("", "upload the folder to this Hub dataset repo (needs a token)", hashed=False)
    dry_run: bool = option(False, "with --repo-id: list what would go up, upload nothing", hashed=False)
    batch_size: int = option(256, "pairs whose images are read and written together", hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dry_run and not self.repo_id:
            raise ValueError("dry_run lists what --repo-id would upload; give --repo-id too")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class PublishWork:
    shards: list[Path]
    rows: list[int]
    root: Path  # what relative uris are resolved against


class PublishStage(Stage[PublishConfig]):
    """Write the negatives as a self-contained Hub dataset folder (hf, swift or trl rows)."""

    name = "publish"
    config = PublishConfig

    def plan(self, cfg: PublishConfig) -> Plan:
        negatives = read_manifest(cfg.negatives, "mine", "NEGATIVES")
        if negatives.meta.get("format", "listwise") != "listwise":
            raise UserError(
                f"NEGATIVES {cfg.negatives}: a pairwise export; publish reads the listwise dataset "
                "(mine again without --format pairwise)"
            )
        prefix = schemas.NEGATIVES_SHARD_PREFIX
        shards = negatives.shard_paths(prefix)
        rows = [s.rows or 0 for s in negatives.shards if s.path.startswith(prefix + "-")]
        root = (cfg.image_root or cfg.negatives).resolve()
        if cfg.image_root is not None and not root.is_dir():
            raise UserError(f"--image-root {cfg.image_root}: no such folder")
        meta = {
            "format": cfg.settings.format,
            "negatives": portable({"config": negatives.config, "meta": negatives.meta}),
            "pretty_name": cfg.settings.pretty_name
            or f"misp-dpo negatives: {dataset_name(cfg.negatives.resolve())}",
        }
        inputs = {"negatives": manifest_hash(cfg.negatives)}
        return Plan(num_tasks=cfg.tasks, inputs=inputs, meta=meta, work=PublishWork(shards, rows, root))

    def run_task(self, cfg: PublishConfig, plan: Plan, ctx: TaskContext) -> None:
        work: PublishWork = plan.work
        lo, hi = task_rows(sum(work.rows), ctx.task, ctx.num_tasks)
        fmt = cfg.settings.format
        writers = {
            prefix: ctx.writer(f"{DATA_DIR}/{prefix}", SCHEMAS[(fmt, prefix)])
            for prefix in SHARD_PREFIXES[fmt]
        }
        try:
            for batch in iter_row_range(work.shards, work.rows, lo, hi, batch_size=cfg.batch_size):
                table = pa.Table.from_batches([batch])
                published = publish_batch(table, lambda uri: read_uri(uri, work.root), cfg.settings)
                for prefix, table in published.tables.items():
                    writers[prefix].write(table)
                for key, n in published.counts.items():
                    ctx.count(key, n)
                for item, reason, detail in published.failures:
                    ctx.fail(item, reason, detail)
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        for writer in writers.values():
            writer.close()

    def finalize(self, cfg: PublishConfig, plan: Plan, out: Path, stats: dict[str, Any]) -> list[str]:
        work: PublishWork = plan.work
        values = gather_fields(iter_row_range(work.shards, work.rows, 0, sum(work.rows), ["negatives"]))
        mine = plan.meta["negatives"]
        card = hub_card(
            cfg.settings.format,
            (mine["config"], mine["meta"]),
            stats,
            values,
            plan.meta["pretty_name"],
            cfg.settings.license,
            __version__,
        )
        for name, png in card.histograms.items():
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(png)
        with atomic_path(out / "README.md") as tmp:
            tmp.write_text(card.text, encoding="utf-8")
        return [*card.histograms, "README.md"]

    def deliver(self, cfg: PublishConfig, out: Path) -> None:
        """Upload with --repo-id, also when the folder was published by an earlier run."""
        if cfg.repo_id:
            files = upload(out, cfg.repo_id, cfg.dry_run)
            verb = "would upload" if cfg.dry_run else "uploaded"
            for path, size in files:
                log_event(f"publish: {verb} {path}", repo_id=cfg.repo_id, bytes=size)
            log_event(f"publish: {verb} {len(files)} files", repo_id=cfg.repo_id)

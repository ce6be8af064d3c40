"""`misp-dpo report`: a static HTML page of a negatives dataset (single task).

A seeded sample of pairs with their positive and negatives as thumbnails and scores, score
histograms over the whole dataset, summary counts, (with `--attributes`, the demo corpus's
ground truth) the attributes each negative changed, and (with `--eval`, a `misp-dpo eval` output)
an Evaluation section: base vs trained on POPE and held-out pairs (`misp_dpo.eval.report_section`).
The page, thumbnails and PNGs are written into `--out` and linked relatively, so the folder can be
copied or served as is.
Over the 150-line aim: the page is built by `misp_dpo.mining.report`, but the reads it needs (a seeded
row sample over shards, thumbnails through any uri kind, the embeddings for label-free spread) are
I/O and stay here; the thumbnail writer belongs with a shared image reader (still to move).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from misp_dpo.config import option
from misp_dpo.errors import UserError
from misp_dpo.eval.report_section import CHART, accuracy_chart, check_metrics, evaluation_section
from misp_dpo.image_uris import read_uri
from misp_dpo.mining.attributes import AttributeTable, dataset_quality
from misp_dpo.mining.card import dataset_name
from misp_dpo.mining.label_free import label_free_rows, negative_flags, pair_spread
from misp_dpo.mining.plots import HISTOGRAM_FIELDS, gather_fields, render_histograms
from misp_dpo.mining.report import render_report, shown_pairs, summary_rows, thumbnail
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.embeddings import ImageStore
from misp_dpo.pipelines.io import atomic_path, iter_batches, read_json, sha256_file
from misp_dpo.pipelines.manifest import manifest_hash, read_manifest
from misp_dpo.pipelines.stage import Plan, Stage, StageConfig, TaskContext

PAGE = "index.html"
EVAL_METRICS = "metrics.json"  # what `misp-dpo eval` writes (pipelines/stages/eval.py's METRICS)


@dataclass(frozen=True, kw_only=True)
class ReportConfig(StageConfig):
    negatives: Path = option(help="output folder of `misp-dpo mine` (listwise format)", hashed=False)
    limit: int = option(50, "number of pairs shown (a sample drawn with --seed)")
    attributes: Path | None = option(
        None,
        "ground-truth attributes.parquet (the demo corpus's) to show what each negative changed",
        hashed=False,
    )
    eval: Path | None = option(
        None,
        "output folder of `misp-dpo eval`: adds an Evaluation section (base vs trained on POPE and pairs)",
        hashed=False,
    )
    thumb_size: int = option(128, "largest side of the thumbnails, in pixels")
    near_duplicate: float = option(
        0.95,
        "flag negatives whose CLIP cosine to the positive reaches this as near-duplicates (0.95 suits "
        "pretrained CLIPs; a small CLIP trained on few images puts distinct pictures closer)",
    )
    image_root: Path | None = option(
        None,
        "folder that relative image locations are resolved against (the dataset's --uri-root, "
        "wherever it now lives); default: the dataset folder",
        hashed=False,
    )

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if self.thumb_size < 8:
            raise ValueError(f"thumb_size must be at least 8, got {self.thumb_size}")


class ReportStage(Stage[ReportConfig]):
    """Write a static HTML page with image grids, score histograms and counts of a negatives dataset."""

    name = "report"
    config = ReportConfig

    def plan(self, cfg: ReportConfig) -> Plan:
        negatives = read_manifest(cfg.negatives, "mine", "--negatives")
        if negatives.meta.get("format", "listwise") != "listwise":
            raise UserError(
                f"--negatives {cfg.negatives}: a pairwise export; the report reads the listwise dataset "
                "(mine again without --format pairwise)"
            )
        inputs = {"negatives": manifest_hash(negatives.root)}
        if cfg.attributes is not None:
            _check_attributes(cfg.attributes)
            inputs["attributes"] = sha256_file(cfg.attributes)
        if cfg.eval is not None:
            _read_metrics(cfg.eval)  # a bad folder fails here, in one line, before any work
            inputs["eval"] = manifest_hash(cfg.eval)
        meta = {"negatives_dir": str(negatives.root.resolve()), "strategy": negatives.meta.get("strategy")}
        return Plan(num_tasks=1, inputs=inputs, meta=meta)

    def run_task(self, cfg: ReportConfig, plan: Plan, ctx: TaskContext) -> None:
        negatives = read_manifest(cfg.negatives, "mine")
        shards = negatives.shard_paths(schemas.NEGATIVES_SHARD_PREFIX)
        table = _sample(shards, negatives.rows(schemas.NEGATIVES_SHARD_PREFIX), cfg.limit, cfg.seed)
        attributes = _load_attributes(cfg.attributes) if cfg.attributes is not None else None
        thumbs = _thumbnails(table, cfg.thumb_size, cfg.image_root or negatives.root, ctx)
        values = gather_fields(iter_batches(shards, ["negatives"]))
        flags = negative_flags(values.get("sim_image", np.zeros(0, np.float32)), cfg.near_duplicate)
        pairs = shown_pairs(table.to_pylist(), thumbs, attributes, flags)  # at most --limit rows
        histograms = _histograms(values, ctx)
        name = dataset_name(cfg.negatives.resolve())
        unreadable = int(ctx.counts.get("failures", 0))
        summary = summary_rows(name, negatives.meta, negatives.stats, len(pairs), unreadable)
        quality = label_free_rows(values, flags, _spread(negatives.meta, shards), negatives.stats)
        if attributes is not None:
            quality += _quality_rows(attributes, shards)
        title = f"misp-dpo report: {name} ({negatives.meta.get('strategy', '?')} negatives)"
        evaluation = _evaluation(_read_metrics(cfg.eval), ctx) if cfg.eval is not None else ""
        with atomic_path(ctx.output_file(PAGE)) as tmp:
            page = render_report(title, summary, quality, histograms, pairs, flags, evaluation)
            tmp.write_text(page, encoding="utf-8")
        ctx.count("pairs_shown", len(pairs))


def _check_attributes(path: Path) -> None:
    if not path.is_file():
        raise UserError(
            f"--attributes {path}: no such file; point it at the demo corpus's attributes.parquet"
        )
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowInvalid) as error:
        raise UserError(f"--attributes {path}: not a Parquet file ({error})") from None
    if "image" not in names or len(names) < 2:
        raise UserError(f"--attributes {path}: needs an `image` column and one column per attribute")


def _read_metrics(folder: Path) -> dict[str, Any]:
    """The metrics.json of a finished `misp-dpo eval` output, or a one-line UserError."""
    read_manifest(folder, "eval", "--eval")
    fix = f"rerun `misp-dpo eval ... --out {folder} --overwrite`"
    try:
        metrics = read_json(folder / EVAL_METRICS)
    except FileNotFoundError:
        raise UserError(f"--eval {folder}: no {EVAL_METRICS}; {fix}") from None
    except (OSError, ValueError) as error:
        raise UserError(f"--eval {folder}: unreadable {EVAL_METRICS} ({error}); {fix}") from None
    problem = check_metrics(metrics)
    if problem is not None:
        raise UserError(f"--eval {folder}: {EVAL_METRICS} has {problem}; {fix}")
    return dict(metrics)


def _evaluation(metrics: dict[str, Any], ctx: TaskContext) -> str:
    png = accuracy_chart(metrics)
    if png is not None:
        with atomic_path(ctx.output_file(CHART)) as tmp:
            tmp.write_bytes(png)
    return evaluation_section(metrics, CHART if png is not None else None)


def _load_attributes(path: Path) -> AttributeTable:
    return AttributeTable.from_table(pq.read_table(path), path.resolve().parent)


def _sample(shards: list[Path], total: int, limit: int, seed: int) -> pa.Table:
    """A seeded sample of `limit` rows in dataset order, reading only the batches that hold them."""
    wanted = np.sort(np.random.default_rng(seed).choice(total, size=min(limit, total), replace=False))
    parts, start = [], 0
    for batch in iter_batches(shards):
        lo, hi = np.searchsorted(wanted, [start, start + batch.num_rows])
        if hi > lo:
            parts.append(pa.Table.from_batches([batch]).take(pa.array(wanted[lo:hi] - start)))
        start += batch.num_rows
    return pa.concat_tables(parts) if parts else pa.table({})


def _thumbnails(table: pa.Table, size: int, root: Path, ctx: TaskContext) -> dict[str, str | None]:
    """Thumbnail path (relative to the page) of every image in the sample; None where unreadable."""
    images: dict[str, str] = {}
    if table.num_rows:
        for column in (
            table.column("positive").combine_chunks(),
            table.column("negatives").combine_chunks().flatten(),
        ):
            for image_id, uri in zip(
                column.field("image_id").to_pylist(), column.field("uri").to_pylist(), strict=True
            ):
                images.setdefault(image_id, uri)
    thumbs: dict[str, str | None] = {}
    for image_id, uri in images.items():
        ctx.count("items")
        relative = f"thumbs/{hashlib.sha1(image_id.encode()).hexdigest()[:20]}.png"
        try:
            png = thumbnail(read_uri(uri or "", root), size)
        except (OSError, ValueError) as error:
            ctx.fail(uri or image_id, "unreadable image", str(error))
            thumbs[image_id] = None
            continue
        with atomic_path(ctx.output_file(relative)) as tmp:
            tmp.write_bytes(png)
        thumbs[image_id] = relative
    return thumbs


def _histograms(values: dict[str, np.ndarray], ctx: TaskContext) -> list[tuple[str, str]]:
    images = render_histograms(values)
    for name, png in images.items():
        with atomic_path(ctx.output_file(name)) as tmp:
            tmp.write_bytes(png)
    return [(name, HISTOGRAM_FIELDS[name[5:-4]]) for name in images]


def _spread(meta: dict[str, Any], shards: list[Path]) -> np.ndarray | None:
    """Per-pair spread of the negatives from mine's embeddings; None when that folder is gone."""
    folder = meta.get("embeddings_dir")
    if not folder or not (Path(folder) / "manifest.json").is_file():
        return None
    store = ImageStore.load(read_manifest(Path(folder), "embed"))
    parts = []
    for batch in iter_batches(shards, ["negatives"]):
        negatives = batch.column(0)
        rows = store.rows(negatives.flatten().field("image_id"))
        if (rows < 0).any():
            return None
        offsets = negatives.offsets.to_numpy()
        parts.append(pair_spread(store.vectors[rows], offsets - offsets[0]))
    return np.concatenate(parts) if parts else None


def _quality_rows(attributes: AttributeTable, shards: list[Path]) -> list[tuple[str, str]]:
    """Ground-truth quality over the whole dataset (see misp_dpo.mining.attributes)."""
    q = dataset_quality(attributes, iter_batches(shards, ["positive", "negatives"]))
    return [
        (
            "false negatives (share of negatives with every attribute of the positive)",
            f"{q.false_negative_rate:.2%}",
        ),
        ("hardness (mean attributes changed; lower = harder)", f"{q.hardness:.2f}"),
        ("coverage (distinct attribute types changed per pair / types)", f"{q.coverage:.2f}"),
        ("images not in the attribute table", str(q.unmatched)),
    ]

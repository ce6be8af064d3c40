"""`misp-dpo sae`: train the SAE that mining scores candidates with (docs/method.md), one task.

Reads `candidates/` and, through its manifest, the embeddings; hands the core (`misp_dpo.sae`) a
`Dataset` that streams pool batches (paper: pairs with their candidates) or images (topk) by
global row range, so data larger than memory trains too; writes `sae.safetensors`, `cfg.json`,
`metrics.json` and `curves.png`. A training checkpoint under `_checkpoint.pt` lets a killed run
resume where it stopped (with the same result on CPU); it is deleted once the outputs exist.

Over the 150-line aim: two dataset builders over the shards (paper: pools by pair; topk: images),
the file checkpointer and four outputs; the builders belong in `misp_dpo.sae.data` (still to move).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from misp_dpo.config import option
from misp_dpo.errors import UserError
from misp_dpo.log import log_event
from misp_dpo.pipelines.embeddings import ClipModelInfo, ImageStore, upstream_embeddings
from misp_dpo.pipelines.io import atomic_path, iter_batches, write_json
from misp_dpo.pipelines.manifest import Manifest, manifest_hash, read_manifest
from misp_dpo.pipelines.pools import iter_pools
from misp_dpo.pipelines.stage import Plan, Stage, StageConfig, TaskContext, TaskResources
from misp_dpo.sae.checkpoint import CONFIG, WEIGHTS, sae_device, write_config, write_weights
from misp_dpo.sae.config import SaeSettings
from misp_dpo.sae.data import Dataset, PoolChunk, VectorChunk, concat, heldout_mask
from misp_dpo.sae.plots import plot_curves
from misp_dpo.sae.stats import UnusableInput
from misp_dpo.sae.trainer import TrainSettings, train_sae

CHECKPOINT = "_checkpoint.pt"
CHECKPOINT_SECONDS = 300.0
READ_PAIRS = 256  # pairs per pool batch while reading (each is gathered as (P, K, D) float32)


@dataclass(frozen=True, kw_only=True)
class SaeConfig(StageConfig):
    candidates: Path = option(
        help="a `candidates` output folder (its manifest names the embeddings)", hashed=False
    )
    out: Path = option(
        help="output folder for sae.safetensors, cfg.json, metrics.json, curves.png", hashed=False
    )
    settings: SaeSettings = option(SaeSettings(), "the SAE and its training")
    heldout: float = option(
        0.1, "share of pairs (paper) or images (topk) held out for the metrics, by id hash"
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: the GPU when one is visible", hashed=False)
    preload_gb: float = option(
        -1.0,
        "keep the training data in (GPU) memory when it fits this many GB, else stream it from the shards "
        "each epoch (same result either way); -1: half the free GPU memory or a quarter of the free RAM",
        hashed=False,
    )

    def __post_init__(self) -> None:
        if not 0 <= self.heldout < 1:
            raise ValueError(f"heldout must be in [0, 1), got {self.heldout}")


@dataclass(frozen=True)
class SaeWork:
    candidates: Path
    embeddings: Path


class SaeStage(Stage[SaeConfig]):
    """Train the sparse autoencoder (paper: fused-difference sigmoid SAE; topk: TopK SAE on images)."""

    name = "sae"
    config = SaeConfig
    resources = TaskResources(cpus=1.0, gpus=1.0)

    def plan(self, cfg: SaeConfig) -> Plan:
        candidates = read_manifest(cfg.candidates, "candidates", "--candidates")
        embeddings, clip = upstream_embeddings(candidates, "--candidates")
        if "clip" in candidates.meta:
            clip.check_same(
                ClipModelInfo.from_meta(candidates.meta, "--candidates"), f"--candidates {cfg.candidates}"
            )
        _check_dimensions(embeddings, clip.dim)
        if candidates.rows("candidates") == 0:
            raise UserError(f"--candidates {cfg.candidates}: holds no pairs; nothing to train on")
        latents = cfg.settings.latents or (128 if cfg.settings.variant == "paper" else 8 * clip.dim)
        if cfg.settings.variant == "topk" and cfg.settings.k > latents:
            k = cfg.settings.k
            raise UserError(f"--k {k} exceeds --latents {latents}; choose k <= latents (default 32)")
        inputs = {"candidates": manifest_hash(candidates.root), "embeddings": manifest_hash(embeddings.root)}
        meta = {
            "clip": clip.as_meta(),
            "variant": cfg.settings.variant,
            "latents": latents,
            "embeddings_dir": str(embeddings.root.resolve()),
            "candidates_dir": str(candidates.root.resolve()),
        }
        return Plan(num_tasks=1, inputs=inputs, meta=meta, work=SaeWork(candidates.root, embeddings.root))

    def run_task(self, cfg: SaeConfig, plan: Plan, ctx: TaskContext) -> None:
        work: SaeWork = plan.work
        candidates, embeddings = (
            read_manifest(work.candidates, "candidates"),
            read_manifest(work.embeddings, "embed"),
        )
        store = ImageStore.load(embeddings)
        _check_finite(store, embeddings)
        dataset = (
            _paper_dataset(cfg, candidates, embeddings, store)
            if cfg.settings.variant == "paper"
            else _topk_dataset(cfg, store)
        )
        settings = TrainSettings(
            **vars(cfg.settings),
            seed=cfg.seed,
            device=sae_device(cfg.device),
            preload_bytes=-1 if cfg.preload_gb < 0 else int(cfg.preload_gb * 2**30),
        )
        checkpoint = ctx.out / CHECKPOINT
        try:
            result = train_sae(dataset, settings, _FileCheckpointer(checkpoint))
        except UnusableInput as error:
            raise UserError(
                f"--candidates {cfg.candidates}: {error}; check the inputs or --heldout"
            ) from None
        _write_outputs(ctx, cfg, plan, result)
        checkpoint.unlink(missing_ok=True)
        ctx.count("samples", result.stats.samples)
        ctx.count("pairs" if cfg.settings.variant == "paper" else "images", result.stats.items)
        ctx.count("heldout_samples", result.metrics.get("heldout_samples", 0))
        ctx.count("steps", result.settings.steps)


def _check_dimensions(embeddings: Manifest, dim: int) -> None:
    """Every vector column must have the D its manifest names, before any work."""
    for prefix, column in (("images", "embedding"), ("pairs", "prompt_embedding")):
        for path in embeddings.shard_paths(prefix)[:1]:
            schema = pq.read_schema(path)
            width = getattr(schema.field(column).type, "list_size", None) if column in schema.names else None
            if width != dim:
                raise UserError(
                    f"{path}: column {column} has dimension {width}, but {embeddings.root}/manifest.json "
                    f"says D={dim}; rerun `misp-dpo embed` into a fresh folder"
                )


def _check_finite(store: ImageStore, embeddings: Manifest) -> None:
    finite = np.isfinite(store.vectors).all(axis=1)
    if not finite.all():
        first = store.ids[np.flatnonzero(~finite)[0]].decode()
        raise UserError(
            f"{embeddings.root}: {int((~finite).sum())} image embedding(s) hold NaN or inf (first: image_id "
            f"{first}); re-embed those images or drop them, then rerun `misp-dpo candidates`"
        )


def _topk_dataset(cfg: SaeConfig, store: ImageStore) -> Dataset:
    ids = store.ids
    heldout = np.concatenate(
        [
            heldout_mask([i.decode() for i in ids[lo : lo + 65536]], cfg.heldout)
            for lo in range(0, len(ids), 65536)
        ]
    )
    vectors = store.vectors
    return Dataset(len(ids), heldout, lambda lo, hi: VectorChunk(vectors[lo:hi]))


def _paper_dataset(cfg: SaeConfig, candidates: Manifest, embeddings: Manifest, store: ImageStore) -> Dataset:
    """Pairs as items: held-out flags by pair id and the widest pool, in one pass over the candidates."""
    flags, width = [], 0
    for batch in iter_batches(candidates.shard_paths("candidates"), ["pair_id", "candidates"]):
        flags.append(heldout_mask(batch.column(0).to_pylist(), cfg.heldout))
        lengths = pc.list_value_length(batch.column(1))
        width = max(width, int(pc.max(lengths).as_py() or 0))
    if width == 0:
        raise UserError(f"--candidates {candidates.root}: every pool is empty; rerun `misp-dpo candidates`")
    heldout = np.concatenate(flags)
    reader = _PoolReader(candidates, embeddings, store, width)
    return Dataset(len(heldout), heldout, reader, store.vectors, width)


class _PoolReader:
    """Pairs [lo, hi) as a compact `PoolChunk`: candidate rows into the store instead of vectors."""

    def __init__(self, candidates: Manifest, embeddings: Manifest, store: ImageStore, width: int) -> None:
        self.candidates, self.embeddings, self.store, self.width = candidates, embeddings, store, width

    def __call__(self, lo: int, hi: int) -> PoolChunk:
        parts = []
        for batch in iter_pools(self.candidates, self.embeddings, self.store, lo, hi, READ_PAIRS):
            bad = ~np.isfinite(batch.prompt).all(axis=1)
            if bad.any():
                pair = batch.pairs.column("pair_id")[int(np.flatnonzero(bad)[0])].as_py()
                raise UserError(
                    f"{self.embeddings.root}: pair {pair} has a NaN or inf prompt embedding; "
                    "re-embed the pairs or drop that pair, then rerun `misp-dpo candidates`"
                )
            rows = np.full((len(batch), self.width), -1, dtype=np.int64)
            rows[:, : batch.rows.shape[1]] = batch.rows
            parts.append(PoolChunk(batch.positive.astype(np.float16), batch.prompt.astype(np.float16), rows))
        return concat(parts)


class _FileCheckpointer:
    """The full training state in one file, written atomically every few minutes."""

    def __init__(self, path: Path) -> None:
        self.path, self.last = path, time.monotonic()

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a checkpoint is only a shortcut: start over without it
            log_event("sae: ignoring an unreadable checkpoint", path=str(self.path), error=str(error)[:200])
            return None

    def save(self, state: dict[str, Any]) -> None:
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        return time.monotonic() - self.last >= CHECKPOINT_SECONDS


def _write_outputs(ctx: TaskContext, cfg: SaeConfig, plan: Plan, result: Any) -> None:
    training = {k: v for k, v in asdict(result.settings).items() if k not in ("device", "preload_bytes")}
    extra = {
        "clip": plan.meta["clip"],
        "inputs": plan.inputs,
        "embedding_dim": result.spec.dim,
        "normalisation": result.stats.describe(),
        "training": {**training, "heldout_fraction": cfg.heldout},
    }
    with atomic_path(ctx.output_file(WEIGHTS)) as tmp:
        write_weights(result.model, tmp)
    with atomic_path(ctx.output_file(CONFIG)) as tmp:
        write_config(result.spec, extra, tmp)
    metrics = {
        "variant": cfg.settings.variant,
        **result.metrics,
        "final_train": {k: v[-1] for k, v in result.history.items()},
    }
    write_json(metrics, ctx.output_file("metrics.json"))
    with atomic_path(ctx.output_file("curves.png")) as tmp:
        plot_curves(result.history, result.metrics, cfg.settings.variant, tmp)
    summary = (
        "fvu",
        "cosine",
        "l0",
        "mean_activation",
        "dead_fraction",
        "dense_fraction",
        "saturated_fraction",
    )
    log_event(
        "sae held-out metrics",
        variant=cfg.settings.variant,
        **{k: round(float(result.metrics[k]), 4) for k in summary if k in result.metrics},
        samples_per_second=round(result.throughput),
    )

"""Synthetic inputs for tests and benchmarks: clustered unit vectors and stage-shaped folders.

Real stage outputs need a CLIP model and the stages before them; these helpers write the exact
on-disk format of a stage (through the real runner, so manifests and checksums are genuine) from
arrays made in memory, so each stage and its benchmark can run on seeded data at any scale.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from misp_dpo.config import option
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.embeddings import EMBED_STAGE, ClipModelInfo
from misp_dpo.pipelines.io import numpy_to_vectors
from misp_dpo.pipelines.manifest import Manifest, manifest_hash
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stage import Plan, ShardedConfig, Stage, TaskContext


def clustered_unit_vectors(
    n: int, dim: int, clusters: int, spread: float, rng: np.random.Generator, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, cluster labels): L2-normalised points around random centres, like CLIP embeddings.

    Generated in blocks so that a million 512-d vectors never need a float64 copy.
    """
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, size=n)
    out = np.empty((n, dim), dtype=dtype)
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        block = centres[labels[lo:hi]] + spread * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[lo:hi] = block
    return out, labels


def fake_image_ids(n: int, salt: str = "") -> pa.Array:
    """Distinct sha1-shaped ids, as `embed` derives from image bytes."""
    return pa.array([hashlib.sha1(f"{salt}{i}".encode()).hexdigest() for i in range(n)], pa.string())


@dataclass(frozen=True, kw_only=True)
class PrewrittenConfig(ShardedConfig):
    """Config of `PrewrittenStage`; the tables themselves travel in `Plan.work`."""

    label: str = option("synthetic", "distinguishes fixtures in the config hash")


class PrewrittenStage(Stage[PrewrittenConfig]):
    """Writes tables built in memory as the output of stage `name`: shards[prefix][task] per task."""

    config = PrewrittenConfig

    def __init__(
        self,
        name: str,
        shards: dict[str, list[pa.Table]],
        meta: dict[str, Any] | None = None,
        inputs: dict[str, str] | None = None,
    ) -> None:
        self.name = name  # type: ignore[misc]
        self.shards, self.meta, self.inputs = shards, meta or {}, inputs or {}

    def plan(self, cfg: PrewrittenConfig) -> Plan:
        return Plan(num_tasks=cfg.tasks, inputs=self.inputs, meta=self.meta, work=self.shards)

    def run_task(self, cfg: PrewrittenConfig, plan: Plan, ctx: TaskContext) -> None:
        for prefix, tables in plan.work.items():
            with ctx.writer(prefix, tables[ctx.task].schema) as writer:
                writer.write(tables[ctx.task])
            ctx.count(prefix, tables[ctx.task].num_rows)


def _split(table: pa.Table, tasks: int) -> list[pa.Table]:
    bounds = [t * table.num_rows // tasks for t in range(tasks + 1)]
    return [table.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def write_prewritten(
    out: Path,
    name: str,
    tables: dict[str, pa.Table],
    tasks: int = 1,
    meta: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
    label: str = "synthetic",
) -> Manifest:
    """Write whole tables as stage `name`'s output, each split into `tasks` contiguous shards."""
    shards = {prefix: _split(table, tasks) for prefix, table in tables.items()}
    stage = PrewrittenStage(name, shards, meta, inputs)
    manifest = run_stage(stage, PrewrittenConfig(out=out, tasks=tasks, label=label), RunOptions())
    assert manifest is not None
    return manifest


def write_embeddings(
    out: Path,
    images: np.ndarray,
    pair_image_rows: np.ndarray,
    prompt_embeddings: np.ndarray,
    chosen_embeddings: np.ndarray,
    tasks: int = 1,
    label: str = "synthetic",
    uris: pa.Array | None = None,
) -> Manifest:
    """An `embed`-format folder: `images` (N, D) unit vectors, pairs pointing at image rows."""
    dim = images.shape[1]
    image_ids = fake_image_ids(len(images), label)
    n_pairs = len(pair_image_rows)
    uris = uris if uris is not None else pa.array([f"mem://{label}/{i}.png" for i in range(len(images))])
    image_table = pa.table(
        {"image_id": image_ids, "uri": uris, "embedding": numpy_to_vectors(images)},
        schema=schemas.images(dim),
    )
    pairs = pa.table(
        {
            "pair_id": [f"pair-{i:07d}" for i in range(n_pairs)],
            "prompt": [f"prompt {i}" for i in range(n_pairs)],
            "chosen": [f"chosen {i}" for i in range(n_pairs)],
            "rejected": [f"rejected {i}" for i in range(n_pairs)],
            "image_id": image_ids.take(pa.array(pair_image_rows)),
            "prompt_embedding": numpy_to_vectors(prompt_embeddings),
            "chosen_embedding": numpy_to_vectors(chosen_embeddings),
        },
        schema=schemas.pair_embeddings(dim),
    )
    clip = ClipModelInfo(model=label, pretrained="", fingerprint=f"fake:{label}", dim=dim)
    return write_prewritten(
        out,
        EMBED_STAGE,
        {"images": image_table, "pairs": pairs},
        tasks,
        {"clip": clip.as_meta()},
        label=label,
    )


def write_candidates(
    out: Path, embeddings: Manifest, pool_rows: np.ndarray, images: np.ndarray, tasks: int = 1
) -> Manifest:
    """A `candidates`-format folder: `pool_rows` (P, K) image rows per pair, -1 = shorter pool.

    Similarities are computed from `images` and the pairs' prompt embeddings as the stage would.
    Built row by row in Python: for test-sized inputs only.
    """
    from misp_dpo.pipelines.io import read_table, vectors_to_numpy

    pairs = read_table(embeddings.shard_paths("pairs"), ["pair_id", "image_id", "prompt_embedding"])
    store_ids = read_table(embeddings.shard_paths("images"), ["image_id"]).column(0)
    row_of = {image_id: row for row, image_id in enumerate(store_ids.to_pylist())}
    positive = images[[row_of[i] for i in pairs.column("image_id").to_pylist()]]
    prompt = vectors_to_numpy(pairs.column("prompt_embedding"))
    pools = []
    for p, rows in enumerate(pool_rows):
        rows = rows[rows >= 0]
        pools.append(
            [
                {
                    "image_id": store_ids[int(r)].as_py(),
                    "sim_image": float(images[r] @ positive[p]),
                    "sim_prompt": float(images[r] @ prompt[p]),
                    "rank": k,
                }
                for k, r in enumerate(rows)
            ]
        )
    table = pa.table(
        {"pair_id": pairs.column("pair_id"), "image_id": pairs.column("image_id"), "candidates": pools},
        schema=schemas.CANDIDATES,
    )
    inputs = {"embeddings": manifest_hash(embeddings.root)}
    meta = {**embeddings.meta, "embeddings_dir": str(embeddings.root.resolve()), "pool": pool_rows.shape[1]}
    return write_prewritten(out, "candidates", {"candidates": table}, tasks, meta, inputs)


def write_random_sae(
    out: Path, clip: dict[str, Any], variant: str = "paper", latents: int = 16, seed: int = 0
) -> Path:
    """An untrained SAE (seeded random init) in the sae format, registered as a finished `sae` output.

    The real model class and safetensors file, only without training: what `mine` tests and the
    mine benchmark need (scores are then arbitrary but deterministic, and the timing is real).
    """
    import torch

    from misp_dpo.sae import SaeSpec
    from misp_dpo.sae.checkpoint import CONFIG, WEIGHTS, write_config, write_weights

    dim = int(clip["dim"])
    marker = pa.table({"variant": [variant]}, schema=pa.schema([("variant", pa.string())]))
    write_prewritten(out, "sae", {"untrained": marker}, meta={"clip": clip}, label=f"{variant}-{seed}")
    spec = SaeSpec(variant, dim=dim, latents=latents, k=min(32, latents))  # type: ignore[arg-type]
    model = spec.build()
    generator = torch.Generator().manual_seed(seed)
    model.initialise(generator, torch.zeros((dim, dim) if variant == "paper" else (dim,)), 2.0)
    with torch.no_grad():
        model.W_enc.add_(0.5 * torch.randn(model.W_enc.shape, generator=generator) / dim**0.5)
    write_weights(model, out / WEIGHTS)
    write_config(spec, {"clip": clip}, out / CONFIG)
    return out


def random_negatives_table(
    corpus: Path, pairs: int, negatives: int = 3, pool: int = 8, seed: int = 0
) -> pa.Table:
    """A listwise `negatives` table (schema NEGATIVES) on a `synth` corpus, without CLIP or an SAE.

    Pair i is the corpus's pair i with its own image as the positive; its pool holds `pool` other
    images with made-up scores s, proposal q = softmax(s) over the pool (so the kept q sum to <= 1),
    and the `negatives` best-scored are kept, as `mine` would. Uris are absolute file paths.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(corpus / "pairs.parquet").slice(0, pairs)
    paths = [
        str((corpus / p).resolve())
        for p in pq.read_table(corpus / "pairs.parquet").column("image").to_pylist()
    ]
    ids = [hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in paths]
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(table.num_rows):
        others = rng.choice(np.delete(np.arange(len(paths)), i), size=pool, replace=False)
        scores = rng.normal(size=pool)
        q = np.exp(scores - scores.max())
        q /= q.sum()
        keep = np.argsort(-scores)[:negatives]
        rows.append(
            [
                {
                    "image_id": ids[others[k]],
                    "uri": paths[others[k]],
                    "rank": r,
                    "score": float(scores[k]),
                    "proposal": float(q[k]),
                    "sim_image": None,
                    "sim_prompt": None,
                    "recon_error": None,
                    "deviation": None,
                    "diversity_gain": None,
                }
                for r, k in enumerate(keep)
            ]
        )
    return pa.table(
        {
            "pair_id": table.column("id"),
            "prompt": table.column("prompt"),
            "chosen": table.column("chosen"),
            "rejected": table.column("rejected"),
            "positive": [{"image_id": ids[i], "uri": paths[i]} for i in range(table.num_rows)],
            "negatives": rows,
        },
        schema=schemas.NEGATIVES,
    )


def write_negatives(
    out: Path,
    corpus: Path,
    pairs: int,
    negatives: int = 3,
    pool: int = 8,
    seed: int = 0,
    table: pa.Table | None = None,
) -> Manifest:
    """A finished `mine` output (`train-00000.parquet`, real manifest) from `table` or random negatives."""
    table = table if table is not None else random_negatives_table(corpus, pairs, negatives, pool, seed)
    meta = {"negatives": negatives, "strategy": "synthetic", "format": "listwise"}
    return write_prewritten(
        out, "mine", {"train": table}, meta=meta, label=f"negatives-{pairs}-{negatives}-{seed}"
    )

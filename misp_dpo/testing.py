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
from misp_dpo.pipelines.runner import Plan, RunOptions, ShardedConfig, Stage, TaskContext, run_stage


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
    meta = {**embeddings.meta, "embeddings_dir": str(embeddings.root.resolve())}
    return write_prewritten(out, "candidates", {"candidates": table}, tasks, meta, inputs)

"""Synthetic inputs for tests and benchmarks: clustered unit vectors and embed-shaped folders.

Real stage outputs need a CLIP model; these let the candidates, SAE and mine stages (and their
benchmarks) run on seeded vectors with the exact on-disk format `embed` writes, at any scale.
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
from misp_dpo.pipelines.io import numpy_to_vectors, task_rows
from misp_dpo.pipelines.manifest import Manifest
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
class ArrayEmbedConfig(ShardedConfig):
    """Writes given arrays as an `embed` output. Not a CLI stage: arrays travel in `Plan.work`."""

    label: str = option("synthetic", "names the fake CLIP model (its fingerprint)")


class ArrayEmbedStage(Stage[ArrayEmbedConfig]):
    """An `embed`-format writer for arrays made in memory."""

    name = EMBED_STAGE
    config = ArrayEmbedConfig

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = data or {}

    def plan(self, cfg: ArrayEmbedConfig) -> Plan:
        dim = self.data["images"].shape[1]
        clip = ClipModelInfo(model=cfg.label, pretrained="", fingerprint=f"fake:{cfg.label}", dim=dim)
        return Plan(num_tasks=cfg.tasks, meta={"clip": clip.as_meta()}, work=self.data)

    def run_task(self, cfg: ArrayEmbedConfig, plan: Plan, ctx: TaskContext) -> None:
        data, dim = plan.work, plan.work["images"].shape[1]
        lo, hi = task_rows(len(data["images"]), ctx.task, ctx.num_tasks)
        with ctx.writer("images", schemas.images(dim)) as writer:
            writer.write(
                pa.table(
                    {
                        "image_id": data["image_ids"][lo:hi],
                        "uri": data["uris"][lo:hi],
                        "embedding": numpy_to_vectors(data["images"][lo:hi]),
                    }
                )
            )
        lo, hi = task_rows(len(data["pair_ids"]), ctx.task, ctx.num_tasks)
        with ctx.writer("pairs", schemas.pair_embeddings(dim)) as writer:
            writer.write(
                pa.table(
                    {
                        "pair_id": data["pair_ids"][lo:hi],
                        "prompt": data["prompts"][lo:hi],
                        "chosen": data["chosen"][lo:hi],
                        "rejected": data["rejected"][lo:hi],
                        "image_id": data["pair_image_ids"][lo:hi],
                        "prompt_embedding": numpy_to_vectors(data["prompt_embeddings"][lo:hi]),
                        "chosen_embedding": numpy_to_vectors(data["chosen_embeddings"][lo:hi]),
                    }
                )
            )
        ctx.count("images", len(data["images"][lo:hi]))


def write_embeddings(
    out: Path,
    images: np.ndarray,
    pair_image_rows: np.ndarray,
    prompt_embeddings: np.ndarray,
    chosen_embeddings: np.ndarray,
    tasks: int = 1,
    label: str = "synthetic",
) -> Manifest:
    """Write an `embed`-format folder: `images` (N, D) unit vectors, pairs pointing at image rows."""
    image_ids = fake_image_ids(len(images), label)
    n_pairs = len(pair_image_rows)
    data = {
        "images": images,
        "image_ids": image_ids,
        "uris": pa.array([f"mem://{label}/{i}.png" for i in range(len(images))]),
        "pair_ids": pa.array([f"pair-{i:07d}" for i in range(n_pairs)]),
        "prompts": pa.array([f"prompt {i}" for i in range(n_pairs)]),
        "chosen": pa.array([f"chosen {i}" for i in range(n_pairs)]),
        "rejected": pa.array([f"rejected {i}" for i in range(n_pairs)]),
        "pair_image_ids": image_ids.take(pa.array(pair_image_rows)),
        "prompt_embeddings": prompt_embeddings,
        "chosen_embeddings": chosen_embeddings,
    }
    manifest = run_stage(
        ArrayEmbedStage(data), ArrayEmbedConfig(out=out, tasks=tasks, label=label), RunOptions()
    )
    assert manifest is not None
    return manifest

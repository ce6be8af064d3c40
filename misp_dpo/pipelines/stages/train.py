"""`misp-dpo train`: a single-task stage that trains a VLM on a `negatives/` dataset (docs/method.md).

The task reads the dataset and calls the core, `misp_dpo.dpo.trainer.train_policy` (load the policy,
reference pass, training), which writes `adapter/` (safetensors) and `metrics.jsonl`; the reference
log-probs cache, `reference_logps.parquet`, is this stage's file (`ReferenceFile`), reused by a resumed
task or another run's `--reference`. Resume inside the task comes from the trainer's checkpoints; the
runner's completion marker is written only once training has finished. Under torchrun every rank
runs the task's computation; only rank 0 goes through the runner and writes.

Over the 150-line aim: the cache's file format is I/O and stays here: the model and dataset identity
and the pass's failures live in its Parquet metadata, and a cache made for other inputs is refused in
one line (at plan time for `--reference`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from misp_dpo.config import option, to_dict
from misp_dpo.dpo.distributed import DistInfo, from_env
from misp_dpo.dpo.loop import LoopConfig
from misp_dpo.dpo.losses import LossConfig
from misp_dpo.dpo.model import ModelConfig, check_model_spec
from misp_dpo.dpo.reference import Failure
from misp_dpo.dpo.trainer import NothingToTrain, TrainOutcome, train_policy
from misp_dpo.errors import UserError
from misp_dpo.log import log_event
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.io import read_table, write_table
from misp_dpo.pipelines.manifest import manifest_hash, read_manifest
from misp_dpo.pipelines.stage import Plan, Stage, StageConfig, TaskContext, TaskResources

MINE_STAGE = "mine"
PREFIX = schemas.NEGATIVES_SHARD_PREFIX
REFERENCE = "reference_logps.parquet"
IDENTITY_KEY = b"misp_dpo.reference"  # model + dataset identity of a reference cache
FAILURES_KEY = b"misp_dpo.failures"  # pairs the reference pass could not read


@dataclass(frozen=True, kw_only=True)
class TrainConfig(StageConfig):
    negatives: Path = option(
        help="output folder of `misp-dpo mine` (the listwise negatives dataset)", hashed=False
    )
    model: str = option(
        help="image-text-to-text model: a hub id, a local folder, or `tiny` / `tiny-HxL` (a random tiny "
        "LLaVA built offline, for tests and the demo)"
    )
    reference: Path | None = option(
        None,
        "reuse this reference_logps.parquet (from an earlier train output on the same model and dataset) "
        "instead of computing it; refused when made for another model or dataset",
        hashed=False,
    )
    image_root: Path | None = option(
        None,
        "folder that relative image locations are resolved against (the --uri-root the dataset was "
        "mined with, wherever it now lives); default: the dataset folder",
        hashed=False,
    )
    model_options: ModelConfig = option(ModelConfig(), "how the model is loaded and what trains")
    loss: LossConfig = option(LossConfig(), "the MISP-DPO objective")
    loop: LoopConfig = option(LoopConfig(), "the training loop")


@dataclass(frozen=True)
class TrainWork:
    negatives: Path
    shards: list[Path]
    dataset: str  # sha256 of the negatives manifest: what the reference cache is tied to


class TrainStage(Stage[TrainConfig]):
    """Train a VLM to prefer the positive image over its mined negatives (Plackett-Luce + text DPO)."""

    name = "train"
    config = TrainConfig
    resources = TaskResources(cpus=2.0, gpus=1.0, distributed=True)

    def plan(self, cfg: TrainConfig) -> Plan:
        manifest = read_manifest(cfg.negatives, MINE_STAGE, "--negatives")
        shards = manifest.shard_paths(PREFIX)
        if not shards:
            raise UserError(
                f"--negatives {cfg.negatives}: no {PREFIX}-*.parquet shards; rerun `misp-dpo mine`"
            )
        found = schemas.schema_id(pq.read_schema(shards[0]))
        wanted = schemas.schema_id(schemas.NEGATIVES)
        if found != wanted:
            raise UserError(
                f"--negatives {shards[0]}: schema {found!r}, expected {wanted!r} (the listwise format); "
                "mine with --format listwise"
            )
        check_model_spec(cfg.model)
        dataset = manifest_hash(manifest.root)
        if cfg.reference is not None:
            check_reference_file(cfg.reference, {"dataset": dataset, "model": cfg.model})
        meta = {
            "model": cfg.model,
            "pairs": manifest.rows(PREFIX),
            "negatives": manifest.meta.get("negatives"),
            "strategy": manifest.meta.get("strategy"),
            "objective": _objective(cfg.loop.sample_negatives, manifest.meta.get("negatives")),
        }
        work = TrainWork(manifest.root, shards, dataset)
        return Plan(num_tasks=1, inputs={"negatives": dataset}, meta=meta, work=work)

    def run_task(self, cfg: TrainConfig, plan: Plan, ctx: TaskContext) -> None:
        result = train_task(cfg, plan.work, ctx.out, from_env())
        for pair_id, reason, detail in result.failures:
            ctx.fail(pair_id, reason, detail)
        ctx.count("items", result.pairs)
        ctx.count("trained_pairs", result.trained_pairs)
        ctx.count("steps", result.steps)
        # the cache is a data shard of the output: rewritten (same bytes) through the shard writer
        cache = pq.read_table(ctx.out / REFERENCE)
        with ctx.writer_at(REFERENCE, cache.schema) as writer:
            writer.write(cache)
        for name in ["metrics.jsonl", *result.files]:
            ctx.output_file(name)

    def follow(self, cfg: TrainConfig, plan: Plan) -> None:
        """A torchrun rank other than 0: compute alongside rank 0, write nothing."""
        train_task(cfg, plan.work, cfg.out, from_env())


def _objective(m: int, n: int | None) -> str:
    if m == 0 or (n is not None and m >= n):
        return "exact"
    return f"sampled M={m}"


def check_reference_file(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The identity stored in a reference cache; UserError when it is not one or was made for other inputs."""
    if not path.is_file():
        raise UserError(
            f"--reference {path}: no such file; point it at an earlier train output's {REFERENCE}"
        )
    schema = pq.read_schema(path)
    if schemas.schema_id(schema) != schemas.schema_id(schemas.REFERENCE_LOGPS):
        raise UserError(
            f"--reference {path}: not a reference log-probs file (schema {schemas.schema_id(schema)!r})"
        )
    identity = json.loads((schema.metadata or {}).get(IDENTITY_KEY, b"{}"))
    stored = {"dataset": identity.get("dataset"), "model": identity.get("model", {}).get("model")}
    stored |= {k: identity.get("model", {}).get(k) for k in expected.get("model_identity", {})}
    wanted = {
        "dataset": expected["dataset"],
        "model": expected["model"],
        **expected.get("model_identity", {}),
    }
    differ = [k for k in wanted if stored.get(k) != wanted[k]]
    if differ:
        what = "dataset (negatives manifest)" if "dataset" in differ else f"model ({', '.join(differ)})"
        raise UserError(
            f"--reference {path}: made for another {what}; drop --reference to recompute, or pass the "
            f"cache made for --model {expected['model']} on this --negatives"
        )
    return identity


class ReferenceFile:
    """The core's reference cache as `reference_logps.parquet`: `--reference`, else the one an
    interrupted run left in the output; a fresh pass is written to the output."""

    def __init__(self, cfg: TrainConfig, work: TrainWork, out: Path, is_main: bool) -> None:
        self.cfg, self.dataset, self.out, self.is_main = cfg, work.dataset, out, is_main

    def load(self, identity: dict[str, Any]) -> tuple[pa.Table, list[Failure]] | None:
        cached = self.cfg.reference if self.cfg.reference is not None else self.out / REFERENCE
        if not cached.is_file():
            return None
        check_reference_file(
            cached, {"dataset": self.dataset, "model": self.cfg.model, "model_identity": identity}
        )
        stored = json.loads(pq.read_schema(cached).metadata.get(FAILURES_KEY, b"[]"))
        failures: list[Failure] = [(pair_id, reason, detail) for pair_id, reason, detail in stored]
        log_event("reusing reference log-probs", file=str(cached))
        table = pq.read_table(cached)
        if self.is_main and not (self.out / REFERENCE).is_file():  # the output keeps its own copy
            self.save(table, identity, failures)
        return table, failures

    def save(self, table: pa.Table, identity: dict[str, Any], failures: list[Failure]) -> None:
        """Sorted rows, with the identity (and the pass's failures, for a resumed task) in the metadata."""
        metadata = {
            **(schemas.REFERENCE_LOGPS.metadata or {}),
            IDENTITY_KEY: json.dumps({"dataset": self.dataset, "model": identity}, sort_keys=True).encode(),
            FAILURES_KEY: json.dumps(failures).encode(),
        }
        keys = [("pair_id", "ascending"), ("image_id", "ascending"), ("response", "ascending")]
        schema = schemas.REFERENCE_LOGPS.with_metadata(metadata)
        write_table(table.take(pc.sort_indices(table, keys)), self.out / REFERENCE, schema)


def train_task(cfg: TrainConfig, work: TrainWork, out: Path, dist: DistInfo) -> TrainOutcome:
    """What every process runs: read the negatives, train with the core, the reference cache in `out`."""
    facts = {"dataset": str(work.negatives.resolve()), "loss": to_dict(cfg.loss), "loop": to_dict(cfg.loop)}
    try:
        return train_policy(
            read_table(work.shards),
            cfg.image_root or work.negatives,
            out,
            model=cfg.model,
            options=cfg.model_options,
            loss=cfg.loss,
            loop=cfg.loop,
            seed=cfg.seed,
            dist=dist,
            cache=ReferenceFile(cfg, work, out, dist.is_main),
            facts=facts,
        )
    except NothingToTrain as error:
        raise UserError(f"--negatives {work.negatives}: {error}") from None

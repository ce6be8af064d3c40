"""`misp-dpo train`: a single-task stage that trains a VLM on a `negatives/` dataset (docs/method.md).

The task reads the dataset, loads the policy, computes (or reuses) the reference log-probs cache,
trains with the cores in `misp_dpo.dpo`, and writes `adapter/` (safetensors), `metrics.jsonl` and
`reference_logps.parquet`. Resume inside the task comes from the trainer's checkpoints; the runner's
completion marker is written only once training has finished. Under torchrun every rank runs the
task's computation; only rank 0 goes through the runner and writes.

Over the 150-line aim: `train_task` (load, reference pass, training, save) is still here and belongs
in `misp_dpo.dpo` as the train entry point (to move once the dpo edits in flight land).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from misp_dpo.config import option, to_dict
from misp_dpo.dpo.loop import LoopConfig
from misp_dpo.dpo.losses import LossConfig
from misp_dpo.dpo.model import ModelConfig, check_model_spec
from misp_dpo.errors import UserError
from misp_dpo.log import log_event
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.io import read_table, write_table
from misp_dpo.pipelines.manifest import manifest_hash, read_manifest
from misp_dpo.pipelines.stage import Plan, Stage, StageConfig, TaskContext, TaskResources

if TYPE_CHECKING:
    from misp_dpo.dpo.data import PreferenceData
    from misp_dpo.dpo.distributed import DistInfo
    from misp_dpo.dpo.model import Policy

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
class TrainTaskResult:
    """What one process of the train task did: counts for the stats, failures, files rank 0 wrote."""

    pairs: int
    trained_pairs: int
    steps: int
    failures: list[tuple[str, str, str]]  # (pair_id, reason, detail)
    files: list[str]  # relative to the output folder


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
        from misp_dpo.dpo.distributed import from_env

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
        from misp_dpo.dpo.distributed import from_env

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


def _write_reference(table: pa.Table, path: Path, identity: dict[str, Any], failures: list[Any]) -> None:
    """Sorted rows, with the identity (and the pass's failures, for a resumed task) in the metadata."""
    metadata = {
        **(schemas.REFERENCE_LOGPS.metadata or {}),
        IDENTITY_KEY: json.dumps(identity, sort_keys=True).encode(),
        FAILURES_KEY: json.dumps(failures).encode(),
    }
    keys = [("pair_id", "ascending"), ("image_id", "ascending"), ("response", "ascending")]
    write_table(
        table.take(pc.sort_indices(table, keys)), path, schemas.REFERENCE_LOGPS.with_metadata(metadata)
    )


def load_or_compute_reference(
    cfg: TrainConfig, work: TrainWork, out: Path, policy: Policy, data: PreferenceData, dist: DistInfo
) -> tuple[pa.Table, list[tuple[str, str, str]]]:
    """The reference cache: `--reference`, the one an interrupted run left in `out`, or a fresh pass."""
    import numpy as np

    from misp_dpo.dpo.distributed import barrier, gather_objects
    from misp_dpo.dpo.reference import compute_reference

    identity = {"dataset": work.dataset, "model": policy.identity}
    expected = {"dataset": work.dataset, "model": cfg.model, "model_identity": policy.identity}
    cached = cfg.reference if cfg.reference is not None else out / REFERENCE
    if cached.is_file():
        check_reference_file(cached, expected)
        failures = [tuple(f) for f in json.loads(pq.read_schema(cached).metadata.get(FAILURES_KEY, b"[]"))]
        log_event("reusing reference log-probs", file=str(cached))
        table = pq.read_table(cached)
        if dist.is_main and not (out / REFERENCE).is_file():  # the output keeps its own copy
            _write_reference(table, out / REFERENCE, identity, failures)
        barrier()
        return table, failures
    rows = np.arange(dist.rank, len(data), dist.world)
    table, failures = compute_reference(policy, data, rows, cfg.loop.ref_batch_size, dist.is_main)
    parts = gather_objects((table, failures))
    table = pa.concat_tables([t for t, _ in parts])
    failures = sorted(f for _, fs in parts for f in fs)
    if dist.is_main:
        _write_reference(table, out / REFERENCE, identity, failures)
    barrier()
    return table, failures


def train_task(cfg: TrainConfig, work: TrainWork, out: Path, dist: DistInfo) -> TrainTaskResult:
    """Everything one process does for the train task; returns counts, failures and written files."""
    from misp_dpo.dpo import distributed
    from misp_dpo.dpo.data import PreferenceData
    from misp_dpo.dpo.loop import total_steps
    from misp_dpo.dpo.model import load_policy
    from misp_dpo.dpo.reference import align_reference
    from misp_dpo.dpo.trainer import build_state, run_training, save_outputs

    policy = load_policy(cfg.model, cfg.model_options, cfg.seed, dist.local_rank)
    distributed.init(dist, policy.device)
    data = PreferenceData(read_table(work.shards), cfg.image_root or work.negatives)
    table, failures = load_or_compute_reference(cfg, work, out, policy, data, dist)
    reference = align_reference(table, data)
    rows = reference.trainable(data.counts)
    if len(rows) == 0:
        raise UserError(
            f"--negatives {work.negatives}: no pair has readable images and negatives to train on"
        )
    state = build_state(policy, data, reference, rows, cfg.loss, cfg.loop, cfg.seed, dist)
    records = run_training(state, out, show_progress=dist.is_main)
    card = {"dataset": str(work.negatives.resolve()), "loss": to_dict(cfg.loss), "loop": to_dict(cfg.loop)}
    files = save_outputs(policy, cfg.model, cfg.seed, out, card) if dist.is_main else []
    distributed.barrier()
    distributed.shutdown()
    if records:
        log_event("training done", **{k: records[-1][k] for k in ("step", "loss", "accuracy", "margin")})
    steps = total_steps(cfg.loop, len(rows), dist.world)
    return TrainTaskResult(len(data), len(rows), steps, failures, files)

"""The stage runner: tasks, resume, per-sample failures, stats and the manifest (DESIGN §4).

A stage is a `Stage`: `plan` validates the inputs and describes the work before anything runs,
`run_task` does task *i* of *n* through a `TaskContext` (which owns shard writers, counts and
failures), and `finalize` writes the stage's extra files once every task is done. The runner owns
everything else: which tasks are already complete, atomic stats files as completion markers,
refusing a changed config, the failure-rate check and the manifest, written last.
"""

from __future__ import annotations

import os
import shutil
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import pyarrow as pa

from misp_dpo.config import option, stable_hash, to_dict
from misp_dpo.errors import UserError
from misp_dpo.log import LOGGER, log_event
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.io import (
    ShardWriter,
    numbered,
    parquet_rows,
    read_json,
    sha256_file,
    shard_name,
    write_json,
    write_table,
)
from misp_dpo.pipelines.manifest import MANIFEST, FileRecord, Manifest, read_manifest

RUN_FILE = "_run.json"
STATS_DIR = "_stats"
FAILURES_DIR = "_failures"


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Fields every stage has."""

    out: Path = option(help="output folder of this stage", hashed=False)
    seed: int = option(0, "random seed; the same seed and inputs give byte-identical outputs")


@dataclass(frozen=True, kw_only=True)
class ShardedConfig(StageConfig):
    """Fields of stages whose work is split into a fixed number of shards."""

    tasks: int = option(1, "number of shards the work is split into; fixed for an output folder")

    def __post_init__(self) -> None:
        if self.tasks < 1:
            raise ValueError(f"tasks must be at least 1, got {self.tasks}")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How to execute a stage; none of these change its output, so none enter the config hash."""

    workers: int = option(
        0,
        "tasks run concurrently (local processes or Ray actors); 0: one per visible GPU for stages "
        "that use one (candidates: one over all GPUs), else 1 (Ray: as many as the cluster's free "
        "resources hold)",
    )
    executor: Literal["local", "slurm", "ray"] = option(
        "local", "local processes; slurm: this array task's share (SLURM_ARRAY_TASK_ID/COUNT); ray"
    )
    overwrite: bool = option(False, "delete an existing output made with another config and start over")
    max_failure_rate: float = option(0.01, "fail the stage when more than this share of items failed")
    log_format: Literal["auto", "text", "json"] = option(
        "auto", "text with progress bars on a terminal, JSON lines otherwise"
    )
    ray_address: str = option("", "address of an existing Ray cluster (default: start a local one)")
    ray_cpus: float = option(0.0, "CPUs Ray reserves per actor, fractions allowed; 0: the stage's own need")
    finalize_only: bool = option(
        False, "only merge completed tasks' stats into the manifest (the Slurm merge job); runs no task"
    )


@dataclass(frozen=True)
class Plan:
    """What `plan` found out before any work: task count, input manifests, facts for the manifest."""

    num_tasks: int
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> manifest sha256
    meta: dict[str, Any] = field(default_factory=dict)
    work: Any = None  # stage-private, picklable description of the work (e.g. a file listing)


class TaskContext:
    """What a task may touch: its shard writers, counters and the failure table."""

    def __init__(self, out: Path, task: int, num_tasks: int) -> None:
        self.out = out
        self.task = task
        self.num_tasks = num_tasks
        self.counts: Counter[str] = Counter()
        self.failures: list[tuple[str, str, str]] = []
        self._shards: list[Path] = []
        self._files: list[Path] = []

    def writer(self, prefix: str, schema: pa.Schema) -> ShardWriter:
        """The writer of this task's `prefix-NNNNN.parquet` shard."""
        return self.writer_at(shard_name(prefix, self.task), schema)

    def writer_at(self, name: str, schema: pa.Schema) -> ShardWriter:
        """A writer for a Parquet output with a fixed name (single-task stages: `pairs.parquet`)."""
        path = self.out / name
        self._shards.append(path)
        return ShardWriter(path, schema)

    def output_file(self, name: str) -> Path:
        """Register a non-shard output (weights, a plot); the caller writes it atomically."""
        path = self.out / name
        self._files.append(path)
        return path

    def count(self, key: str, n: int | float = 1) -> None:
        self.counts[key] += n

    def fail(self, item: str, reason: str, detail: str = "") -> None:
        """Record a per-sample failure: `item` names the file or row, `reason` is a short class."""
        self.failures.append((item, reason, detail))
        self.counts["failures"] += 1

    def records(self) -> tuple[list[FileRecord], list[FileRecord]]:
        shards = [_record(p, self.out, rows=True) for p in self._shards]
        files = [_record(p, self.out, rows=False) for p in self._files]
        return shards, files


def _record(path: Path, root: Path, rows: bool) -> FileRecord:
    if not path.is_file():
        raise RuntimeError(f"stage registered {path} but did not write it")
    return FileRecord(
        path=str(path.relative_to(root)),
        sha256=sha256_file(path),
        rows=parquet_rows(path) if rows else None,
    )


@dataclass(frozen=True)
class TaskResources:
    """What one task of a stage needs, declared by the stage and read only by executors.

    Local processes pin one GPU each, Ray actors reserve these amounts and Slurm jobs request them;
    `gpus` is used only where GPUs are present, so the same stage runs unchanged on CPU.
    """

    cpus: float = 1.0  # cores one task keeps busy (decoding workers, BLAS threads)
    gpus: float = 0.0  # GPUs one task uses when there are GPUs; 0: a CPU stage
    distributed: bool = False  # one task may span every GPU of a node under torchrun (the trainer)
    # one process drives every GPU it sees (FAISS replicas or shards): the local executor starts one
    # worker, not one per GPU; --workers W splits the GPUs between W workers
    all_gpus: bool = False


C = TypeVar("C", bound=StageConfig)


class Stage(ABC, Generic[C]):
    """A pipeline stage. Subclasses are stateless, so they pickle into worker processes."""

    name: ClassVar[str]
    config: ClassVar[type]
    resources: ClassVar[TaskResources] = TaskResources()

    @abstractmethod
    def plan(self, cfg: C) -> Plan:
        """Validate inputs (raising `UserError` before any work) and describe the tasks."""

    @abstractmethod
    def run_task(self, cfg: C, plan: Plan, ctx: TaskContext) -> None:
        """Do task `ctx.task` of `ctx.num_tasks`: read its inputs, call the core, write its shards."""

    def finalize(self, cfg: C, plan: Plan, out: Path, stats: dict[str, Any]) -> list[str]:
        """Write outputs that need every task (a dataset card); return their paths relative to `out`."""
        return []

    def follow(self, cfg: C, plan: Plan) -> None:
        """Under torchrun, what the ranks other than 0 of a `distributed` stage do: the task's
        computation alongside rank 0 (collectives), writing nothing; rank 0 alone owns the output."""
        raise NotImplementedError(f"stage {self.name} declares distributed=True but has no follow()")


def config_hash(stage: Stage[C], cfg: C, plan: Plan) -> str:
    return stable_hash({"stage": stage.name, "config": to_dict(cfg, hashed_only=True), "inputs": plan.inputs})


def stats_path(out: Path, task: int) -> Path:
    return out / STATS_DIR / numbered(task, "json")


def task_done(out: Path, task: int, expected_hash: str) -> bool:
    path = stats_path(out, task)
    return path.is_file() and read_json(path).get("config_hash") == expected_hash


def run_one_task(stage: Stage[C], cfg: C, plan: Plan, chash: str, task: int) -> dict[str, Any]:
    """Run one task unless its completion marker exists; the marker is written last, atomically."""
    out = cfg.out
    if task_done(out, task, chash):
        return read_json(stats_path(out, task))
    started = time.perf_counter()
    ctx = TaskContext(out, task, plan.num_tasks)
    stage.run_task(cfg, plan, ctx)
    shards, files = ctx.records()
    if ctx.failures:
        item, reason, detail = (list(column) for column in zip(*ctx.failures, strict=True))
        table = pa.table({"item": item, "reason": reason, "detail": detail}, schema=schemas.FAILURES)
        write_table(table, out / FAILURES_DIR / numbered(task, "parquet"), schemas.FAILURES)
    stats = {
        "config_hash": chash,
        "task": task,
        "counts": dict(sorted(ctx.counts.items())),
        "shards": [vars(s) for s in shards],
        "files": [vars(f) for f in files],
    }
    write_json(stats, stats_path(out, task))
    log_event(
        "task done",
        stage=stage.name,
        task=task,
        rows=sum(s.rows or 0 for s in shards),
        failures=ctx.counts.get("failures", 0),
        seconds=round(time.perf_counter() - started, 2),
    )
    return stats


def prepare_output(stage: Stage[C], cfg: C, chash: str, overwrite: bool) -> Manifest | None:
    """Check the output folder against this config; returns its manifest when already complete."""
    out = cfg.out
    run_file = out / RUN_FILE
    ours = run_file.is_file() or (out / MANIFEST).is_file()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; choose a folder")
    if overwrite and ours:
        shutil.rmtree(out)
    elif ours:
        previous = read_json(run_file) if run_file.is_file() else read_json(out / MANIFEST)
        if previous.get("stage") != stage.name:
            raise UserError(f"--out {out}: holds a `{previous.get('stage')}` output; choose another folder")
        if previous["config_hash"] != chash:
            changed = _config_diff(previous.get("config", {}), to_dict(cfg, hashed_only=True))
            raise UserError(
                f"--out {out}: was made with another config or inputs ({changed}); "
                "rerun with --overwrite to replace it, or choose another --out"
            )
        if (out / MANIFEST).is_file():
            return read_manifest(out, stage.name)
    elif out.is_dir() and any(not p.name.startswith(f".{RUN_FILE}.tmp") for p in out.iterdir()):
        # (another Slurm array task may be writing the run file right now: not foreign)
        raise UserError(
            f"--out {out}: exists, is not empty and is not a misp-dpo output; choose another folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        {"stage": stage.name, "config": to_dict(cfg, hashed_only=True), "config_hash": chash}, run_file
    )
    return None


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "the input manifests changed"
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4])


def finalize(stage: Stage[C], cfg: C, plan: Plan, chash: str, max_failure_rate: float) -> Manifest | None:
    """Merge the tasks' stats into the manifest once every task is complete; idempotent."""
    out = cfg.out
    if not all(task_done(out, t, chash) for t in range(plan.num_tasks)):
        return None
    per_task = [read_json(stats_path(out, t)) for t in range(plan.num_tasks)]
    counts: Counter[str] = Counter()
    for stats in per_task:
        counts.update(stats["counts"])
    merged = dict(sorted(counts.items()))
    _check_failure_rate(stage.name, out, merged, max_failure_rate)
    extra = stage.finalize(cfg, plan, out, merged)
    manifest = Manifest(
        stage=stage.name,
        config=to_dict(cfg, hashed_only=True),
        config_hash=chash,
        inputs=plan.inputs,
        meta=plan.meta,
        num_tasks=plan.num_tasks,
        shards=[FileRecord(**s) for stats in per_task for s in stats["shards"]],
        files=[FileRecord(**f) for stats in per_task for f in stats["files"]]
        + [_record(out / name, out, rows=False) for name in extra],
        stats=merged,
        root=out,
    )
    manifest.write(out)
    return manifest


def _check_failure_rate(name: str, out: Path, counts: dict[str, Any], max_rate: float) -> None:
    failed, items = counts.get("failures", 0), counts.get("items", 0)
    if failed:
        LOGGER.warning(f"{name}: {failed} of {items} items failed; reasons in {out / FAILURES_DIR}")
    if items and failed / items > max_rate:
        raise UserError(
            f"{name}: {failed} of {items} items failed ({failed / items:.1%} > --max-failure-rate "
            f"{max_rate:.1%}); see {out / FAILURES_DIR} for each item and reason, fix the inputs or "
            "rerun with a higher --max-failure-rate (completed shards are kept)"
        )


def torchrun_rank() -> int:
    """This process's rank under torchrun (RANK with WORLD_SIZE > 1), else 0."""
    return int(os.environ.get("RANK", "0") or 0) if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0


def _follow(stage: Stage[C], cfg: C, plan: Plan, chash: str, opts: RunOptions) -> None:
    """A non-zero torchrun rank: never touches the output's bookkeeping, only computes with rank 0."""
    manifest = cfg.out / MANIFEST
    complete = manifest.is_file() and read_json(manifest).get("config_hash") == chash
    if not opts.finalize_only and (opts.overwrite or not complete):
        stage.follow(cfg, plan)
    return None


def run_stage(stage: Stage[C], cfg: C, opts: RunOptions) -> Manifest | None:
    """Plan, skip what is done, run this process's share of the tasks, and finalize when all are done."""
    from misp_dpo.pipelines.executors import execute

    if opts.overwrite and opts.executor == "slurm":
        raise UserError(
            "--overwrite with --executor slurm would let array tasks delete each other's work; "
            "delete the output folder before submitting instead"
        )
    if opts.overwrite and opts.finalize_only:
        raise UserError("--overwrite with --finalize-only would delete the tasks it should merge; drop one")
    plan = stage.plan(cfg)
    chash = config_hash(stage, cfg, plan)
    if stage.resources.distributed and torchrun_rank() > 0:
        return _follow(stage, cfg, plan, chash, opts)
    done = prepare_output(stage, cfg, chash, opts.overwrite)
    if done is not None:
        log_event("already complete, skipping", stage=stage.name, out=str(cfg.out))
        return done
    if not opts.finalize_only:
        execute(stage, cfg, plan, chash, opts)
    manifest = finalize(stage, cfg, plan, chash, opts.max_failure_rate)
    if manifest is None and opts.finalize_only:
        missing = [t for t in range(plan.num_tasks) if not task_done(cfg.out, t, chash)]
        raise UserError(
            f"--finalize-only: {stage.name} in {cfg.out} has {len(missing)} unfinished task(s) "
            f"(first: {missing[:5]}); rerun the stage without --finalize-only to complete them"
        )
    if manifest is None:
        log_event("this executor's tasks are done; others are still running", stage=stage.name)
    else:
        log_event("stage complete", stage=stage.name, out=str(cfg.out), **manifest.stats)
    return manifest

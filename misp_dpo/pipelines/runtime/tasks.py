"""One task of a stage: its completion marker, failures table and stats; and how stages run.

`run_one_task` is what every executor (local processes, Slurm array tasks, Ray actors) calls, so
it lives below them and below the runner: runner -> executors -> ray_executor -> tasks, no circle.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pyarrow as pa

from misp_dpo.config import option
from misp_dpo.log import log_event
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.io import (
    SHARD_DIGITS,
    numbered,
    read_json,
    temp_files,
    temp_target,
    write_json,
    write_table,
)
from misp_dpo.pipelines.manifest import MANIFEST
from misp_dpo.pipelines.stage import Plan, Stage, StageConfig, TaskContext

RUN_FILE = "_run.json"
STATS_DIR = "_stats"
FAILURES_DIR = "_failures"

C = TypeVar("C", bound=StageConfig)


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


def stats_path(out: Path, task: int) -> Path:
    return out / STATS_DIR / numbered(task, "json")


def task_done(out: Path, task: int, expected_hash: str) -> bool:
    path = stats_path(out, task)
    return path.is_file() and read_json(path).get("config_hash") == expected_hash


def remove_task_temps(out: Path, task: int, num_tasks: int) -> list[Path]:
    """Delete what a killed earlier attempt of this task was writing, and return it.

    A task owns its shards by name: `PREFIX-NNNNN.SUFFIX`, `_stats/NNNNN.json`, `_failures/NNNNN.parquet`
    with NNNNN its index (every file but the runner's own when the stage has one task). The process id
    in a temporary name never decides: on a shared file system another host's live task may own it.
    """
    own = re.compile(rf"(?:.+-)?{task:0{SHARD_DIGITS}d}\.\w+")
    removed = []
    for tmp in temp_files(out):
        name = temp_target(tmp).name
        single = num_tasks == 1 and not (tmp.parent == out and name in (RUN_FILE, MANIFEST))
        if single or own.fullmatch(name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def run_one_task(stage: Stage[C], cfg: C, plan: Plan, chash: str, task: int) -> dict[str, Any]:
    """Run one task unless its completion marker exists; the marker is written last, atomically."""
    out = cfg.out
    if task_done(out, task, chash):
        return read_json(stats_path(out, task))
    removed = remove_task_temps(out, task, plan.num_tasks)
    if removed:
        log_event("removed temporary files of an interrupted attempt", task=task, files=len(removed))
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

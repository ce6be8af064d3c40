"""A small real stage for runner tests: squares integers, fails on negatives, can crash on demand."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from misp_dpo.config import option
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stage import Plan, ShardedConfig, Stage, TaskContext

SCHEMA = pa.schema(
    [pa.field("x", pa.int64()), pa.field("square", pa.int64())], metadata={b"misp_dpo.schema": b"toy/1"}
)
CRASH_ENV = "TOY_STAGE_CRASH_AT_TASK"


@dataclass(frozen=True, kw_only=True)
class ToyConfig(ShardedConfig):
    n: int = option(100, "numbers 0..n-1, with every 7th negated")
    offset: int = option(0, "added to every square")


class ToyStage(Stage[ToyConfig]):
    """Square numbers."""

    name = "toy"
    config = ToyConfig

    def plan(self, cfg: ToyConfig) -> Plan:
        return Plan(num_tasks=cfg.tasks, meta={"n": cfg.n})

    def run_task(self, cfg: ToyConfig, plan: Plan, ctx: TaskContext) -> None:
        lo, hi = ctx.task * cfg.n // ctx.num_tasks, (ctx.task + 1) * cfg.n // ctx.num_tasks
        with ctx.writer("squares", SCHEMA) as writer:
            for start in range(lo, hi, 5):
                xs = [-x if x % 7 == 3 else x for x in range(start, min(start + 5, hi))]
                good = [x for x in xs if x >= 0]
                for x in xs:
                    if x < 0:
                        ctx.fail(f"x={x}", "negative input", "squares of negatives are not allowed here")
                ctx.count("items", len(xs))
                writer.write(pa.table({"x": good, "square": [x * x + cfg.offset for x in good]}))
                if os.environ.get(CRASH_ENV) == str(ctx.task) and start > lo:
                    raise RuntimeError("simulated crash in the middle of a shard")


def crashed_local_run(folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, ToyConfig]:
    """An uninterrupted reference output, and the config of a run that crashed mid-way through task 2
    (tasks 0 and 1 complete); the crash switch is off again on return."""
    reference = folder / "reference"
    run_stage(ToyStage(), ToyConfig(out=reference, n=90, tasks=4), RunOptions(max_failure_rate=0.5))
    cfg = ToyConfig(out=folder / "resumed", n=90, tasks=4)
    monkeypatch.setenv(CRASH_ENV, "2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(ToyStage(), cfg, RunOptions(max_failure_rate=0.5))
    monkeypatch.delenv(CRASH_ENV)
    return reference, cfg

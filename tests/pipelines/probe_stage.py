"""A stage that records where each of its tasks ran: process, CUDA_VISIBLE_DEVICES, torch threads.

Executor tests use it to see GPU pinning and thread counts without a GPU; it declares a GPU per task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from misp_dpo.config import option
from misp_dpo.errors import UserError
from misp_dpo.pipelines.stage import Plan, ShardedConfig, Stage, TaskContext, TaskResources

SCHEMA = pa.schema(
    [
        pa.field("task", pa.int64()),
        pa.field("pid", pa.int64()),
        pa.field("cuda_visible_devices", pa.string()),
        pa.field("threads", pa.int64()),
    ],
    metadata={b"misp_dpo.schema": b"probe/1"},
)


@dataclass(frozen=True, kw_only=True)
class ProbeConfig(ShardedConfig):
    fail_task: int = option(-1, "this task raises a UserError (-1: none)")


class ProbeStage(Stage[ProbeConfig]):
    """Record where each task ran."""

    name = "probe"
    config = ProbeConfig
    resources = TaskResources(cpus=1.0, gpus=1.0)

    def plan(self, cfg: ProbeConfig) -> Plan:
        return Plan(num_tasks=cfg.tasks)

    def run_task(self, cfg: ProbeConfig, plan: Plan, ctx: TaskContext) -> None:
        import torch

        if ctx.task == cfg.fail_task:
            raise UserError(f"probe: task {ctx.task} was told to fail")
        row = {
            "task": [ctx.task],
            "pid": [os.getpid()],
            "cuda_visible_devices": [os.environ.get("CUDA_VISIBLE_DEVICES")],
            "threads": [torch.get_num_threads()],
        }
        with ctx.writer("probe", SCHEMA) as writer:
            writer.write(pa.table(row, schema=SCHEMA))
        ctx.count("items")


def probe_rows(out: Path) -> list[dict[str, object]]:
    """Every task's record, by task."""
    rows = [row for path in sorted(out.glob("probe-*.parquet")) for row in pq.read_table(path).to_pylist()]
    return sorted(rows, key=lambda r: r["task"])


class CpuProbeStage(ProbeStage):
    """The same probe, declared as a CPU stage."""

    resources = TaskResources(cpus=1.0)

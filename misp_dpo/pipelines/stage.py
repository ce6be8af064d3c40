"""What a stage needs: the Stage / Plan / TaskContext contract every stage implements.

A stage is a `Stage`: `plan` validates the inputs and describes the work before anything runs,
`run_task` does task *i* of *n* through a `TaskContext` (which owns shard writers, counts and
failures), and `finalize` writes the stage's extra files once every task is done. Running stages
(resume, completion markers, executors, the manifest) is `misp_dpo.pipelines.runtime`'s job; this
module imports nothing from it, so stages depend on the contract alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import pyarrow as pa

from misp_dpo.config import option
from misp_dpo.pipelines.io import ShardWriter, parquet_rows, sha256_file, shard_name
from misp_dpo.pipelines.manifest import FileRecord


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
        self.counts[key] += n  # type: ignore[assignment]  # float counts (seconds, rates) too

    def fail(self, item: str, reason: str, detail: str = "") -> None:
        """Record a per-sample failure: `item` names the file or row, `reason` is a short class."""
        self.failures.append((item, reason, detail))
        self.counts["failures"] += 1

    def records(self) -> tuple[list[FileRecord], list[FileRecord]]:
        shards = [file_record(p, self.out, rows=True) for p in self._shards]
        files = [file_record(p, self.out, rows=False) for p in self._files]
        return shards, files


def file_record(path: Path, root: Path, rows: bool) -> FileRecord:
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
    config: ClassVar[type[StageConfig]]
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

    def deliver(self, cfg: C, out: Path) -> None:
        """Act on a complete output, whether this run finished it or found it finished (an upload):
        unlike `finalize`, it runs again on a rerun, and changes nothing in `out`."""

    def follow(self, cfg: C, plan: Plan) -> None:
        """Under torchrun, what the ranks other than 0 of a `distributed` stage do: the task's
        computation alongside rank 0 (collectives), writing nothing; rank 0 alone owns the output."""
        raise NotImplementedError(f"stage {self.name} declares distributed=True but has no follow()")

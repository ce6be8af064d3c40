"""Slurm submission of a pipeline file: one sbatch array per sharded stage, chained with afterok.

`misp-dpo run PIPELINE.toml --executor slurm --submit` writes, per stage in file order:

- an array job whose task i runs `misp-dpo run PIPELINE.toml --only STAGE --executor slurm`, which
  does stage tasks i, i+n, ... (`executors.slurm_tasks`); above the cluster's MaxArraySize the
  stage's tasks are split over several arrays, each told its offset through the environment;
- a merge job after every array of the stage (`--finalize-only`): it writes the manifest from the
  tasks' stats, which the last array task usually did already (finalize is idempotent);
- a plain one-task job instead, for stages with a single task (fit-clip, sae, train, report).

Each stage's jobs wait for the previous stage's last job (`--dependency=afterok`); a failed job
cancels what waits for it. Array tasks requeue on preemption and resume from their completion
markers. Stages already complete when submitting are left out. `--dry-run` prints the scripts.
"""

from __future__ import annotations

import math
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from misp_dpo.config import build_config, flat_fields, option
from misp_dpo.errors import UserError
from misp_dpo.pipelines.io import read_json
from misp_dpo.pipelines.manifest import MANIFEST
from misp_dpo.pipelines.runtime.executors import TASK_COUNT_ENV, TASK_OFFSET_ENV
from misp_dpo.pipelines.runtime.runner import RunOptions, config_hash
from misp_dpo.pipelines.stage import Stage

DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's own default MaxArraySize
Pipeline = list[tuple[Stage[Any], Any, RunOptions]]


@dataclass(frozen=True, kw_only=True)
class SlurmConfig:
    """The `[slurm]` table of a pipeline file; `[slurm.STAGE]` tables override it for one stage."""

    partition: str = option("", "partition of the jobs (--partition); empty: the cluster's default")
    account: str = option("", "account charged for the jobs (--account); empty: your default")
    qos: str = option("", "quality of service (--qos); empty: the default")
    time: str = option("04:00:00", "time limit of one array task or job (--time)")
    cpus_per_task: int = option(0, "CPUs of one task (--cpus-per-task); 0: what the stage declares")
    mem: str = option("16G", "memory of one task (--mem)")
    gpus: int = option(
        0, "GPUs for each task of a stage that can use one (embed, candidates, sae, train); others get none"
    )
    max_array_size: int = option(
        0, "largest array the cluster accepts; 0: MaxArraySize from `scontrol show config`, else 1001"
    )
    array_limit: int = option(0, "array tasks of a stage running at once (--array=...%N); 0: no limit")
    merge_time: str = option("00:30:00", "time limit of the job that merges a stage's stats")
    command: str = option("misp-dpo", "how a job starts misp-dpo, e.g. /path/to/.venv/bin/misp-dpo")
    setup: str = option("", "shell line run before the stage, e.g. `module load cuda`")
    extra: tuple[str, ...] = option((), "more sbatch options for every job, e.g. ['--constraint=h100']")
    dir: str = option("", "folder for the scripts and logs; empty: _slurm beside the first stage's output")

    def __post_init__(self) -> None:
        for name in ("cpus_per_task", "gpus", "max_array_size", "array_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")


@dataclass(frozen=True)
class SlurmJob:
    """One sbatch script and the jobs (by name) it waits for."""

    name: str
    stage: str
    script: str
    after: tuple[str, ...] = ()


def parse_flags(pairs: list[str]) -> dict[str, Any]:
    """`--slurm KEY=VALUE` flags as typed `[slurm]` values (ints as ints, lists comma-separated)."""
    kinds = {f.name: kind for f, kind in flat_fields(SlurmConfig)}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in kinds:
            raise UserError(f"--slurm {pair}: expected KEY=VALUE with KEY one of {', '.join(kinds)}")
        if kinds[key] is int:
            try:
                values[key] = int(value)
            except ValueError:
                raise UserError(f"--slurm {pair}: {key} takes an integer") from None
        else:
            values[key] = value
    return values


def stage_settings(
    table: dict[str, Any], flags: dict[str, Any], pipeline: Pipeline, stages: list[str], where: str
) -> dict[str, SlurmConfig]:
    """Each stage's Slurm settings: `[slurm]`, then `[slurm.STAGE]`, then flags (`stages`: the file's)."""
    common = {k: v for k, v in table.items() if not isinstance(v, dict)}
    settings = {}
    for stage, _, _ in pipeline:
        own = table.get(stage.name, {})
        values = common | own | flags
        if stage.resources.gpus <= 0 and "gpus" not in own:
            values["gpus"] = 0  # `gpus` in [slurm] is for the stages that can use one
        settings[stage.name] = build_config(SlurmConfig, values, f"{where} [slurm.{stage.name}]")
    unknown = sorted(k for k, v in table.items() if isinstance(v, dict) and k not in stages)
    if unknown:
        raise UserError(
            f"{where}: [slurm.{unknown[0]}] names no stage of this file; stages: {', '.join(stages)}"
        )
    return settings


def cluster_max_array_size(scontrol: str = "scontrol") -> int:
    """MaxArraySize from `scontrol show config`, or Slurm's default when it cannot be asked."""
    if shutil.which(scontrol) is None:
        return DEFAULT_MAX_ARRAY_SIZE
    result = subprocess.run([scontrol, "show", "config"], capture_output=True, text=True, check=False)
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", result.stdout, re.MULTILINE)
    return int(found.group(1)) if result.returncode == 0 and found else DEFAULT_MAX_ARRAY_SIZE


def stage_complete(stage: Stage[Any], cfg: Any) -> bool:
    """Whether the stage's output is complete for this config (so it needs no job)."""
    if not (cfg.out / MANIFEST).is_file():
        return False
    try:
        plan = stage.plan(cfg)
    except UserError:
        return False
    return read_json(cfg.out / MANIFEST).get("config_hash") == config_hash(stage, cfg, plan)


def _directives(name: str, settings: SlurmConfig, log: str, cpus: int, gpus: int, after: bool) -> list[str]:
    lines = [f"--job-name={name}", f"--output={log}", "--open-mode=append"]
    lines += [f"--{key}={value}" for key, value in _resources(settings, cpus)]
    if gpus:
        lines.append(f"--gres=gpu:{gpus}")
    lines.append("--requeue")  # preempted tasks run again and resume from their completion markers
    if after:
        lines.append("--kill-on-invalid-dep=yes")  # a failed stage cancels the stages waiting for it
    return lines + [extra.removeprefix("#SBATCH ").strip() for extra in settings.extra]


def _resources(settings: SlurmConfig, cpus: int) -> list[tuple[str, Any]]:
    pairs = [("partition", settings.partition), ("account", settings.account), ("qos", settings.qos)]
    return [(k, v) for k, v in pairs if v] + [
        ("cpus-per-task", cpus),
        ("mem", settings.mem),
        ("time", settings.time),
    ]


def render_script(directives: list[str], chdir: Path, setup: str, env: dict[str, int], command: str) -> str:
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), f"#SBATCH --chdir={chdir}", ""]
    lines += ["set -eo pipefail", *([setup] if setup else [])]
    lines += [f"export {key}={value}" for key, value in env.items()]
    return "\n".join([*lines, f"exec {command}", ""])


@dataclass(frozen=True)
class Submission:
    """What every job of one submission shares."""

    pipeline: Path
    cwd: Path
    directory: Path
    forwarded: tuple[str, ...]  # `misp-dpo run` flags every job repeats (--root, --workers)

    def command(self, settings: SlurmConfig, stage: str, *flags: str) -> str:
        args = ["run", str(self.pipeline), "--only", stage, *flags, "--log-format", "json", *self.forwarded]
        return f"{settings.command} {shlex.join(args)}"

    def script(self, directives: list[str], settings: SlurmConfig, env: dict[str, int], command: str) -> str:
        return render_script(directives, self.cwd, settings.setup, env, command)


def _single_job(
    ctx: Submission, name: str, stage: Stage[Any], settings: SlurmConfig, after: tuple[str, ...]
) -> SlurmJob:
    cpus = settings.cpus_per_task or math.ceil(stage.resources.cpus)
    command = ctx.command(settings, stage.name, "--executor", "local")
    if stage.resources.distributed and settings.gpus > 1:  # one process per GPU of the node
        per_node = f"${{SLURM_GPUS_ON_NODE:-{settings.gpus}}}"
        launcher = f"srun --ntasks=1 torchrun --standalone --nnodes=1 --nproc-per-node={per_node}"
        command = f"{launcher} --no-python {command}"
    log = str(ctx.directory / "logs" / "%x-%j.out")
    directives = _directives(f"misp-{stage.name}", settings, log, cpus, settings.gpus, bool(after))
    return SlurmJob(name, stage.name, ctx.script(directives, settings, {}, command), after)


def _array_jobs(
    ctx: Submission,
    name: str,
    stage: Stage[Any],
    settings: SlurmConfig,
    tasks: int,
    size: int,
    after: tuple[str, ...],
) -> list[SlurmJob]:
    """One array per `size` tasks (MaxArraySize), then the merge job that waits for all of them."""
    cpus = settings.cpus_per_task or math.ceil(stage.resources.cpus)
    command = ctx.command(settings, stage.name, "--executor", "slurm")
    log = str(ctx.directory / "logs" / "%x-%A_%a.out")
    offsets = range(0, tasks, size)
    jobs = []
    for part, offset in enumerate(offsets):
        array = f"0-{min(size, tasks - offset) - 1}" + (
            f"%{settings.array_limit}" if settings.array_limit else ""
        )
        directives = _directives(f"misp-{stage.name}", settings, log, cpus, settings.gpus, bool(after))
        directives.insert(1, f"--array={array}")
        env = {TASK_OFFSET_ENV: offset, TASK_COUNT_ENV: tasks}
        job_name = name if len(offsets) == 1 else f"{name}-{part}"
        jobs.append(SlurmJob(job_name, stage.name, ctx.script(directives, settings, env, command), after))
    merge = replace(settings, time=settings.merge_time)
    log = str(ctx.directory / "logs" / "%x-%j.out")
    directives = _directives(f"misp-{stage.name}-merge", merge, log, 1, 0, True)
    command = ctx.command(settings, stage.name, "--executor", "local", "--finalize-only")
    jobs.append(
        SlurmJob(
            f"{name}-merge",
            stage.name,
            ctx.script(directives, merge, {}, command),
            tuple(j.name for j in jobs),
        )
    )
    return jobs


def plan_jobs(
    ctx: Submission,
    pipeline: Pipeline,
    settings: dict[str, SlurmConfig],
    cluster_max: int,
    numbers: dict[str, int] | None = None,
) -> list[SlurmJob]:
    """Every job of the pipeline's stages, each stage waiting for the previous stage's last job.

    Scripts are named by the stage's position in the file (`numbers`), so they keep their names
    when complete stages are left out.
    """
    jobs: list[SlurmJob] = []
    after: tuple[str, ...] = ()
    for index, (stage, cfg, _) in enumerate(pipeline, start=1):
        own = settings[stage.name]
        tasks = getattr(cfg, "tasks", 1)
        name = f"{(numbers or {}).get(stage.name, index):02d}-{stage.name}"
        if tasks == 1:
            jobs.append(_single_job(ctx, name, stage, own, after))
        else:
            jobs += _array_jobs(ctx, name, stage, own, tasks, own.max_array_size or cluster_max, after)
        after = (jobs[-1].name,)
    return jobs

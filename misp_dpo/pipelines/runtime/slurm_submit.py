"""`misp-dpo run PIPELINE.toml --executor slurm --submit | --dry-run`: load, plan, print or submit.

The scripts come from `slurm.plan_jobs`; this module decides which stages need jobs (those after
the last complete one), where the scripts go, and calls `sbatch --parsable` in order, passing each
job the ids it waits for.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from misp_dpo.errors import UserError
from misp_dpo.log import log_event
from misp_dpo.pipelines.runtime.pipeline_file import (
    Registry,
    load_pipeline,
    read_pipeline,
    select_stages,
    substitute_table,
)
from misp_dpo.pipelines.runtime.slurm import (
    SlurmConfig,
    SlurmJob,
    Submission,
    cluster_max_array_size,
    parse_flags,
    plan_jobs,
    stage_complete,
    stage_settings,
)


def _slurm_table(path: Path, root: str | None) -> dict[str, Any]:
    document, variables = read_pipeline(path, root)
    table = document.get("slurm", {})
    where = f"{path} [slurm]"
    return {
        k: substitute_table(v, variables, f"{where[:-1]}.{k}]") if isinstance(v, dict) else v
        for k, v in substitute_table(table, variables, where).items()
    }


def prepare_submission(
    path: Path,
    registry: Registry,
    *,
    until: str | None = None,
    only: str | None = None,
    root: str | None = None,
    overrides: dict[str, Any] | None = None,
    slurm_flags: list[str] | None = None,
    scontrol: str = "scontrol",
) -> tuple[Path, list[SlurmJob]]:
    """The script folder and every job to submit, validated before anything is written."""
    overrides = overrides or {}
    if overrides.get("executor") != "slurm":
        raise UserError("--submit / --dry-run: add --executor slurm (they write sbatch scripts)")
    if overrides.get("overwrite"):
        raise UserError("--overwrite with --submit: delete the output folders to redo instead")
    everything = load_pipeline(path, registry, root, overrides)
    pipeline = select_stages(everything, registry, path, until, only)
    while pipeline and stage_complete(pipeline[0][0], pipeline[0][1]):
        log_event("already complete, no job", stage=pipeline[0][0].name, out=str(pipeline[0][1].out))
        pipeline = pipeline[1:]
    if not pipeline:
        return Path(), []
    names = [stage.name for stage, _, _ in everything]
    settings = stage_settings(
        _slurm_table(path, root), parse_flags(slurm_flags or []), pipeline, names, str(path)
    )
    first: SlurmConfig = settings[pipeline[0][0].name]
    cwd = Path.cwd()
    directory = cwd / (first.dir or pipeline[0][1].out.parent / "_slurm")
    forwarded = (["--root", root] if root is not None else []) + (
        ["--workers", str(overrides["workers"])] if overrides.get("workers") is not None else []
    )
    ctx = Submission(path.resolve(), cwd, directory, tuple(forwarded))
    needs_cluster = any(s.max_array_size == 0 for s in settings.values())
    cluster_max = cluster_max_array_size(scontrol) if needs_cluster else 0
    return directory, plan_jobs(ctx, pipeline, settings, cluster_max, {n: i for i, n in enumerate(names, 1)})


def _sbatch_line(job: SlurmJob, directory: Path, ids: dict[str, str] | None = None) -> list[str]:
    line = ["sbatch", "--parsable"]
    if job.after:
        deps = [ids[a] if ids is not None else f"<{a}>" for a in job.after]
        line.append("--dependency=afterok:" + ":".join(deps))
    return [*line, str(directory / f"{job.name}.sbatch")]


def describe(directory: Path, jobs: list[SlurmJob]) -> str:
    """The dry run: the sbatch calls `--submit` would make, then every script."""
    if not jobs:
        return "# every stage is complete: nothing to submit\n"
    lines = [f"# {len(jobs)} Slurm jobs; --submit writes these scripts to {directory} and runs:"]
    lines += [f"#   {shlex.join(_sbatch_line(job, directory))}" for job in jobs]
    for job in jobs:
        lines += ["", f"# ==> {directory / job.name}.sbatch <==", job.script.rstrip("\n")]
    return "\n".join(lines) + "\n"


def submit(directory: Path, jobs: list[SlurmJob], sbatch: str = "sbatch") -> dict[str, str]:
    """Write the scripts and submit them in order; returns job name -> Slurm job id."""
    if shutil.which(sbatch) is None:
        raise UserError("--submit: sbatch not found; submit from a Slurm login node, or use --dry-run")
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    for job in jobs:
        (directory / f"{job.name}.sbatch").write_text(job.script)
        call = [sbatch, *_sbatch_line(job, directory, ids)[1:]]
        result = subprocess.run(call, capture_output=True, text=True, check=False)
        job_id = result.stdout.strip().split(";")[0]
        if result.returncode != 0 or not job_id.isdigit():
            done = " ".join(ids.values()) or "none"
            raise UserError(
                f"sbatch {directory / job.name}.sbatch failed: {(result.stderr or result.stdout).strip()}; "
                f"jobs already submitted: {done} (cancel them with `scancel {done}` before resubmitting)"
            )
        ids[job.name] = job_id
        log_event("submitted", job=job.name, id=job_id, after=[ids[a] for a in job.after])
    return ids


def submit_pipeline(
    path: Path,
    registry: Registry,
    *,
    dry_run: bool,
    max_array_size: int | None = None,
    slurm_flags: list[str] | None = None,
    **selection: Any,
) -> str:
    """`misp-dpo run --executor slurm --dry-run | --submit`: the scripts, or the ids of the submitted jobs."""
    flags = [
        *(slurm_flags or []),
        *([f"max_array_size={max_array_size}"] if max_array_size is not None else []),
    ]
    directory, jobs = prepare_submission(path, registry, slurm_flags=flags, **selection)
    if dry_run or not jobs:
        return describe(directory, jobs)
    lines = [f"submitted {name}: job {job_id}" for name, job_id in submit(directory, jobs).items()]
    return "\n".join([*lines, f"scripts and logs in {directory}; follow with `squeue --me`", ""])

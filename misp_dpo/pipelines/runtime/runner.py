"""The stage runner: resume, refusing a changed config, the failure-rate check and the manifest.

The runner owns what is around a stage's tasks: which tasks are already complete, atomic
stats files as completion markers, refusing a changed config, the failure-rate check and the
manifest, written last. It never names a concrete stage: callers pass the `Stage` to run.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, TypeVar

from misp_dpo.config import stable_hash, to_dict
from misp_dpo.errors import OutputMadeOtherwise, UserError
from misp_dpo.log import LOGGER, log_event
from misp_dpo.pipelines.io import read_json, write_json
from misp_dpo.pipelines.manifest import MANIFEST, FileRecord, Manifest, read_manifest
from misp_dpo.pipelines.runtime.executors import execute
from misp_dpo.pipelines.runtime.tasks import FAILURES_DIR, RUN_FILE, RunOptions, stats_path, task_done
from misp_dpo.pipelines.stage import Plan, Stage, StageConfig, file_record

C = TypeVar("C", bound=StageConfig)


def config_hash(stage: Stage[C], cfg: C, plan: Plan) -> str:
    return stable_hash({"stage": stage.name, "config": to_dict(cfg, hashed_only=True), "inputs": plan.inputs})


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
            raise OutputMadeOtherwise(
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
        + [file_record(out / name, out, rows=False) for name in extra],
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
        return _follow(stage, cfg, plan, chash, opts)  # type: ignore[func-returns-value]
    done = prepare_output(stage, cfg, chash, opts.overwrite)
    if done is not None:
        log_event("already complete, skipping", stage=stage.name, out=str(cfg.out))
        stage.deliver(cfg, cfg.out)
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
        stage.deliver(cfg, cfg.out)
    return manifest

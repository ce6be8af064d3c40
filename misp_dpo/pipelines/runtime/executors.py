"""Executors decide which tasks this process runs and how; stages never know which one is in use.

- local: all tasks, in this process (one worker) or in W spawned processes, worker w taking tasks
  w, w+W, ... (spawned, not forked, so CUDA and thread pools start clean); a stage that declares a
  GPU gets one worker per visible GPU by default, each pinned to its own GPU;
- slurm: this array task's share, tasks i + k * n where i is this array task's index among the
  stage's n array tasks (see `slurm_tasks`);
- ray: every task in a pool of Ray actors (see `ray_executor`).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch

from misp_dpo.errors import UserError
from misp_dpo.log import progress
from misp_dpo.pipelines.runtime.ray_executor import run_ray
from misp_dpo.pipelines.runtime.tasks import RunOptions, run_one_task, task_done
from misp_dpo.pipelines.stage import Plan, Stage, TaskResources

# Set by the generated sbatch scripts when a stage's tasks are split over several arrays (a cluster's
# MaxArraySize): the first stage task of this array, and the stage's array tasks over all its arrays.
TASK_OFFSET_ENV = "MISP_DPO_TASK_OFFSET"
TASK_COUNT_ENV = "MISP_DPO_TASK_COUNT"


def worker_tasks(num_tasks: int, worker: int, workers: int) -> list[int]:
    return list(range(worker, num_tasks, workers))


def _env_int(env: Any, name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(
            f"--executor slurm: {name}={value!r} is not an integer; run inside an sbatch --array job "
            "(see `misp-dpo run PIPELINE.toml --executor slurm --dry-run`)"
        ) from None


def slurm_tasks(num_tasks: int, environ: dict[str, str] | None = None) -> list[int]:
    """This array task's tasks, from SLURM_ARRAY_TASK_ID/COUNT/MIN and the split-array offsets.

    Slurm numbers each array on its own, so an array that holds stage tasks 1001..2001 runs with
    SLURM_ARRAY_TASK_ID 0..1000: the script's MISP_DPO_TASK_OFFSET says where it starts and
    MISP_DPO_TASK_COUNT how many array tasks the stage has in all arrays together.
    """
    env = os.environ if environ is None else environ
    task_id = _env_int(env, "SLURM_ARRAY_TASK_ID")
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    first = _env_int(env, "SLURM_ARRAY_TASK_MIN", 0)
    if not 0 <= task_id - first < count:
        raise UserError(
            f"--executor slurm: SLURM_ARRAY_TASK_ID={task_id} outside {first}..{first + count - 1}"
        )
    index = _env_int(env, TASK_OFFSET_ENV, 0) + task_id - first
    total = _env_int(env, TASK_COUNT_ENV, count)
    if not 0 <= index < total:
        raise UserError(
            f"--executor slurm: array task {index} (offset + SLURM_ARRAY_TASK_ID) outside 0..{total - 1} "
            f"of {TASK_COUNT_ENV}; regenerate the scripts with `misp-dpo run ... --executor slurm --submit`"
        )
    return worker_tasks(num_tasks, index, total)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries; empty without a usable GPU."""
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def local_workers(requested: int, resources: TaskResources, gpus: list[str]) -> tuple[int, list[str]]:
    """Worker count and the GPUs to pin them to: one worker per GPU for a GPU stage unless told;
    one worker over all GPUs for an `all_gpus` stage, or W workers each given gpus[w::W]."""
    pinned = gpus if resources.gpus > 0 else []
    if resources.all_gpus and pinned:
        workers = max(1, requested)
        if workers >= len(pinned):
            return workers, pinned
        return workers, [",".join(pinned[w::workers]) for w in range(workers)]
    if requested > 0:
        return requested, pinned
    return max(1, len(pinned)), pinned


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _worker(
    stage: Stage[Any], cfg: Any, plan: Plan, chash: str, tasks: list[int], threads: int, gpu: str | None
) -> int:
    if gpu is not None:  # before anything touches CUDA in this fresh process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    torch.set_num_threads(threads)
    if gpu is not None and torch.cuda.is_available():
        torch.cuda.set_device(0)
    for task in tasks:
        run_one_task(stage, cfg, plan, chash, task)
    return len(tasks)


def run_local(
    stage: Stage[Any],
    cfg: Any,
    plan: Plan,
    chash: str,
    tasks: list[int],
    workers: int,
    gpus: list[str] | None = None,
) -> None:
    """Run `tasks` here, or in `workers` spawned processes, worker w pinned to gpus[w % len(gpus)]."""
    todo = [t for t in tasks if not task_done(cfg.out, t, chash)]
    workers = max(1, min(workers, len(todo)))
    if workers == 1:
        for task in progress(todo, desc=stage.name, unit="shard", disable=len(todo) <= 1):
            run_one_task(stage, cfg, plan, chash, task)
        return
    context = multiprocessing.get_context("spawn")
    threads = _threads_per_worker(workers)
    pins = [gpus[w % len(gpus)] if gpus else None for w in range(workers)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [
            pool.submit(_worker, stage, cfg, plan, chash, todo[w::workers], threads, pins[w])
            for w in range(workers)
        ]
        bar = progress(total=len(todo), desc=stage.name, unit="shard")
        for future in as_completed(futures):
            bar.update(future.result())
        bar.close()


def execute(stage: Stage[Any], cfg: Any, plan: Plan, chash: str, opts: RunOptions) -> None:
    if opts.executor in ("local", "slurm"):
        tasks = list(range(plan.num_tasks)) if opts.executor == "local" else slurm_tasks(plan.num_tasks)
        gpus = visible_gpus() if stage.resources.gpus > 0 else []
        workers, pinned = local_workers(opts.workers, stage.resources, gpus)
        run_local(stage, cfg, plan, chash, tasks, workers, pinned)
    elif opts.executor == "ray":
        run_ray(stage, cfg, plan, chash, opts)
    else:
        raise UserError(f"--executor {opts.executor!r}: choose local, slurm or ray")

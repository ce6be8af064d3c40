"""Executors decide which tasks this process runs and how; stages never know which one is in use.

- local: all tasks, in this process (workers = 1) or in W spawned processes, worker w taking tasks
  w, w+W, ... (spawned, not forked, so CUDA and thread pools start clean);
- slurm: this array task's share, tasks SLURM_ARRAY_TASK_ID + k * SLURM_ARRAY_TASK_COUNT;
- ray: every task as a Ray task (see `ray_executor`).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from misp_dpo.errors import UserError
from misp_dpo.log import progress
from misp_dpo.pipelines.runner import Plan, RunOptions, Stage, run_one_task, task_done


def worker_tasks(num_tasks: int, worker: int, workers: int) -> list[int]:
    return list(range(worker, num_tasks, workers))


def slurm_tasks(num_tasks: int, environ: dict[str, str] | None = None) -> list[int]:
    """The tasks of this Slurm array task, from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT."""
    env = os.environ if environ is None else environ
    try:
        task_id = int(env["SLURM_ARRAY_TASK_ID"])
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    except (KeyError, ValueError):
        raise UserError(
            "--executor slurm: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT are not set; "
            "run inside an sbatch --array job (see `misp-dpo run --executor slurm --dry-run`)"
        ) from None
    offset = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    if not 0 <= task_id - offset < count:
        raise UserError(f"--executor slurm: SLURM_ARRAY_TASK_ID={task_id} outside 0..{count - 1}")
    return worker_tasks(num_tasks, task_id - offset, count)


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _worker(stage: Stage[Any], cfg: Any, plan: Plan, chash: str, tasks: list[int], threads: int) -> int:
    import torch

    torch.set_num_threads(threads)
    for task in tasks:
        run_one_task(stage, cfg, plan, chash, task)
    return len(tasks)


def run_local(stage: Stage[Any], cfg: Any, plan: Plan, chash: str, tasks: list[int], workers: int) -> None:
    todo = [t for t in tasks if not task_done(cfg.out, t, chash)]
    workers = max(1, min(workers, len(todo)))
    if workers == 1:
        for task in progress(todo, desc=stage.name, unit="shard", disable=len(todo) <= 1):
            run_one_task(stage, cfg, plan, chash, task)
        return
    context = multiprocessing.get_context("spawn")
    threads = _threads_per_worker(workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [
            pool.submit(_worker, stage, cfg, plan, chash, todo[w::workers], threads) for w in range(workers)
        ]
        bar = progress(total=len(todo), desc=stage.name, unit="shard")
        for future in as_completed(futures):
            bar.update(future.result())
        bar.close()


def execute(stage: Stage[Any], cfg: Any, plan: Plan, chash: str, opts: RunOptions) -> None:
    if opts.executor == "local":
        run_local(stage, cfg, plan, chash, list(range(plan.num_tasks)), opts.workers)
    elif opts.executor == "slurm":
        run_local(stage, cfg, plan, chash, slurm_tasks(plan.num_tasks), 1)
    elif opts.executor == "ray":
        from misp_dpo.pipelines.ray_executor import run_ray

        run_ray(stage, cfg, plan, chash, opts)
    else:
        raise UserError(f"--executor {opts.executor!r}: choose local, slurm or ray")

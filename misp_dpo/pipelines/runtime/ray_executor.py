"""The Ray executor: a stage's unfinished tasks run in a pool of Ray actors, on this machine or a cluster.

Each actor reserves the stage's declared resources (`Stage.resources`): a GPU where the cluster has
GPUs, otherwise CPUs only, fractions allowed (`--ray-cpus`), and pins its torch thread count to its
CPU allotment so that the same task gives the same bytes wherever it runs. Actors call the runner's
`run_one_task`, so completion markers, resume and the manifest are exactly the local executor's.
Ray is optional (`misp-dpo[ray]`) and imported only here, through `misp_dpo.optional`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from misp_dpo.errors import UserError
from misp_dpo.log import LOGGER, configure_logging, log_event, progress, resolve_format
from misp_dpo.optional import import_extra
from misp_dpo.pipelines.runtime.tasks import RunOptions, run_one_task, task_done
from misp_dpo.pipelines.stage import Plan, Stage, TaskResources


def import_ray() -> ModuleType:
    """Ray, or a UserError with the install line: the rest of the package runs without it."""
    return import_extra("ray", "ray", "--executor ray")


@dataclass(frozen=True)
class ActorShape:
    """How many actors run a stage and what each one reserves."""

    actors: int
    cpus: float
    gpus: float
    threads: int


def actor_shape(
    resources: TaskResources,
    total: dict[str, float],
    free: dict[str, float],
    tasks: int,
    workers: int,
    ray_cpus: float,
) -> ActorShape:
    """Size the actor pool from the cluster's resources; pure, so the GPU choice is tested without one.

    Never more actors than the free resources hold: an actor that cannot be placed would keep its
    share of the tasks waiting forever while the placed ones hold their CPUs (the 2-CPU deadlock).
    """
    if ray_cpus < 0:
        raise UserError(f"--ray-cpus {ray_cpus}: must be positive (or 0 for the stage's own need)")
    cluster_cpus = total.get("CPU", 0.0)
    cpus = ray_cpus if ray_cpus > 0 else min(resources.cpus, cluster_cpus)
    if cpus > cluster_cpus:
        raise UserError(f"--ray-cpus {ray_cpus}: the Ray cluster has only {cluster_cpus:g} CPUs")
    gpus = resources.gpus if resources.gpus > 0 and total.get("GPU", 0.0) > 0 else 0.0
    fit = math.floor(free.get("CPU", 0.0) / cpus + 1e-9) if cpus > 0 else tasks
    if gpus > 0:
        fit = min(fit, math.floor(free.get("GPU", 0.0) / gpus + 1e-9))
    wanted = workers if workers > 0 else fit
    if wanted > fit:
        LOGGER.warning(
            f"--workers {workers}: the Ray cluster's free resources hold {fit} actors; using {fit}"
        )
    actors = max(1, min(tasks, wanted, fit))
    return ActorShape(actors=actors, cpus=cpus, gpus=gpus, threads=max(1, int(cpus)))


class TaskActor:
    """Runs a stage's tasks one at a time, with a fixed torch thread count."""

    def __init__(self, job: tuple[Stage[Any], Any, Plan, str], threads: int, log_format: str) -> None:
        configure_logging(log_format)  # type: ignore[arg-type]
        torch.set_num_threads(threads)
        self.stage, self.cfg, self.plan, self.chash = job

    def run(self, task: int) -> int:
        run_one_task(self.stage, self.cfg, self.plan, self.chash, task)
        return task


def connect(ray: ModuleType, address: str) -> bool:
    """Join the Ray instance this process already uses, the cluster at `address`, or start a local one.

    Returns whether this call started Ray (and so must shut it down).
    """
    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address)
        except ConnectionError as error:
            raise UserError(
                f"--ray-address {address}: cannot connect ({error}); is `ray start` running?"
            ) from None
    else:
        ray.init(include_dashboard=False)
    return True


def run_ray(stage: Stage[Any], cfg: Any, plan: Plan, chash: str, opts: RunOptions) -> None:
    """Run every unfinished task of the stage on Ray and wait for all of them."""
    todo = [t for t in range(plan.num_tasks) if not task_done(cfg.out, t, chash)]
    if not todo:
        return
    ray = import_ray()
    started = connect(ray, opts.ray_address)
    try:
        shape = actor_shape(
            stage.resources,
            ray.cluster_resources(),
            ray.available_resources(),
            len(todo),
            opts.workers,
            opts.ray_cpus,
        )
        log_event("ray actors", stage=stage.name, **vars(shape))
        _run_pool(ray, (stage, cfg, plan, chash), todo, shape, resolve_format(opts.log_format))
    finally:
        if started:
            ray.shutdown()


def _run_pool(
    ray: ModuleType,
    job: tuple[Stage[Any], Any, Plan, str],
    todo: list[int],
    shape: ActorShape,
    log_format: str,
) -> None:
    remote = ray.remote(num_cpus=shape.cpus, num_gpus=shape.gpus)(TaskActor)
    job_ref = ray.put(job)
    actors = [remote.remote(job_ref, shape.threads, log_format) for _ in range(shape.actors)]
    bar = progress(total=len(todo), desc=job[0].name, unit="shard")
    try:
        for _ in ray.util.ActorPool(actors).map_unordered(lambda actor, task: actor.run.remote(task), todo):
            bar.update(1)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, UserError):
            raise error.cause from None
        raise
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)

"""A small local Ray instance for executor tests: 2 CPUs, a tiny object store, no dashboard."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def local_ray(num_gpus: int = 0) -> Iterator[ModuleType]:
    """Ray on 2 CPUs (`num_gpus` declares GPUs Ray hands out, so GPU placement is testable on CPU)."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        num_gpus=num_gpus,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},  # workers import the tests' stages
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def wait_until_idle(ray: ModuleType, timeout: float = 30.0) -> None:
    """Wait until killed actors have handed their CPUs and GPUs back (Ray releases them asynchronously)."""
    deadline = time.monotonic() + timeout
    total = ray.cluster_resources()
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if all(free.get(key, 0.0) >= total.get(key, 0.0) for key in ("CPU", "GPU")):
            return
        time.sleep(0.1)
    raise TimeoutError(f"Ray still busy after {timeout}s: {ray.available_resources()}")

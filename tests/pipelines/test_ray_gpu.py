"""Ray GPU placement without a GPU: a Ray instance that declares one GPU hands it to GPU stages only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from tests.pipelines.probe_stage import CpuProbeStage, ProbeConfig, ProbeStage, probe_rows
from tests.pipelines.ray_helpers import local_ray, wait_until_idle

# a local Ray cluster takes 13-15 s to start: the whole module is slow
pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_one_gpu() -> Iterator[ModuleType]:
    with local_ray(num_gpus=1) as ray:
        yield ray


def test_gpu_stage_actors_get_the_gpu_and_cpu_stages_do_not(ray_one_gpu: ModuleType, tmp_path: Path) -> None:
    opts = RunOptions(executor="ray", ray_cpus=0.5, max_failure_rate=0.5)
    run_stage(ProbeStage(), ProbeConfig(out=tmp_path / "probe", tasks=4), opts)
    rows = probe_rows(tmp_path / "probe")
    assert {r["cuda_visible_devices"] for r in rows} == {"0"}, "Ray pins the actor to its GPU"
    assert len({r["pid"] for r in rows}) == 1, "one GPU holds one actor"
    wait_until_idle(ray_one_gpu)
    run_stage(CpuProbeStage(), ProbeConfig(out=tmp_path / "cpu", tasks=4), opts)
    rows = probe_rows(tmp_path / "cpu")
    assert {r["cuda_visible_devices"] for r in rows} <= {None, ""}, "a CPU stage gets no GPU"
    assert len({r["pid"] for r in rows}) == 4, "CPU actors are not limited by the GPU"

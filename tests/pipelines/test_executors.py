"""Executors without Ray: GPU pinning of local workers, split Slurm arrays, finalize-only merges."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from misp_dpo.errors import UserError
from misp_dpo.pipelines.runtime.executors import (
    TASK_COUNT_ENV,
    TASK_OFFSET_ENV,
    local_workers,
    run_local,
    slurm_tasks,
    visible_gpus,
)
from misp_dpo.pipelines.runtime.runner import RunOptions, config_hash, run_stage
from misp_dpo.pipelines.stage import TaskResources
from tests.pipelines.probe_stage import ProbeConfig, ProbeStage, probe_rows
from tests.pipelines.test_runner import digest
from tests.pipelines.toy_stage import ToyConfig, ToyStage

GPU_STAGE = TaskResources(cpus=1, gpus=1)
CPU_STAGE = TaskResources(cpus=1)


def test_local_workers_follow_the_gpus_only_for_stages_that_use_one() -> None:
    assert local_workers(0, GPU_STAGE, ["0", "1", "2"]) == (3, ["0", "1", "2"])
    assert local_workers(0, GPU_STAGE, []) == (1, [])
    assert local_workers(0, CPU_STAGE, ["0", "1"]) == (1, [])
    assert local_workers(2, GPU_STAGE, ["4", "5", "6"]) == (2, ["4", "5", "6"])
    assert local_workers(3, CPU_STAGE, []) == (3, [])


def test_an_all_gpus_stage_runs_one_worker_over_every_gpu_unless_told() -> None:
    stage = TaskResources(cpus=2, gpus=1, all_gpus=True)  # the candidates stage: one FAISS index
    assert local_workers(0, stage, ["0", "1", "2", "3"]) == (1, ["0,1,2,3"])
    assert local_workers(2, stage, ["0", "1", "2", "3"]) == (2, ["0,2", "1,3"])
    assert local_workers(4, stage, ["0", "1", "2", "3"]) == (4, ["0", "1", "2", "3"])
    assert local_workers(0, stage, []) == (1, [])


def test_visible_gpus_is_empty_without_cuda_and_reads_cuda_visible_devices_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not torch.cuda.is_available():
        assert visible_gpus() == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-5a")
    assert visible_gpus() == ["3", "GPU-5a"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]


def test_each_local_worker_process_is_pinned_to_its_gpu(tmp_path: Path) -> None:
    """The multi-GPU path itself, run on CPU: worker w sees only gpus[w % len(gpus)]."""
    stage, cfg = ProbeStage(), ProbeConfig(out=tmp_path / "probe", tasks=4)
    plan = stage.plan(cfg)
    cfg.out.mkdir()
    run_local(stage, cfg, plan, config_hash(stage, cfg, plan), list(range(4)), 2, ["3", "5"])
    rows = probe_rows(cfg.out)
    assert [r["cuda_visible_devices"] for r in rows] == ["3", "5", "3", "5"]
    assert len({r["pid"] for r in rows}) == 2 and os.getpid() not in {r["pid"] for r in rows}
    assert {r["threads"] for r in rows} == {max(1, (os.cpu_count() or 1) // 2)}


def test_without_a_gpu_a_gpu_stage_runs_in_this_process_unpinned(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "probe"
    assert run_stage(ProbeStage(), ProbeConfig(out=out, tasks=2), RunOptions()) is not None
    rows = probe_rows(out)
    assert {r["pid"] for r in rows} == {os.getpid()}
    assert {r["cuda_visible_devices"] for r in rows} == {os.environ.get("CUDA_VISIBLE_DEVICES")}


def _array_env(task_id: int, count: int, offset: int, total: int) -> dict[str, str]:
    return {
        "SLURM_ARRAY_TASK_ID": str(task_id),
        "SLURM_ARRAY_TASK_COUNT": str(count),
        "SLURM_ARRAY_TASK_MIN": "0",
        TASK_OFFSET_ENV: str(offset),
        TASK_COUNT_ENV: str(total),
    }


def test_split_arrays_cover_every_task_exactly_once() -> None:
    """2500 tasks at MaxArraySize 1001: arrays 0-1000, 0-1000 and 0-497 with offsets 0, 1001, 2002."""
    seen = []
    for offset in (0, 1001, 2002):
        size = min(1001, 2500 - offset)
        for task_id in range(size):
            seen += slurm_tasks(2500, _array_env(task_id, size, offset, 2500))
    assert sorted(seen) == list(range(2500))
    assert slurm_tasks(2500, _array_env(5, 1001, 1001, 2500)) == [1006]
    assert slurm_tasks(10, _array_env(1, 2, 2, 4)) == [3, 7]  # fewer array tasks than tasks: strided
    with pytest.raises(UserError, match="outside 0..2499"):
        slurm_tasks(2500, _array_env(600, 1001, 2002, 2500))
    with pytest.raises(UserError, match="SLURM_ARRAY_TASK_ID=None is not an integer"):
        slurm_tasks(10, {"SLURM_ARRAY_TASK_COUNT": "2"})


def test_split_array_tasks_then_finalize_only_equal_a_local_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "local"
    run_stage(ToyStage(), ToyConfig(out=local, n=50, tasks=5), RunOptions(max_failure_rate=0.5))
    cfg = ToyConfig(out=tmp_path / "slurm", n=50, tasks=5)
    merge = RunOptions(max_failure_rate=0.5, finalize_only=True)
    for offset, size, task_id in [(0, 3, 0), (0, 3, 2), (3, 2, 1)]:  # array task (0, 1) not run yet
        for key, value in _array_env(task_id, size, offset, 5).items():
            monkeypatch.setenv(key, value)
        run_stage(ToyStage(), cfg, RunOptions(max_failure_rate=0.5, executor="slurm"))
    assert sorted(p.name for p in (cfg.out / "_stats").iterdir()) == [f"0000{t}.json" for t in (0, 2, 4)]
    with pytest.raises(UserError, match=r"2 unfinished task\(s\) \(first: \[1, 3\]\)"):
        run_stage(ToyStage(), cfg, merge)
    for offset, size, task_id in [(0, 3, 1), (3, 2, 0)]:
        for key, value in _array_env(task_id, size, offset, 5).items():
            monkeypatch.setenv(key, value)
        run_stage(ToyStage(), cfg, RunOptions(max_failure_rate=0.5, executor="slurm"))
    (cfg.out / "manifest.json").unlink()  # as if the last array task died before its manifest
    assert run_stage(ToyStage(), cfg, merge) is not None
    assert digest(cfg.out) == digest(local)

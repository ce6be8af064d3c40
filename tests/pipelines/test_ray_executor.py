"""The Ray executor on a local 2-CPU instance: same bytes as the local executor, resume, errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from misp_dpo.config import build_config
from misp_dpo.errors import UserError
from misp_dpo.pipelines.runtime.ray_executor import actor_shape, import_ray
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stage import TaskResources
from misp_dpo.pipelines.stages.candidates import CandidatesConfig, CandidatesStage
from misp_dpo.pipelines.stages.embed import EmbedConfig, EmbedStage
from misp_dpo.pipelines.stages.fit_clip import FitClipConfig, FitClipStage
from tests.helpers import clustered_unit_vectors, write_embeddings
from tests.pipelines.probe_stage import ProbeConfig, ProbeStage, probe_rows
from tests.pipelines.ray_helpers import local_ray, wait_until_idle
from tests.pipelines.test_runner import digest
from tests.pipelines.toy_stage import ToyStage, crashed_local_run

# a local Ray cluster takes 13-15 s to start: the whole module is slow
pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
RAY = RunOptions(executor="ray", ray_cpus=0.5, workers=2, max_failure_rate=0.5)


@pytest.fixture(scope="module")
def ray_cpu() -> Iterator[ModuleType]:
    with local_ray(num_gpus=0) as ray:
        yield ray


def test_actor_shape_asks_for_gpus_only_where_the_cluster_has_them() -> None:
    gpu_stage = TaskResources(cpus=2, gpus=1)
    cpus = {"CPU": 16.0}
    assert actor_shape(gpu_stage, cpus, cpus, tasks=10, workers=0, ray_cpus=0) == actor_shape(
        TaskResources(cpus=2), cpus, cpus, tasks=10, workers=0, ray_cpus=0
    )
    shape = actor_shape(gpu_stage, cpus, cpus, tasks=10, workers=0, ray_cpus=0)
    assert (shape.actors, shape.cpus, shape.gpus, shape.threads) == (8, 2, 0, 2)
    with_gpus = {"CPU": 16.0, "GPU": 4.0}
    shape = actor_shape(gpu_stage, with_gpus, with_gpus, tasks=10, workers=0, ray_cpus=0)
    assert (shape.actors, shape.cpus, shape.gpus, shape.threads) == (4, 2, 1, 2)


def test_actor_shape_never_places_more_actors_than_fit() -> None:
    two = {"CPU": 2.0}
    shape = actor_shape(TaskResources(cpus=4), two, two, tasks=9, workers=0, ray_cpus=0)
    assert (shape.actors, shape.cpus, shape.threads) == (1, 2, 2)  # capped at the cluster's CPUs
    shape = actor_shape(TaskResources(), two, two, tasks=9, workers=8, ray_cpus=0.5)
    assert (shape.actors, shape.cpus, shape.threads) == (4, 0.5, 1)
    shape = actor_shape(TaskResources(), two, {"CPU": 0.0}, tasks=9, workers=0, ray_cpus=0)
    assert shape.actors == 1  # everything busy: one actor waits for room
    assert actor_shape(TaskResources(), two, two, tasks=1, workers=2, ray_cpus=0.5).actors == 1
    with pytest.raises(UserError, match="only 2 CPUs"):
        actor_shape(TaskResources(), two, two, tasks=9, workers=0, ray_cpus=3)


def test_missing_ray_gives_the_pip_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"pip install 'misp-dpo\[ray\]'"):
        import_ray()


def test_actors_hold_fractional_cpus_pin_one_thread_and_get_no_gpu(
    ray_cpu: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "probe"
    wait_until_idle(ray_cpu)
    run_stage(ProbeStage(), ProbeConfig(out=out, tasks=6), RAY)
    rows = probe_rows(out)
    assert [r["task"] for r in rows] == list(range(6))
    assert len({r["pid"] for r in rows}) == 2, "two actors of 0.5 CPU each"
    assert {r["threads"] for r in rows} == {1}
    assert {r["cuda_visible_devices"] for r in rows} <= {None, ""}, "no GPU asked on a CPU cluster"
    wait_until_idle(ray_cpu)  # raises unless every actor is gone after the stage


def test_ray_resumes_what_a_crashed_local_run_left(
    ray_cpu: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, cfg = crashed_local_run(tmp_path, monkeypatch)
    stamp = (cfg.out / "squares-00001.parquet").stat().st_mtime_ns
    run_stage(ToyStage(), cfg, RAY)
    assert (cfg.out / "squares-00001.parquet").stat().st_mtime_ns == stamp, "completed shards are skipped"
    assert digest(cfg.out) == digest(reference)


def test_a_user_error_in_a_task_arrives_as_itself(ray_cpu: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="^probe: task 1 was told to fail$"):
        run_stage(ProbeStage(), ProbeConfig(out=tmp_path / "probe", tasks=3, fail_task=1), RAY)


def test_candidates_on_ray_are_byte_identical_to_local(ray_cpu: ModuleType, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, _ = clustered_unit_vectors(300, 16, 8, 0.2, rng)
    pair_rows = rng.integers(0, 300, size=41)
    prompts, _ = clustered_unit_vectors(41, 16, 3, 0.3, rng)
    embeddings = write_embeddings(tmp_path / "emb", images, pair_rows, prompts, images[pair_rows], tasks=2)
    outputs = {}
    for name, opts in {"local": RunOptions(), "ray": RAY}.items():
        values = {"embeddings": embeddings.root, "out": tmp_path / name, "tasks": 4}
        values |= {"pool": 10, "headroom": 4}
        cfg = build_config(CandidatesConfig, values, "test flags")
        assert run_stage(CandidatesStage(), cfg, opts) is not None
        outputs[name] = digest(cfg.out)
    assert sorted(outputs["ray"]) == sorted(outputs["local"])
    assert outputs["ray"] == outputs["local"]


def test_embed_on_ray_is_byte_identical_to_local(
    ray_cpu: ModuleType, synth_corpus: Path, tmp_path: Path
) -> None:
    """A real CLIP (fit-clip, one step) embedding the demo corpus in 2 shards, 2 actors of 0.5 CPU."""
    clip = tmp_path / "clip"
    run_stage(
        FitClipStage(), FitClipConfig(corpus=synth_corpus, out=clip, steps=1, batch_size=16), RunOptions()
    )
    outputs = {}
    for name, opts in {"local": RunOptions(), "ray": RAY}.items():
        cfg = EmbedConfig(
            pairs=synth_corpus / "pairs.parquet",
            out=tmp_path / name,
            model=f"local-dir:{clip}",
            tasks=2,
            batch_size=64,
            num_workers=1,
            device="cpu",
        )
        assert run_stage(EmbedStage(), cfg, opts) is not None
        outputs[name] = digest(cfg.out)
    assert len(outputs["local"]) > 5 and outputs["ray"] == outputs["local"]

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from misp_dpo.errors import UserError
from misp_dpo.pipelines.runtime.executors import slurm_tasks
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.runtime.validate import validate_output
from tests.pipelines.toy_stage import ToyConfig, ToyStage, crashed_local_run


def digest(folder: Path) -> dict[str, bytes]:
    """Every file of an output except the run marker, by relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "_run.json"
    }


def test_outputs_manifest_stats_and_failures(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    manifest = run_stage(ToyStage(), ToyConfig(out=out, n=70, tasks=3), RunOptions(max_failure_rate=0.2))
    assert manifest is not None
    assert [s.path for s in manifest.shards] == [f"squares-0000{i}.parquet" for i in range(3)]
    assert manifest.stats["items"] == 70 and manifest.stats["failures"] == 10
    assert manifest.rows("squares") == 60
    failures = pq.read_table(out / "_failures" / "00000.parquet").to_pylist()
    assert failures[0] == {"item": "x=-3", "reason": "negative input", "detail": failures[0]["detail"]}
    assert sorted(p.name for p in (out / "_stats").iterdir()) == ["00000.json", "00001.json", "00002.json"]
    problems, summary = validate_output(out)
    assert problems == [] and "OK" in summary


def test_failure_rate_above_threshold_stops_the_stage_but_keeps_shards(tmp_path: Path) -> None:
    cfg = ToyConfig(out=tmp_path / "toy", n=70, tasks=2)
    with pytest.raises(UserError, match=r"10 of 70 items failed .*--max-failure-rate"):
        run_stage(ToyStage(), cfg, RunOptions(max_failure_rate=0.01))
    assert not (cfg.out / "manifest.json").exists()
    assert len(list((cfg.out / "_stats").iterdir())) == 2
    assert run_stage(ToyStage(), cfg, RunOptions(max_failure_rate=0.5)) is not None


def test_crash_then_resume_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference, cfg = crashed_local_run(tmp_path, monkeypatch)
    leftovers = [p.name for p in cfg.out.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "a crashed shard must not leave temporary files"
    assert not (cfg.out / "squares-00002.parquet").exists()
    assert (cfg.out / "squares-00001.parquet").exists()
    stamp = (cfg.out / "squares-00001.parquet").stat().st_mtime_ns
    run_stage(ToyStage(), cfg, RunOptions(max_failure_rate=0.5))
    assert (cfg.out / "squares-00001.parquet").stat().st_mtime_ns == stamp, "completed shards are skipped"
    assert digest(cfg.out) == digest(reference)


def test_a_resumed_task_removes_only_its_own_temporary_files(tmp_path: Path) -> None:
    """After `kill -9`, `.squares-00001.parquet.tmp-5820` stayed; by name, not by process id."""
    cfg = ToyConfig(out=tmp_path / "toy", n=70, tasks=3)
    run_stage(ToyStage(), cfg, RunOptions(max_failure_rate=0.5))
    (cfg.out / "_stats" / "00001.json").unlink()  # task 1 was killed before its marker
    (cfg.out / "manifest.json").unlink()
    killed = [cfg.out / ".squares-00001.parquet.tmp-5820", cfg.out / "_failures" / ".00001.parquet.tmp-5820"]
    others = [cfg.out / ".squares-00000.parquet.tmp-4242", cfg.out / "_stats" / ".00002.json.tmp-1"]
    for path in killed + others:
        path.write_bytes(b"half a file")
    run_stage(ToyStage(), cfg, RunOptions(max_failure_rate=0.5))
    assert [p.exists() for p in killed + others] == [False, False, True, True]
    problems, summary = validate_output(cfg.out)
    assert [p.split(":")[0] for p in problems] == [str(p) for p in sorted(others)]
    assert all("stray temporary file" in p for p in problems) and "2 problem(s)" in summary
    for path in others:
        path.unlink()
    assert validate_output(cfg.out)[0] == []


def test_changed_config_is_refused_then_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    run_stage(ToyStage(), ToyConfig(out=out, n=20), RunOptions(max_failure_rate=0.5))
    with pytest.raises(UserError, match=r"offset: 0 -> 5.*--overwrite"):
        run_stage(ToyStage(), ToyConfig(out=out, n=20, offset=5), RunOptions(max_failure_rate=0.5))
    manifest = run_stage(
        ToyStage(), ToyConfig(out=out, n=20, offset=5), RunOptions(max_failure_rate=0.5, overwrite=True)
    )
    assert manifest is not None and manifest.config["offset"] == 5
    assert pq.read_table(out / "squares-00000.parquet")["square"][0].as_py() == 5


def test_refuses_foreign_folder_even_with_overwrite(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a misp-dpo output"):
        run_stage(ToyStage(), ToyConfig(out=tmp_path), RunOptions(overwrite=True, max_failure_rate=0.5))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_process_workers_give_the_same_bytes(tmp_path: Path) -> None:
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    run_stage(ToyStage(), ToyConfig(out=serial, n=60, tasks=4), RunOptions(max_failure_rate=0.5))
    run_stage(ToyStage(), ToyConfig(out=parallel, n=60, tasks=4), RunOptions(max_failure_rate=0.5, workers=2))
    assert digest(serial) == digest(parallel)


def test_slurm_array_tasks_split_the_work_and_the_last_one_finalizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert slurm_tasks(10, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}) == [1, 4, 7]
    assert slurm_tasks(
        10, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"}
    ) == [1, 4, 7]
    with pytest.raises(UserError, match="SLURM_ARRAY_TASK_ID"):
        slurm_tasks(10, {})
    local = tmp_path / "local"
    run_stage(ToyStage(), ToyConfig(out=local, n=50, tasks=5), RunOptions(max_failure_rate=0.5))
    cfg = ToyConfig(out=tmp_path / "slurm", n=50, tasks=5)
    opts = RunOptions(max_failure_rate=0.5, executor="slurm")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert run_stage(ToyStage(), cfg, opts) is None
    assert sorted(p.name for p in (cfg.out / "_stats").iterdir()) == ["00001.json", "00003.json"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert run_stage(ToyStage(), cfg, opts) is not None
    assert digest(cfg.out) == digest(local)


def test_validate_detects_a_modified_shard(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    run_stage(ToyStage(), ToyConfig(out=out, n=20, tasks=2), RunOptions(max_failure_rate=0.5))
    shard = out / "squares-00001.parquet"
    shard.write_bytes(shard.read_bytes() + b"x")
    problems, _ = validate_output(out)
    assert any("checksum" in p for p in problems)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "toy" and manifest["num_tasks"] == 2

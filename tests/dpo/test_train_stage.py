"""The train stage end to end: learning (acceptance c), resume, the CLI, sampled negatives, bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from misp_dpo.cli import main
from misp_dpo.dpo import trainer
from misp_dpo.dpo.data import PreferenceData
from misp_dpo.dpo.distributed import DistInfo
from misp_dpo.dpo.loop import LoopConfig, evaluate
from misp_dpo.dpo.losses import LossConfig
from misp_dpo.dpo.model import ModelConfig, load_policy
from misp_dpo.dpo.reference import align_reference, compute_reference
from misp_dpo.errors import UserError
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.io import read_table
from misp_dpo.pipelines.manifest import read_manifest
from tests.dpo.conftest import run_train
from tests.helpers import write_prewritten


def _state(negatives: Path, loop: LoopConfig, seed: int = 0) -> trainer.TrainState:
    data = PreferenceData(read_table(sorted(negatives.glob("train-*.parquet"))), negatives)
    policy = load_policy("tiny", ModelConfig(), seed=seed)
    table, _ = compute_reference(policy, data, np.arange(len(data)), 32, show_progress=False)
    reference = align_reference(table, data)
    rows = reference.trainable(data.counts)
    return trainer.build_state(policy, data, reference, rows, LossConfig(), loop, seed, DistInfo())


def test_tiny_llava_learns_to_prefer_the_positive(negatives8: Path, tmp_path: Path) -> None:
    """30 steps on 8 demo pairs: the exact loss falls and the margin to the hardest negative rises."""
    state = _state(negatives8, LoopConfig(max_steps=30, batch_size=2, lr=5e-3, checkpoint_every=100))
    before = evaluate(state, state.rows)
    records = trainer.run_training(state, tmp_path, show_progress=False)
    after = evaluate(state, state.rows)
    assert len(records) == 30 and before["margin"] == pytest.approx(0.0, abs=1e-5)
    assert after["loss"] < before["loss"] - 0.2, (before, after)
    assert after["loss_image"] < before["loss_image"] - 0.1, (before, after)
    assert after["margin"] > before["margin"] + 0.1, (before, after)
    assert np.mean([r["loss"] for r in records[-5:]]) < np.mean([r["loss"] for r in records[:5]])
    _compare_with_pinned(records[:6])


PINNED = Path(__file__).with_name("trajectory.json")
PINNED_KEYS = ("step", "loss", "loss_image", "loss_text", "margin", "accuracy", "grad_norm")


def _compare_with_pinned(records: list[dict[str, Any]]) -> None:
    """A fixed-seed run's first steps against the stored trajectory (regenerate: MISP_DPO_PIN=1)."""
    got = [{k: r[k] for k in PINNED_KEYS} for r in records]
    if os.environ.get("MISP_DPO_PIN") == "1":
        PINNED.write_text(json.dumps(got, indent=1) + "\n")
    pinned = json.loads(PINNED.read_text())
    for mine, stored in zip(got, pinned, strict=True):
        assert mine == pytest.approx(stored, rel=2e-3, abs=2e-4), (mine, stored)


def test_interrupted_run_resumes_to_the_same_outputs(
    negatives8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = {"max_steps": 4, "checkpoint_every": 2, "lr": 1e-2, "batch_size": 2}
    whole = run_train(tmp_path / "whole", negatives8, **flags)
    calls = {"n": 0}
    real_step = trainer.optimizer_step

    def crash_on_third(*args: Any, **kwargs: Any) -> float:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "optimizer_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path / "resumed", negatives8, **flags)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert not (tmp_path / "resumed" / "_stats" / "00000.json").exists()  # no completion marker yet
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(trainer, "optimizer_step", real_step)
    resumed = run_train(tmp_path / "resumed", negatives8, **flags)
    assert whole is not None and resumed is not None
    # the adapter config and card name the base by absolute path: the same once the folder is replaced
    named = {"adapter/adapter_config.json", "adapter/README.md"}
    assert {f.path: f.sha256 for f in whole.files if f.path not in named} == {
        f.path: f.sha256 for f in resumed.files if f.path not in named
    }
    for name in named:
        text = (tmp_path / "whole" / name).read_text()
        assert str((tmp_path / "whole" / "base").resolve()) in text
        assert text.replace("/whole/", "/resumed/") == (tmp_path / "resumed" / name).read_text()
    assert [(f.path, f.sha256) for f in whole.shards] == [(f.path, f.sha256) for f in resumed.shards]
    assert any(f.path == "adapter/adapter_model.safetensors" for f in whole.files)


def test_cli_trains_and_skips_a_finished_output(
    negatives16: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--negatives", str(negatives16), "--model", "tiny", "--out", str(tmp_path / "dpo")]
    args += ["--max-steps", "2", "--sample-negatives", "1", "--log-format", "json"]
    for _ in range(2):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 0
    assert "already complete, skipping" in capsys.readouterr().err
    manifest = read_manifest(tmp_path / "dpo", "train")
    assert manifest.stats["steps"] == 2 and manifest.meta["objective"] == "sampled M=1"
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["effective_negatives"] == pytest.approx(1.0)  # one negative forwarded per pair
    assert {"loss", "loss_image", "loss_text", "loss_anchor", "accuracy", "margin"} <= set(first)


def test_refuses_inputs_that_are_not_listwise_negatives(negatives16: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--negatives .*not a finished `mine` output"):
        run_train(tmp_path / "a", tmp_path)
    pairwise = schemas.NEGATIVES_PAIRWISE.empty_table()
    write_prewritten(tmp_path / "pairwise", "mine", {"train": pairwise})
    with pytest.raises(UserError, match="listwise"):
        run_train(tmp_path / "b", tmp_path / "pairwise")
    with pytest.raises(UserError, match="not a local model folder"):
        run_train(tmp_path / "c", negatives16, model=str(tmp_path / "missing-model"))

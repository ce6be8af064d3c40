"""Any image-text-to-text model by local path: a tiny Qwen2-VL, whose image tensors and positions differ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from misp_dpo.dpo.data import PreferenceData
from misp_dpo.dpo.model import ModelConfig, load_policy
from misp_dpo.dpo.reference import compute_reference
from misp_dpo.pipelines.io import read_table
from tests.dpo.conftest import run_train
from tests.dpo.tiny_qwen import save_tiny_qwen2_vl


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen2-vl")


def test_log_probs_do_not_depend_on_batching(qwen: Path, negatives8: Path) -> None:
    """Right padding, per-token M-RoPE fields and concatenated patches line up for any batch layout."""
    data = PreferenceData(read_table(sorted(negatives8.glob("train-*.parquet"))), negatives8)
    policy = load_policy(str(qwen), ModelConfig(), seed=0)
    alone, _ = compute_reference(policy, data, np.arange(4), batch_size=1, show_progress=False)
    batched, _ = compute_reference(policy, data, np.arange(4), batch_size=64, show_progress=False)
    assert alone.num_rows == 4 * (1 + 2 + 1)
    assert np.allclose(alone.column("logp").to_numpy(), batched.column("logp").to_numpy(), atol=1e-4)
    assert np.ptp(alone.column("logp").to_numpy()) > 0  # images change the log-probs


def test_trains_a_local_qwen2_vl(qwen: Path, negatives8: Path, tmp_path: Path) -> None:
    manifest = run_train(tmp_path / "dpo", negatives8, model=str(qwen), max_steps=2, lr=1e-2, batch_size=2)
    assert manifest is not None and manifest.stats["trained_pairs"] == 8
    lines = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["margin"] == pytest.approx(0.0, abs=1e-4)
    assert lines[1]["loss"] != lines[0]["loss"]
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()

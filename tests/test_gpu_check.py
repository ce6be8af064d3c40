"""bench/gpu_check.py: refuses to pretend without a GPU; its --cpu-smoke mode runs every check's code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_fails(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "torch sees no CUDA GPU" in result.stderr and "--cpu-smoke" in result.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_cpu_smoke_runs_every_check(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    command = [sys.executable, str(SCRIPT), "--cpu-smoke", "--json", str(out), "--work", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    assert {row["check"] for row in report["rows"]} == {"embed", "faiss", "sae", "train"}
    assert all(row["value"] > 0 for row in report["rows"])

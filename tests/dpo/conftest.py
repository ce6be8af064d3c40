"""Fixtures of the trainer tests: a small negatives/ dataset on the shared demo corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from misp_dpo.config import build_config
from misp_dpo.pipelines.manifest import Manifest
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stages.train import TrainConfig, TrainStage
from tests.helpers import write_negatives


@pytest.fixture(scope="session")
def negatives16(synth_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 pairs with 3 negatives each (pool of 8, made-up scores), as a finished `mine` output."""
    out = tmp_path_factory.mktemp("negatives") / "negatives"
    write_negatives(out, synth_corpus, pairs=16, negatives=3)
    return out


@pytest.fixture(scope="session")
def negatives8(synth_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 pairs with 2 negatives each: the smallest dataset the loop tests need."""
    out = tmp_path_factory.mktemp("negatives") / "negatives8"
    write_negatives(out, synth_corpus, pairs=8, negatives=2, seed=2)
    return out


def run_train(out: Path, negatives: Path, max_failure_rate: float = 0.01, **flags: Any) -> Manifest | None:
    """The train stage in-process through the real runner, with tiny-model defaults for tests."""
    values = {"out": out, "negatives": negatives, "model": "tiny", "max_steps": 2, "batch_size": 4, **flags}
    cfg = build_config(TrainConfig, values, "test flags")
    return run_stage(TrainStage(), cfg, RunOptions(max_failure_rate=max_failure_rate))

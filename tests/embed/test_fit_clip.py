"""fit-clip: the held-out split, the chance levels, and that a short run learns the attributes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from misp_dpo.embed.fit_clip import _chance_recall, split_holdout
from misp_dpo.pipelines.fit_clip import FitClipConfig, FitClipStage
from misp_dpo.pipelines.runner import RunOptions, run_stage
from misp_dpo.pipelines.synth import SynthConfig, SynthStage


def test_holdout_split_is_seeded_and_disjoint() -> None:
    train, held = split_holdout(100, 10, seed=3)
    assert len(held) == 10 and len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 100
    assert np.array_equal(split_holdout(100, 10, seed=3)[1], held)
    assert not np.array_equal(split_holdout(100, 10, seed=4)[1], held)


def test_chance_recall_is_the_hypergeometric_miss() -> None:
    assert _chance_recall(10, np.array([1]), 5)[0] == pytest.approx(0.5)
    assert _chance_recall(10, np.array([2]), 1)[0] == pytest.approx(0.2)
    expected = 1 - math.comb(398, 5) / math.comb(400, 5)
    assert _chance_recall(400, np.array([2]), 5)[0] == pytest.approx(expected)


@pytest.mark.slow
def test_short_run_retrieves_far_above_chance(tmp_path: Path) -> None:
    run_stage(SynthStage(), SynthConfig(out=tmp_path / "synth", n=1000, seed=1), RunOptions())
    cfg = FitClipConfig(corpus=tmp_path / "synth", out=tmp_path / "clip", steps=120)
    manifest = run_stage(FitClipStage(), cfg, RunOptions())
    assert manifest is not None and manifest.stats["steps"] == 120
    metrics = json.loads((tmp_path / "clip" / "metrics.json").read_text())
    retrieval = metrics["retrieval"]
    assert retrieval["images"] == 100
    assert retrieval["top1"] > 10 * retrieval["chance_top1"]
    assert retrieval["recall5"] > 10 * retrieval["chance_recall5"]
    assert retrieval["neighbour_shared"] > retrieval["chance_neighbour_shared"] + 0.2
    assert metrics["loss_last"] < metrics["loss_first"] - 1.0

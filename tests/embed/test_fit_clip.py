"""fit-clip: the held-out split, the chance levels, and that a short run learns the attributes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from misp_dpo.embed.fit_clip import _chance_recall, score_retrieval, split_holdout
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stages.fit_clip import FitClipConfig, FitClipStage
from misp_dpo.pipelines.stages.synth import SynthConfig, SynthStage


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


def _features(rows: np.ndarray, width: int) -> torch.Tensor:
    return F.normalize(F.one_hot(torch.as_tensor(rows), width).float() + 0.01, dim=-1)


def test_retrieval_scores_of_perfect_and_of_misleading_features() -> None:
    # 4 combinations of 2 attributes, 3 images each; caption c describes np.unique(codes)[c]
    codes = np.array([[a, b] for a in range(2) for b in range(2) for _ in range(3)])
    combo_of = np.repeat(np.arange(4), 3)
    images = _features(combo_of, 4) + 0.001 * torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    perfect = score_retrieval(images, _features(np.arange(4), 4), combo_of, codes)
    assert (perfect.images, perfect.queries) == (12, 4)
    assert (
        perfect.top1 == perfect.recall5 == perfect.top1_attribute_accuracy == perfect.neighbour_shared == 1.0
    )
    assert perfect.chance_top1 == pytest.approx(0.25)
    assert perfect.chance_recall5 == pytest.approx(1 - math.comb(9, 5) / math.comb(12, 5))
    # another image: 2 of 11 share both attributes, 6 share one, 3 share none
    assert perfect.chance_neighbour_shared == pytest.approx((2 * 1.0 + 6 * 0.5) / 11)
    # each caption points at the combination with both attributes flipped
    wrong = score_retrieval(images, _features(np.array([3, 2, 1, 0]), 4), combo_of, codes)
    assert wrong.top1 == 0.0 and wrong.top1_attribute_accuracy == 0.0
    assert wrong.neighbour_shared == 1.0  # the image-image neighbours are still right

"""The trainer learns, is bit-deterministic on CPU, and a resumed run ends as a whole one does (c)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from misp_dpo.sae.data import VectorChunk, in_memory
from misp_dpo.sae.trainer import TrainSettings, train_sae
from tests.sae.fixtures import pool_dataset

PAPER = TrainSettings(variant="paper", latents=16, steps=40, batch_size=64, lr=3e-3)
TOPK = TrainSettings(variant="topk", latents=32, k=4, steps=40, batch_size=64)


def _topk_dataset(seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((600, 8)).astype(np.float32)
    return in_memory(VectorChunk(x / np.linalg.norm(x, axis=1, keepdims=True)), np.arange(600) % 10 == 0)


def _weights(result: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


@pytest.mark.parametrize("settings", [PAPER, TOPK], ids=["paper", "topk"])
def test_same_seed_gives_identical_weights(settings: TrainSettings) -> None:
    make = pool_dataset if settings.variant == "paper" else _topk_dataset
    first, second = _weights(train_sae(make(), settings)), _weights(train_sae(make(), settings))
    other = _weights(train_sae(make(), TrainSettings(**{**vars(settings), "seed": 1})))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["W_enc"], other["W_enc"])


def test_paper_variant_learns_and_reports() -> None:
    result = train_sae(pool_dataset(pairs=80), TrainSettings(**{**vars(PAPER), "steps": 150}))
    recon = result.history["recon"]
    assert np.mean(recon[-10:]) < 0.8 * np.mean(recon[:10])
    metrics = result.metrics
    assert 0 < metrics["fvu"] < 1 and 0 < metrics["cosine"] <= 1
    assert abs(metrics["mean_activation"] - 0.05) < 0.03
    counts = metrics["activation_histogram"]["counts"]
    assert sum(counts) == metrics["heldout_samples"] * 16
    assert {"dead_fraction", "dense_fraction", "saturated_fraction", "l0"} <= set(metrics)


def test_topk_variant_learns_and_reports() -> None:
    result = train_sae(_topk_dataset(), TrainSettings(**{**vars(TOPK), "steps": 120, "lr": 3e-3}))
    assert result.metrics["fvu"] < 0.8 and result.metrics["l0"] <= 4
    assert np.mean(result.history["fvu"][-10:]) < np.mean(result.history["fvu"][:10])
    torch.testing.assert_close(result.model.W_dec.norm(dim=1), torch.ones(32))


def test_streaming_and_preloading_give_the_same_weights() -> None:
    streamed = _weights(train_sae(pool_dataset(), TrainSettings(**{**vars(PAPER), "preload_bytes": 0})))
    loaded = _weights(train_sae(pool_dataset(), TrainSettings(**{**vars(PAPER), "preload_bytes": 1 << 30})))
    assert all(torch.equal(streamed[k], loaded[k]) for k in streamed)


class Interrupted(Exception):
    pass


class MemoryCheckpointer:
    """Saves at `save_at`; with `crash_at` set, the run dies right after that step's checkpoint."""

    def __init__(self, save_at: int, crash_at: int | None = None) -> None:
        self.save_at, self.crash_at, self.state = save_at, crash_at, None

    def load(self) -> dict[str, Any] | None:
        return self.state

    def save(self, state: dict[str, Any]) -> None:
        self.state = copy.deepcopy(state)

    def due(self, step: int) -> bool:
        if self.crash_at is not None and step > self.crash_at:
            raise Interrupted
        return step == self.save_at


@pytest.mark.parametrize("settings", [PAPER, TOPK], ids=["paper", "topk"])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_weights(settings: TrainSettings) -> None:
    make = pool_dataset if settings.variant == "paper" else _topk_dataset
    whole = train_sae(make(), settings)
    checkpointer = MemoryCheckpointer(save_at=17, crash_at=25)
    with pytest.raises(Interrupted):
        train_sae(make(), settings, checkpointer)
    checkpointer.crash_at = None
    resumed = train_sae(make(), settings, checkpointer)
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == whole.history and resumed.metrics == whole.metrics

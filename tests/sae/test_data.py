"""The training stream: every training item once per epoch, held-out never, and the same batches
whether read window by window from a reader or gathered from memory."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest

from misp_dpo.sae import data
from misp_dpo.sae.data import VectorChunk, heldout_mask, in_memory, sequential, train_stream


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "CHUNK_ITEMS", 16)
    monkeypatch.setattr(data, "WINDOW_CHUNKS", 3)


def _dataset(n: int = 203) -> data.Dataset:
    vectors = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    return in_memory(VectorChunk(vectors), np.arange(n) % 7 == 3)


def test_each_epoch_visits_every_training_item_once() -> None:
    dataset = _dataset()
    train = int((~dataset.heldout).sum())
    batches = list(islice(train_stream(dataset, seed=4, batch_size=train), 2))
    for batch in batches:
        ids = batch.vectors[:, 0].astype(int)
        assert sorted(ids) == sorted(np.flatnonzero(~dataset.heldout))
    assert not np.array_equal(batches[0].vectors, batches[1].vectors)  # reshuffled per epoch


def test_batches_are_equal_sized_across_epoch_boundaries() -> None:
    dataset = _dataset()
    ids = np.concatenate([b.vectors[:, 0] for b in islice(train_stream(dataset, 0, 50), 12)])
    train = int((~dataset.heldout).sum())
    assert len(ids) == 600 and len(set(ids[:train])) == train


def test_preloaded_and_resumed_streams_match_the_plain_one() -> None:
    dataset = _dataset()
    plain = [b.vectors for b in islice(train_stream(dataset, 1, 32), 15)]
    everything = dataset.read(0, dataset.num_items)
    preloaded = [b.vectors for b in islice(train_stream(dataset, 1, 32, preloaded=everything), 15)]
    resumed = [b.vectors for b in islice(train_stream(dataset, 1, 32, start_batch=9), 6)]
    for a, b in zip(plain, preloaded, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(plain[9:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sequential_reads_only_the_requested_split() -> None:
    dataset = _dataset()
    held = np.concatenate([b.vectors[:, 0] for b in sequential(dataset, heldout=True, batch_size=5)])
    np.testing.assert_array_equal(held, np.flatnonzero(dataset.heldout))


def test_heldout_mask_is_a_stable_function_of_the_id() -> None:
    ids = [f"pair-{i:07d}" for i in range(4000)]
    mask = heldout_mask(ids, 0.1)
    assert 0.08 < mask.mean() < 0.12
    np.testing.assert_array_equal(heldout_mask(ids[::-1], 0.1), mask[::-1])
    assert not heldout_mask(ids, 0.0).any()

"""Training data as a deterministic stream of batches, read from shards or from memory alike.

Items are pairs (paper: a pair brings its whole candidate pool) or images (topk). A `Dataset` only
knows how many items there are, which are held out, and how to read a contiguous item range, so
the caller can stream it from Parquet shards. An epoch's order is a permutation of fixed-size
chunks, shuffled again within windows of a few chunks: only one window is ever in memory, yet the
order is a pure function of (seed, epoch) and item indices. Reading everything once into memory
(or onto the GPU) and applying the same order gives the same batches, so the memory budget
changes speed, never the trained weights.

Epochs are concatenated into one stream and cut into equal batches, so no sample is dropped and
a stream position (a step count) says exactly where training is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

CHUNK_ITEMS = 8192  # = the Parquet row group size, so a chunk read touches one or two row groups
WINDOW_CHUNKS = 4


class PoolChunk(NamedTuple):
    """Pairs of the paper variant: positive and prompt vectors, candidate rows into `Dataset.images`."""

    positive: np.ndarray  # (n, D) float16 or float32
    prompt: np.ndarray  # (n, D)
    candidates: np.ndarray  # (n, K) int64 image rows, -1 where the pool is shorter


class VectorChunk(NamedTuple):
    """Images of the topk variant."""

    vectors: np.ndarray  # (n, D)


Chunk = PoolChunk | VectorChunk


@dataclass
class Dataset:
    """Items with a held-out flag, read by contiguous global range [lo, hi)."""

    num_items: int
    heldout: np.ndarray  # (num_items,) bool
    read: Callable[[int, int], Chunk]
    images: np.ndarray | None = None  # (N, D) the rows PoolChunk.candidates point at (paper)
    width: int = 0  # paper: the widest pool, every chunk is padded to it


def heldout_mask(ids: Sequence[str], fraction: float) -> np.ndarray:
    """Held-out flag per id from a hash of the id: the same items whatever the seed or shard layout."""
    if fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    digests = np.array(
        [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") for i in ids]
    )
    return (digests / 2.0**64) < fraction


def take(chunk: Any, index: Any) -> Any:
    """Rows `index` of every field (numpy arrays or torch tensors alike)."""
    return type(chunk)(*(field[index] for field in chunk))


def concat(chunks: list[Any]) -> Any:
    if len(chunks) == 1:
        return chunks[0]
    first = chunks[0]
    if isinstance(first[0], np.ndarray):
        return type(first)(*(np.concatenate(parts) for parts in zip(*chunks, strict=True)))
    return type(first)(*(torch.cat(parts) for parts in zip(*chunks, strict=True)))


def chunk_ranges(num_items: int) -> list[tuple[int, int]]:
    return [(lo, min(num_items, lo + CHUNK_ITEMS)) for lo in range(0, num_items, CHUNK_ITEMS)]


@dataclass(frozen=True)
class Window:
    chunks: np.ndarray  # chunk ids to read, in this order
    items: np.ndarray  # global item indices of the training items, in training order


def epoch_windows(dataset: Dataset, seed: int, epoch: int) -> Iterator[Window]:
    """The training order of one epoch, window by window (held-out items never appear)."""
    rng = np.random.default_rng([seed, epoch])
    n_chunks = len(chunk_ranges(dataset.num_items))
    order = rng.permutation(n_chunks)
    for start in range(0, n_chunks, WINDOW_CHUNKS):
        chunks = order[start : start + WINDOW_CHUNKS]
        items = np.concatenate(
            [np.arange(c * CHUNK_ITEMS, min((c + 1) * CHUNK_ITEMS, dataset.num_items)) for c in chunks]
        )
        items = items[~dataset.heldout[items]]
        yield Window(chunks, items[rng.permutation(len(items))])


def read_window(dataset: Dataset, window: Window) -> Chunk:
    """The window's training items in order, read chunk by chunk from the dataset."""
    parts = [
        dataset.read(c * CHUNK_ITEMS, min((c + 1) * CHUNK_ITEMS, dataset.num_items)) for c in window.chunks
    ]
    starts = np.zeros(window.chunks.max() + 1, dtype=np.int64)
    starts[window.chunks] = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
    local = starts[window.items // CHUNK_ITEMS] + window.items % CHUNK_ITEMS
    return take(concat(parts), local)


def train_stream(
    dataset: Dataset,
    seed: int,
    batch_size: int,
    start_batch: int = 0,
    preloaded: Any = None,
    to_device: Callable[[Any], Any] = lambda chunk: chunk,
) -> Iterator[Any]:
    """Endless training batches from batch `start_batch` on, epochs back to back.

    `preloaded` holds every item (as `read(0, num_items)` would, possibly as device tensors):
    windows then gather from it instead of reading, in the same order.
    """
    per_epoch = int((~dataset.heldout).sum())
    if per_epoch == 0:
        raise ValueError("no training items: every item is held out")
    skip = start_batch * batch_size
    epoch = skip // per_epoch
    skip -= epoch * per_epoch
    pending = None
    while True:
        for window in epoch_windows(dataset, seed, epoch):
            if skip >= len(window.items):
                skip -= len(window.items)
                continue
            window = Window(window.chunks, window.items[skip:])
            skip = 0
            if preloaded is not None:
                data = take(preloaded, _index_like(preloaded, window.items))
            else:
                data = to_device(read_window(dataset, window))
            pending = data if pending is None else concat([pending, data])
            size, position = len(pending[0]), 0
            while size - position >= batch_size:
                yield take(pending, slice(position, position + batch_size))
                position += batch_size
            pending = take(pending, slice(position, None))
        epoch += 1


def _index_like(data: Any, index: np.ndarray) -> Any:
    if isinstance(data[0], np.ndarray):
        return index
    return torch.as_tensor(index, device=data[0].device)


def sequential(dataset: Dataset, heldout: bool, batch_size: int) -> Iterator[Chunk]:
    """Held-out (or training) items in storage order, in batches: for statistics and evaluation."""
    for lo, hi in chunk_ranges(dataset.num_items):
        keep = dataset.heldout[lo:hi] == heldout
        if not keep.any():
            continue
        chunk = take(dataset.read(lo, hi), np.flatnonzero(keep))
        for start in range(0, len(chunk[0]), batch_size):
            yield take(chunk, slice(start, start + batch_size))


def in_memory(chunk: Chunk, heldout: np.ndarray, images: np.ndarray | None = None) -> Dataset:
    """A dataset over arrays already in memory (tests, benchmarks)."""
    width = chunk.candidates.shape[1] if isinstance(chunk, PoolChunk) else 0
    return Dataset(len(chunk[0]), heldout, lambda lo, hi: take(chunk, slice(lo, hi)), images, width)

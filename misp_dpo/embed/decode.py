"""Decoding in DataLoader workers: read bytes, hash, decode, preprocess, tokenise; failures as records.

One embed task is a sequence of batches (its pairs rows, then its corpus items). Every worker of
the DataLoader walks the same sequence and prepares only the batches b with b % workers == its id;
the DataLoader takes one batch from each worker in turn, so batches arrive in sequence order and
the output does not depend on the number of workers. A worker holds one batch at a time, so
memory does not grow with the corpus.

A bad image never raises: it becomes a `Failure` with a short reason (missing file, empty file,
not an image, undecodable image, ...), and the batch carries on without it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pyarrow as pa
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from misp_dpo.embed.pairs import PairRows, PairsTable
from misp_dpo.embed.readers import Corpus, ImageRef
from misp_dpo.errors import in_words

Tokenizer = Callable[[list[str]], torch.Tensor]
Transform = Callable[[Image.Image], torch.Tensor]


class Failure(NamedTuple):
    item: str  # the file, or `table row N`
    reason: str  # short class, the failure table's `reason`
    detail: str


class ImageFailure(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class PreparedBatch(NamedTuple):
    """One batch ready for the encoder. Item i failed where ids[i] is None."""

    kind: str  # "pairs" | "corpus"
    items: list[str]  # how each item is named in the failure table: its uri, or `TABLE row N`
    ids: list[str | None]  # sha1 of each item's bytes
    uris: list[str]
    pixels: torch.Tensor  # (k, 3, H, W): each distinct decoded image of the batch once
    pixel_ids: list[str]  # ids of the rows of `pixels`
    failures: list[tuple[int, Failure]]  # (item index, failure)
    text: pa.RecordBatch | None  # pairs: pair_id, prompt, chosen, rejected
    prompt_tokens: torch.Tensor | None
    chosen_tokens: torch.Tensor | None


def decode(data: bytes, transform: Transform) -> torch.Tensor:
    """Fully decode (so truncation is detected here) and preprocess one image."""
    if not data:
        raise ImageFailure("empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            return transform(image.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageFailure("not an image", f"no image format recognised in its {len(data)} bytes") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageFailure("image too large", in_words(error)) from None
    except Exception as error:  # noqa: BLE001 - any decoder error is this item's failure, not ours
        raise ImageFailure("undecodable image", f"{type(error).__name__}: {in_words(error)}") from None


def read(ref: ImageRef | None) -> bytes:
    if ref is None:
        raise ImageFailure("missing image", "the image cell is empty")
    try:
        return ref.read()
    except FileNotFoundError as error:
        raise ImageFailure("missing file", in_words(error)) from None
    except OSError as error:
        raise ImageFailure("unreadable file", f"{type(error).__name__}: {in_words(error)}") from None


class TaskBatches(IterableDataset[PreparedBatch]):
    """The batches of one task: pairs rows [lo, hi), then corpus items [lo, hi)."""

    def __init__(
        self,
        pairs: PairsTable | None,
        pair_range: tuple[int, int],
        corpus: Corpus | None,
        corpus_range: tuple[int, int],
        batch_size: int,
        transform: Transform,
        tokenizer: Tokenizer,
    ) -> None:
        super().__init__()
        self.pairs, self.pair_range = pairs, pair_range
        self.corpus, self.corpus_range = corpus, corpus_range
        self.batch_size, self.transform, self.tokenizer = batch_size, transform, tokenizer

    def _jobs(self) -> Iterator[PairRows | list[ImageRef | None]]:
        if self.pairs is not None:
            yield from self.pairs.iter_rows(*self.pair_range, self.batch_size)
        if self.corpus is not None:
            yield from self.corpus.iter_refs(*self.corpus_range, self.batch_size)

    def __iter__(self) -> Iterator[PreparedBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, job in enumerate(self._jobs()):
            if index % workers == worker:
                yield self.prepare(job)

    def prepare(self, job: PairRows | list[ImageRef | None]) -> PreparedBatch:
        if not isinstance(job, PairRows):
            uris = [ref.uri if ref is not None else "" for ref in job]
            return PreparedBatch("corpus", uris, *self._images(job, uris, uris), None, None, None)
        assert self.pairs is not None
        items = [f"{self.pairs.table.path} row {job.first_row + i}" for i in range(len(job.images))]
        uris = [ref.uri if ref is not None else "" for ref in job.images]
        prompts = [p or "" for p in job.text.column("prompt").to_pylist()]
        chosen = [c or "" for c in job.text.column("chosen").to_pylist()]
        return PreparedBatch(
            "pairs",
            items,
            *self._images(job.images, items, uris),
            job.text,
            self.tokenizer(prompts),
            self.tokenizer(chosen),
        )

    def _images(
        self, refs: list[ImageRef | None], items: list[str], uris: list[str]
    ) -> tuple[list[str | None], list[str], torch.Tensor, list[str], list[tuple[int, Failure]]]:
        """(ids, uris, pixels, pixel_ids, failures) of a batch; each distinct image decoded once."""
        ids: list[str | None] = []
        tensors, pixel_ids, failures = [], [], []
        for i, ref in enumerate(refs):
            try:
                data = read(ref)
                image_id = hashlib.sha1(data).hexdigest()
                if image_id not in pixel_ids:
                    tensors.append(decode(data, self.transform))
                    pixel_ids.append(image_id)
                ids.append(image_id)
            except ImageFailure as error:
                ids.append(None)
                detail = str(error) if items[i] == uris[i] else f"{uris[i]}: {error}"
                failures.append((i, Failure(items[i], error.reason, detail)))
        pixels = torch.stack(tensors) if tensors else torch.zeros(0)
        return ids, uris, pixels, pixel_ids, failures


def _identity(batch: Any) -> Any:
    return batch


def loader(dataset: TaskBatches, num_workers: int, pin_memory: bool) -> DataLoader[PreparedBatch]:
    """Batches in task order; `num_workers` processes decode ahead (2 batches each)."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers > 0 else None,
    )

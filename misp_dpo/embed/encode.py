"""From prepared batches to embedding tables: each distinct image once, pairs in input order.

The encoder runs here, in the task's main process, on what the decoding workers prepared. Images
already embedded earlier in the task (same sha1) are not encoded again; a pair whose image failed,
or whose prompt or chosen response is empty, is dropped and reported as a failure. Remembering
which images a task has embedded is the only state that grows with the task: 20 bytes per distinct
image (`SeenImages`), so a task of 10M images holds 200 MB; `--tasks` bounds it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from misp_dpo.embed.clip import ClipEncoder
from misp_dpo.embed.decode import Failure, PreparedBatch


def vectors(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """(n, D) float embeddings as the stored type, fixed_size_list<float16>[D]."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


@dataclass
class EmbeddedBatch:
    images: pa.Table | None  # image_id, uri, embedding of the images first seen in this batch
    pairs: pa.Table | None  # pair_id, prompt, chosen, rejected, image_id, prompt/chosen_embedding
    failures: list[Failure]
    counts: Counter[str]


class SeenImages:
    """The sha1 digests a task has embedded, in sorted numpy runs: 20 bytes an image.

    A Python set of hex ids costs about 120 bytes an image. Each batch's new digests become a
    sorted run; runs merge like a binary counter (a run absorbs the previous one when it is no
    larger), so there are O(log n) runs to search and each digest is copied O(log n) times.
    """

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []  # sorted "S20" arrays, longest first
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def _contains(self, digests: np.ndarray) -> np.ndarray:
        found = np.zeros(len(digests), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, digests), len(run) - 1)
            found |= run[at] == digests
        return found

    def add(self, ids: list[str]) -> np.ndarray:
        """Mark distinct hex sha1 `ids` as seen; True where an id had not been seen before."""
        digests = np.array([bytes.fromhex(i) for i in ids], dtype="S20")
        new = ~self._contains(digests) if len(digests) else np.zeros(0, dtype=bool)
        run = np.sort(digests[new])
        self.count += len(run)
        while len(run) and self.runs and len(self.runs[-1]) <= len(run):
            smaller, run = sorted((self.runs.pop(), run), key=len)
            run = np.insert(run, np.searchsorted(run, smaller), smaller)
        if len(run):
            self.runs.append(run)
        return new


def _new_images(encoder: ClipEncoder, batch: PreparedBatch, seen: SeenImages) -> pa.Table | None:
    new = seen.add(batch.pixel_ids)
    keep = np.flatnonzero(new).tolist()
    if not keep:
        return None
    ids = [batch.pixel_ids[r] for r in keep]
    pixels = batch.pixels if len(keep) == len(batch.pixel_ids) else batch.pixels[torch.tensor(keep)]
    first_uri: dict[str, str] = {}
    for image_id, uri in zip(batch.ids, batch.uris, strict=True):
        if image_id is not None:
            first_uri.setdefault(image_id, uri)
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "uri": pa.array([first_uri[i] for i in ids], pa.string()),
            "embedding": vectors(encoder.images(pixels)),
        }
    )


def _text_embeddings(encoder: ClipEncoder, batch: PreparedBatch, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """Prompt and chosen embeddings of `rows`, each distinct text encoded once (prompts repeat)."""
    assert batch.prompt_tokens is not None and batch.chosen_tokens is not None
    index = torch.from_numpy(rows)
    tokens = torch.cat([batch.prompt_tokens[index], batch.chosen_tokens[index]])
    unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    embedded = encoder.texts(unique)[inverse.numpy()]
    return embedded[: len(rows)], embedded[len(rows) :]


def _text_failure(prompt: str | None, chosen: str | None) -> str | None:
    if not (prompt or "").strip():
        return "empty prompt"
    if not (chosen or "").strip():
        return "empty chosen response"
    return None


def _pairs(encoder: ClipEncoder, batch: PreparedBatch) -> tuple[pa.Table | None, list[Failure]]:
    """The batch's pairs whose image decoded and whose texts are not empty; failures for the rest."""
    assert batch.text is not None
    failed = dict(batch.failures)
    prompts, chosen = batch.text.column("prompt").to_pylist(), batch.text.column("chosen").to_pylist()
    for i in range(len(batch.ids)):
        reason = None if i in failed else _text_failure(prompts[i], chosen[i])
        if reason is not None:
            failed[i] = Failure(batch.items[i], reason, batch.uris[i])
    failures = [failed[i] for i in sorted(failed)]
    rows = np.array([i for i in range(len(batch.ids)) if i not in failed], dtype=np.int64)
    if not len(rows):
        return None, failures
    prompt_embedding, chosen_embedding = _text_embeddings(encoder, batch, rows)
    table = pa.Table.from_batches([batch.text]).take(pa.array(rows))
    table = table.append_column("image_id", pa.array([batch.ids[i] for i in rows], pa.string()))
    table = table.append_column("prompt_embedding", vectors(prompt_embedding))
    return table.append_column("chosen_embedding", vectors(chosen_embedding)), failures


def embed_batches(encoder: ClipEncoder, batches: Iterable[PreparedBatch]) -> Iterator[EmbeddedBatch]:
    """Encode a task's batches in order; images are deduplicated over the whole task by sha1."""
    seen = SeenImages()
    for batch in batches:
        before = len(seen)
        images = _new_images(encoder, batch, seen)
        decoded = sum(i is not None for i in batch.ids)
        counts = Counter(items=len(batch.ids), images=len(seen) - before)
        counts["duplicates"] = decoded - counts["images"]
        if batch.kind == "pairs":
            pairs, failures = _pairs(encoder, batch)
            counts["pairs"] = pairs.num_rows if pairs is not None else 0
        else:
            pairs, failures = None, [failure for _, failure in batch.failures]
        yield EmbeddedBatch(images, pairs, failures, counts)

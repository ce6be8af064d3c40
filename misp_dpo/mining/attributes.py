"""Ground-truth attributes (the demo corpus's `attributes.parquet`) and what the negatives changed.

A negative that shares every attribute with its positive is a false negative (it would make the
chosen answer true); the number of attributes it changes measures how easy it is (fewer = harder);
the distinct attribute types a pair's negatives change, over the number of types, is its coverage
(the paper's "deviate in different semantic ways"). `bench/quality.py` and the report use these.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import pyarrow as pa


def _key(uri: str, depth: int) -> str:
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return "/".join(PurePosixPath(path.replace("\\", "/")).parts[-depth:])


@dataclass
class AttributeTable:
    """Attribute codes per image, found by the image's path (the `uri` the embed stage stored)."""

    names: list[str]
    codes: np.ndarray  # (images, attributes) int32 codes of the attribute values
    vocab: list[list[str]]  # vocab[a][code] = value
    _by_key: dict[str, int]
    _depth: int

    @classmethod
    def from_table(cls, table: pa.Table, folder: Path) -> AttributeTable:
        """`table`: an `image` column (path relative to `folder`) and one string column per attribute."""
        names = [n for n in table.column_names if n != "image"]
        codes = np.empty((table.num_rows, len(names)), dtype=np.int32)
        vocab = []
        for a, name in enumerate(names):
            encoded = table.column(name).combine_chunks().dictionary_encode()
            codes[:, a] = encoded.indices.to_numpy(zero_copy_only=False)
            vocab.append(encoded.dictionary.to_pylist())
        images = table.column("image").to_pylist()
        depth = max((len(PurePosixPath(i).parts) for i in images), default=1)
        keys: dict[str, int] = {}
        for row, image in enumerate(images):
            keys[_key(str((folder / image).resolve()), depth + 1)] = row
            keys.setdefault(_key(image, depth), row)
        return cls(names, codes, vocab, keys, depth)

    def rows(self, uris: list[str | None]) -> np.ndarray:
        """Attribute rows of `uris` (int64), -1 where an image is not in the table.

        Matches the full path (with the corpus folder's name) first, then the path relative to the
        corpus, so a corpus that moved after embedding still matches.
        """
        found = np.full(len(uris), -1, dtype=np.int64)
        for i, uri in enumerate(uris):
            if uri is None:
                continue
            row = self._by_key.get(_key(uri, self._depth + 1), self._by_key.get(_key(uri, self._depth), -1))
            found[i] = row
        return found

    def describe(self, row: int) -> dict[str, str]:
        return {name: self.vocab[a][self.codes[row, a]] for a, name in enumerate(self.names)}

    def changed(self, positive: int, negative: int) -> list[str]:
        """Names of the attributes in which `negative` differs from `positive`."""
        differ = self.codes[positive] != self.codes[negative]
        return [name for name, d in zip(self.names, differ, strict=True) if d]


class Quality(NamedTuple):
    pairs: int  # pairs with at least one matched negative
    negatives: int  # matched negatives
    unmatched: int  # images not found in the attribute table
    false_negative_rate: float  # share of negatives with every attribute of their positive
    hardness: float  # mean number of attributes a negative changes (lower = harder)
    coverage: float  # mean over pairs of (distinct attribute types changed) / (number of types)


def quality(
    table: AttributeTable, positive_rows: np.ndarray, negative_rows: np.ndarray, present: np.ndarray
) -> Quality:
    """Metrics of (P,) positives and (P, N) negatives given as attribute rows (-1 = not in the table);
    `present` (P, N) marks real negatives (False = the pair has fewer than N)."""
    has_positive = positive_rows >= 0
    valid = present & (negative_rows >= 0) & has_positive[:, None]
    pos = table.codes[np.maximum(positive_rows, 0)]
    neg = table.codes[np.maximum(negative_rows, 0)]
    differ = (neg != pos[:, None, :]) & valid[:, :, None]  # (P, N, A)
    changed = differ.sum(axis=2)
    covered = valid.any(axis=1)
    n_valid = int(valid.sum())
    types = differ.any(axis=1).sum(axis=1) / max(len(table.names), 1)
    unmatched = int((~has_positive).sum() + (present & (negative_rows < 0)).sum())
    return Quality(
        pairs=int(covered.sum()),
        negatives=n_valid,
        unmatched=unmatched,
        false_negative_rate=float(((changed == 0) & valid).sum() / max(n_valid, 1)),
        hardness=float(changed[valid].mean()) if n_valid else float("nan"),
        coverage=float(types[covered].mean()) if covered.any() else float("nan"),
    )


def pair_rows(
    table: AttributeTable, batch: pa.RecordBatch | pa.Table
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positive rows (P,), negative rows (P, N), present (P, N)) of a listwise negatives batch."""
    positive_uris = (
        batch.column("positive").combine_chunks() if isinstance(batch, pa.Table) else batch.column("positive")
    )
    negatives = batch.column("negatives")
    if isinstance(negatives, pa.ChunkedArray):
        negatives = negatives.combine_chunks()
    lengths = negatives.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    width = int(lengths.max(initial=0))
    flat = negatives.flatten().field("uri").to_pylist()
    owner = np.repeat(np.arange(len(lengths)), lengths)
    slot = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    rows = np.full((len(lengths), width), -1, dtype=np.int64)
    present = np.zeros((len(lengths), width), dtype=bool)
    rows[owner, slot] = table.rows(flat)
    present[owner, slot] = True
    return table.rows(positive_uris.field("uri").to_pylist()), rows, present


def dataset_quality(table: AttributeTable, batches: Iterable[pa.RecordBatch]) -> Quality:
    """`quality` over a whole listwise dataset, streamed batch by batch (`positive`, `negatives`)."""
    positives, negatives, present = [], [], []
    for batch in batches:
        p, n, m = pair_rows(table, batch)
        positives.append(p)
        negatives.append(n)
        present.append(m)
    width = max((n.shape[1] for n in negatives), default=0)
    negative_rows = [np.pad(n, ((0, 0), (0, width - n.shape[1])), constant_values=-1) for n in negatives]
    is_present = [np.pad(m, ((0, 0), (0, width - m.shape[1]))) for m in present]
    if not positives:
        return quality(table, np.zeros(0, np.int64), np.zeros((0, 0), np.int64), np.zeros((0, 0), bool))
    return quality(
        table, np.concatenate(positives), np.concatenate(negative_rows), np.concatenate(is_present)
    )

"""Reading an `embed` output: the CLIP model it was made with, the image store, the pairs.

Every later stage reads embeddings through here, so the checks (finished stage, known model,
dimension) and the memory layout (one float16 matrix, ids sorted for binary search) exist once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from misp_dpo.errors import UserError
from misp_dpo.pipelines.io import fixed_width_ids, iter_batches, vectors_to_numpy
from misp_dpo.pipelines.manifest import Manifest, manifest_hash, read_manifest

EMBED_STAGE = "embed"


@dataclass(frozen=True)
class ClipModelInfo:
    """Which CLIP produced the embeddings; stages refuse to mix outputs of different models."""

    model: str  # open_clip name or local-dir:PATH
    pretrained: str  # pretrained tag ("" for local-dir or random weights)
    fingerprint: str  # sha256 of the weights file, or name/tag for registry weights
    dim: int

    @classmethod
    def from_meta(cls, meta: dict[str, Any], where: str) -> ClipModelInfo:
        try:
            return cls(**{k: meta["clip"][k] for k in ("model", "pretrained", "fingerprint", "dim")})
        except (KeyError, TypeError):
            raise UserError(
                f"{where}: manifest lacks the CLIP model description; rerun `misp-dpo embed`"
            ) from None

    def as_meta(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pretrained": self.pretrained,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
        }

    def check_same(self, other: ClipModelInfo, where: str) -> None:
        if self.fingerprint != other.fingerprint or self.dim != other.dim:
            raise UserError(
                f"{where}: made with CLIP {other.model} ({other.fingerprint[:12]}, D={other.dim}) but the "
                f"embeddings come from {self.model} ({self.fingerprint[:12]}, D={self.dim}); "
                "rebuild it from the same embeddings"
            )


def read_embeddings(folder: Path, flag: str = "--embeddings") -> tuple[Manifest, ClipModelInfo]:
    manifest = read_manifest(folder, EMBED_STAGE, flag)
    return manifest, ClipModelInfo.from_meta(manifest.meta, f"{flag} {folder}")


@dataclass
class ImageStore:
    """Every distinct corpus image: ids, uris and embeddings in one matrix, looked up by binary search."""

    ids: np.ndarray  # (N,) fixed-width bytes, in store order
    uris: pa.Array  # (N,) string
    vectors: np.ndarray  # (N, D) float16, L2-normalised
    _sorted: np.ndarray  # ids[_order], for searchsorted
    _order: np.ndarray

    @classmethod
    def load(cls, manifest: Manifest, batch_size: int = 65536) -> ImageStore:
        """Stream the `images-*` shards into one preallocated matrix; duplicate ids keep their first row."""
        total = manifest.rows("images")
        dim = int(manifest.meta["clip"]["dim"])
        vectors = np.empty((total, dim), dtype=np.float16)
        id_chunks, uri_chunks = [], []
        row = 0
        for batch in iter_batches(
            manifest.shard_paths("images"), ["image_id", "uri", "embedding"], batch_size
        ):
            vectors[row : row + batch.num_rows] = vectors_to_numpy(batch.column(2), np.float16)
            id_chunks.append(batch.column(0))
            uri_chunks.append(batch.column(1))
            row += batch.num_rows
        ids = fixed_width_ids(pa.chunked_array(id_chunks, pa.string()))
        uris = pa.chunked_array(uri_chunks, pa.string()).combine_chunks()
        unique, first = np.unique(ids, return_index=True)
        if len(unique) < total:  # the same image reached two embed tasks: keep one copy
            keep = np.sort(first)
            ids, vectors, uris = ids[keep], vectors[keep], uris.take(pa.array(keep))
        order = np.argsort(ids, kind="stable")
        return cls(ids=ids, uris=uris, vectors=vectors, _sorted=ids[order], _order=order)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, image_ids: np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Store rows of `image_ids` (int64), -1 where an id is unknown."""
        keys = image_ids if isinstance(image_ids, np.ndarray) else fixed_width_ids(image_ids)
        keys = keys.astype(self._sorted.dtype, copy=False) if len(keys) else keys
        position = np.searchsorted(self._sorted, keys)
        position = np.minimum(position, len(self._sorted) - 1)
        found = self._sorted[position] == keys if len(self._sorted) else np.zeros(len(keys), bool)
        return np.where(found, self._order[position], -1).astype(np.int64)


def pair_shards(manifest: Manifest) -> tuple[list[Path], list[int]]:
    """The `pairs-*` shards and their row counts, for `iter_row_range`."""
    paths = manifest.shard_paths("pairs")
    return paths, [pq.ParquetFile(p).metadata.num_rows for p in paths]


def upstream_embeddings(manifest: Manifest, flag: str) -> tuple[Manifest, ClipModelInfo]:
    """The embeddings a later output (candidates, sae) was made from, checked against its recorded hash.

    Such outputs record `meta["embeddings_dir"]` and `inputs["embeddings"]`, so `mine` needs only
    `--candidates` and `--sae` and still refuses embeddings changed since.
    """
    where = f"{flag} {manifest.root}"
    folder = manifest.meta.get("embeddings_dir")
    if not folder:
        raise UserError(f"{where}: manifest does not name its embeddings folder; rerun that stage")
    embeddings, clip = read_embeddings(Path(folder), f"{where} -> embeddings")
    if manifest_hash(embeddings.root) != manifest.inputs.get("embeddings"):
        raise UserError(
            f"{where}: its embeddings {folder} changed after it was made; rerun it with --overwrite"
        )
    return embeddings, clip

"""The candidates stage's saved FAISS index: one file per (embeddings, index type), reused by reruns.

`index-<key>.faiss` holds the index and `index-<key>.json` (written after it) describes it; the key
hashes the embeddings manifest and the index settings, so indexes of other inputs or settings can
share a folder (`--index-dir`) without being confused. Tasks and processes that race to build the
same index each write identical bytes (the build is deterministic) to a temporary file of their own
and rename it into place: no lock is needed and a reader never sees a partial file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from misp_dpo.config import stable_hash
from misp_dpo.log import LOGGER, log_event
from misp_dpo.mining.index import IndexSpec, build_index, load_index, save_index
from misp_dpo.pipelines.io import atomic_path, read_json, write_json

INDEX_DIR = "_index"  # default folder, inside the stage output
INDEX_FORMAT = 1


def index_key(embeddings_hash: str, spec: IndexSpec, seed: int) -> str:
    """What the index's bytes depend on: the corpus, the index type, and the seed if it is trained."""
    payload = {"embeddings": embeddings_hash, "factory": spec.factory, "train": spec.train_size}
    if spec.train_size:
        payload["seed"] = seed
    return stable_hash(payload | {"format": INDEX_FORMAT})


def open_index(vectors: np.ndarray, spec: IndexSpec, seed: int, folder: Path, key: str, save: bool) -> Any:
    """The saved index named by `key` when it is whole, else a new one (saved when `save`)."""
    path = folder / f"index-{key[:16]}.faiss"
    info = path.with_suffix(".json")
    if info.is_file() and path.is_file():
        saved = read_json(info)
        if saved.get("key") == key and saved.get("bytes") == path.stat().st_size:
            index = load_index(path)
            if index.ntotal == len(vectors) and index.d == vectors.shape[1]:
                log_event("reusing saved index", path=str(path), factory=spec.factory)
                return index
        LOGGER.warning(f"{path}: saved index does not match its description; rebuilding it")
    started = time.perf_counter()
    index = build_index(vectors, spec, seed)
    seconds = round(time.perf_counter() - started, 2)
    log_event("index built", factory=spec.factory, vectors=len(vectors), seconds=seconds)
    if save:
        with atomic_path(path) as tmp:
            save_index(index, tmp)
        description = {"key": key, "factory": spec.factory, "ntotal": int(index.ntotal), "dim": int(index.d)}
        write_json(description | {"bytes": path.stat().st_size, "format": INDEX_FORMAT}, info)
    return index

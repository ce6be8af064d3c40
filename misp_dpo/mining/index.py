"""FAISS inner-product indexes over CLIP embeddings: which index, building, saving and searching it.

Exact search (`IndexFlatIP`) whenever its float32 copy of the corpus fits the memory budget; above it
an IVF index whose codes fit (SQ8, else PQ), or any FAISS factory string the user names. The index
is built on the CPU and, when FAISS sees GPUs, copied onto all of them, replicated or sharded
(`misp_dpo.mining.gpu`). FAISS on GPU returns at most 2048 neighbours per query: a larger k keeps the
search on the CPU (with a warning), so no result is ever silently truncated.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

from misp_dpo.errors import UserError
from misp_dpo.log import LOGGER
from misp_dpo.mining.gpu import GpuLayout, to_gpus
from misp_dpo.optional import import_faiss as _import_faiss

GPU_MAX_K = 2048  # FAISS GPU's largest k (faiss/gpu/utils/DeviceDefs.cuh, GPU_MAX_SELECTION_K)
TRAIN_PER_LIST = 64  # IVF training vectors per inverted list (FAISS warns below 39)
MIN_TRAIN = 10_000  # PQ's 256 centroids per sub-quantizer need ~39 x 256 training vectors
NPROBE_SHARE = 1 / 16  # default share of the inverted lists an IVF search visits...
MIN_NPROBE = 16  # ...but at least this many: small corpora have few, poorly separated lists
ADD_CHUNK = 65_536  # rows converted to float32 at a time while filling an index
Device = Literal["auto", "cpu", "cuda"]
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def import_faiss() -> ModuleType:
    """FAISS, imported on first use so that the rest of the package works without it."""
    return _import_faiss("the candidates stage")


def parse_memory(text: str) -> int:
    """Bytes in a size such as `16GB`, `512 MiB` or `2e9` (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    try:
        value = float(match.group(1)) if match else -1.0
    except ValueError:
        value = -1.0
    if not match or value <= 0 or not math.isfinite(value):
        raise ValueError(f"max_index_memory must be a positive size such as 16GB or 512MB, got {text!r}")
    return int(value * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class IndexSpec:
    """How to index the corpus: a FAISS factory string and its training and search settings."""

    factory: str  # FAISS `index_factory` string, inner-product metric; "Flat" is exact search
    nprobe: int = 0  # inverted lists visited per query (IVF indexes only; 0 otherwise)
    train_size: int = 0  # corpus vectors sampled to train the index (0: needs no training)

    @property
    def exact(self) -> bool:
        return self.factory == "Flat"

    def as_meta(self) -> dict[str, Any]:
        return asdict(self)


def choose_index(n: int, dim: int, max_bytes: int, requested: str = "auto", nprobe: int = 0) -> IndexSpec:
    """The index for `n` vectors of `dim` floats: `auto`, `flat`, or a FAISS factory string.

    `auto` is exact search while n x dim float32 fits `max_bytes`, else `IVF{nlist},SQ8` (1 byte a
    dimension) or `IVF{nlist},PQ{m}` (m bytes a vector), whichever is most precise and still fits.
    """
    if requested.lower() == "flat" or (requested == "auto" and n * dim * 4 <= max_bytes):
        return IndexSpec("Flat")
    if requested == "auto":
        nlist = auto_nlist(n)
        factory = f"IVF{nlist},{_ivf_code(n, dim, nlist, max_bytes)}"
    else:
        factory = requested
    nlist, trained = _probe_factory(dim, factory)
    if nlist > n:
        raise UserError(
            f"--index {factory}: {nlist} inverted lists need at least as many corpus images to train, "
            f"the corpus has {n}; use fewer lists or --index flat"
        )
    train_size = 0 if trained else min(n, max(TRAIN_PER_LIST * nlist, MIN_TRAIN))
    if nlist == 0:
        return IndexSpec(factory, 0, train_size)
    return IndexSpec(factory, min(nlist, nprobe or max(MIN_NPROBE, round(nlist * NPROBE_SHARE))), train_size)


def auto_nlist(n: int) -> int:
    """About 4 sqrt(n) inverted lists (FAISS's guideline), a power of two, at least 39 vectors each."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(nlist, n // 39))


def _ivf_code(n: int, dim: int, nlist: int, max_bytes: int) -> str:
    fixed = nlist * dim * 4  # the coarse centroids
    per_vector = 8  # an int64 id in the inverted lists
    if fixed + n * (dim + per_vector) <= max_bytes:
        return "SQ8"
    for m in (64, 48, 32, 24, 16, 8, 4):
        if dim % m == 0 and fixed + n * (m + per_vector) <= max_bytes:
            return f"PQ{m}"
    need = fixed + n * (4 + per_vector)
    raise UserError(
        f"--max-index-memory {max_bytes / 2**30:.2f}GB: too small for any index of {n} x {dim} vectors "
        f"(the smallest needs ~{need / 2**30:.2f}GB); raise it"
    )


def _probe_factory(dim: int, factory: str) -> tuple[int, bool]:
    """(inverted lists or 0, already trained) of a factory string; a bad string is a UserError."""
    faiss = import_faiss()
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        detail = str(error).strip().splitlines()[-1]
        raise UserError(
            f"--index {factory}: FAISS cannot build it ({detail}); use auto, flat or a factory "
            "string such as IVF4096,SQ8"
        ) from None
    ivf = faiss.try_extract_index_ivf(index)
    return (int(ivf.nlist) if ivf is not None else 0), bool(index.is_trained)


def build_index(vectors: np.ndarray, spec: IndexSpec, seed: int = 0) -> Any:
    """A CPU index holding `vectors` (float16 or float32) as ids 0..n-1; deterministic for a seed."""
    faiss = import_faiss()
    n, dim = vectors.shape
    if spec.exact:
        index = faiss.IndexFlatIP(dim)
        _fill_flat(index, vectors)
        return index
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=spec.train_size, replace=False))
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    for lo in range(0, n, ADD_CHUNK):
        index.add(np.ascontiguousarray(vectors[lo : lo + ADD_CHUNK], dtype=np.float32))
    return index


def _fill_flat(index: Any, vectors: np.ndarray) -> None:
    """Copy the corpus into a flat index in one allocation of its final size.

    `index.add` in chunks grows the storage vector by doubling, which at the last step holds the
    old and the new buffer (up to 1.5x the index) at once; one `add` of the whole corpus would need a
    full float32 copy of it first. Writing into the storage directly needs neither.
    """
    faiss = import_faiss()
    n, dim = vectors.shape
    index.codes.resize(n * dim * 4)
    storage = faiss.rev_swig_ptr(index.codes.data(), n * dim * 4).view(np.float32).reshape(n, dim)
    for lo in range(0, n, ADD_CHUNK):
        storage[lo : lo + ADD_CHUNK] = vectors[lo : lo + ADD_CHUNK]
    index.ntotal = n


def save_index(index: Any, path: Path) -> None:
    import_faiss().write_index(index, str(path))


def load_index(path: Path) -> Any:
    return import_faiss().read_index(str(path))


def faiss_device(device: Device, num_gpus: int, k: int) -> Literal["cpu", "cuda"]:
    """Where to search: every GPU FAISS sees unless told otherwise, the CPU for k above GPU_MAX_K."""
    if device == "cuda" and num_gpus == 0:
        raise UserError(
            "--device cuda: FAISS sees no GPU; install faiss-gpu (pip install 'misp-dpo[gpu]') "
            "or use --device auto"
        )
    if device == "cpu" or num_gpus == 0:
        return "cpu"
    if k > GPU_MAX_K:
        LOGGER.warning(
            f"searching {k} neighbours per query on the CPU: FAISS on GPU returns at most {GPU_MAX_K}; "
            "lower --pool and --headroom to search on the GPU"
        )
        return "cpu"
    return "cuda"


class Searcher:
    """A built index ready to search in batches, on all GPUs or on the CPU, nprobe set.

    On GPUs the index is replicated or sharded over all of them (`misp_dpo.mining.gpu`); when FAISS
    cannot move it there (index type, memory) the search stays on the CPU, with a warning.
    """

    def __init__(
        self,
        index: Any,
        spec: IndexSpec,
        device: Device,
        k: int,
        layout: GpuLayout = "auto",
        float16: bool = True,
    ) -> None:
        faiss = import_faiss()
        self.on_gpu, self.layout = False, "cpu"
        gpus = faiss.get_num_gpus()
        if faiss_device(device, gpus, k) == "cuda":
            placed = to_gpus(index, gpus, layout, float16)
            if placed is not None:
                index, self.layout = placed
                self.on_gpu = True
        if spec.nprobe:  # through replicas and shards too (ParameterSpace recurses into them)
            space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
            space.set_index_parameter(index, "nprobe", spec.nprobe)
        self.index = index
        self.k_max = GPU_MAX_K if self.on_gpu else None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (len(queries), k); ids are -1 where fewer than k vectors were found."""
        if self.k_max is not None and k > self.k_max:
            raise ValueError(f"k={k} exceeds FAISS GPU's limit of {self.k_max}; search on the CPU")
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for lo in range(0, len(queries), batch):
            chunk = np.ascontiguousarray(queries[lo : lo + batch], dtype=np.float32)
            scores[lo : lo + len(chunk)], ids[lo : lo + len(chunk)] = self.index.search(chunk, k)
        return scores, ids

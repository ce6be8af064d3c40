"""Putting a built FAISS index on every GPU FAISS sees: one copy per GPU, or one shard per GPU.

Replicas (`IndexReplicas`) split each query batch between the GPUs, each searching the whole
corpus: nothing to merge, so they are the faster layout whenever a copy fits on every GPU, and
queries dominate this stage (every pair searches one corpus twice). Shards (`IndexShards`) give
each GPU 1/G of the corpus and merge the G partial top-k lists: G times the capacity, for corpora
that fit no single GPU. `auto` replicates when one copy takes at most REPLICA_SHARE of the smallest
GPU's free memory (the rest is FAISS's scratch memory and the query batches), else shards.

`float16` copies flat indexes with float16 storage (FAISS's `useFloat16` cloner option). The
embeddings are float16 on disk, so this loses nothing, halves GPU memory (a 1M x 512 corpus takes
1 GB instead of 2) and runs the inner products on the tensor cores, accumulated in float32. For
IVF-PQ the same option means float16 lookup tables, which FAISS on GPU needs for codes of 56 bytes
and more (our auto `PQ64`); IVF-SQ8 stores one byte a dimension either way.

Only documented FAISS calls: `GpuMultipleClonerOptions` and `index_cpu_to_all_gpus`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from misp_dpo.log import LOGGER, log_event
from misp_dpo.optional import import_faiss

GpuLayout = Literal["auto", "replicate", "shard"]
REPLICA_SHARE = 0.6
ID_BYTES = 8  # IVF inverted lists store an int64 id per vector (FAISS's default INDICES_64_BIT)


def gpu_copy_bytes(index: Any, float16: bool) -> int:
    """GPU memory of one full copy of `index` (a shard needs 1/G of it)."""
    faiss = import_faiss()
    n, dim = int(index.ntotal), int(index.d)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:  # codes and ids in the inverted lists, plus the float32 coarse centroids
        return n * (int(ivf.code_size) + ID_BYTES) + int(ivf.nlist) * dim * 4
    return n * dim * (2 if float16 and isinstance(index, faiss.IndexFlat) else 4)


def choose_layout(copy_bytes: int, free_bytes: list[int], requested: GpuLayout = "auto") -> str:
    """`replicate` or `shard` over len(free_bytes) GPUs (see the module docstring)."""
    if requested != "auto":
        return requested
    if len(free_bytes) <= 1:
        return "replicate"  # one GPU: both layouts are the same single copy
    return "replicate" if copy_bytes <= REPLICA_SHARE * min(free_bytes) else "shard"


def gpu_free_bytes(count: int) -> list[int]:
    """Free memory of each of the first `count` GPUs; [] when unknown (then `auto` shards, the safe
    choice). FAISS has no memory query, so this asks CUDA through torch."""
    try:
        if torch.cuda.device_count() < count:
            return []
        return [int(torch.cuda.mem_get_info(device)[0]) for device in range(count)]
    except RuntimeError:
        return []


def to_gpus(index: Any, gpus: int, requested: GpuLayout, float16: bool) -> tuple[Any, str] | None:
    """(`index` on all `gpus` GPUs, its layout), or None, with a warning, when FAISS cannot put it
    there (index type, memory). An `auto` replica that does not fit after all is sharded instead."""
    copy = gpu_copy_bytes(index, float16)
    layout = choose_layout(copy, gpu_free_bytes(gpus), requested)
    attempts = [layout, "shard"] if layout == "replicate" and requested == "auto" and gpus > 1 else [layout]
    for attempt in attempts:
        try:
            placed = place_on_gpus(index, attempt, float16)
        except RuntimeError as error:
            LOGGER.warning(f"FAISS cannot {attempt} this index over {gpus} GPU(s): {error}")
            continue
        log_event("index on GPUs", gpus=gpus, layout=attempt, float16=float16, copy_gb=round(copy / 2**30, 3))
        return placed, attempt
    LOGGER.warning("searching on the CPU instead")
    return None


def place_on_gpus(index: Any, layout: str, float16: bool) -> Any:
    """`index` copied to every GPU FAISS sees, replicated or sharded (RuntimeError if FAISS cannot)."""
    faiss = import_faiss()
    options = faiss.GpuMultipleClonerOptions()
    options.shard = layout == "shard"
    options.useFloat16 = float16
    if hasattr(options, "use_cuvs") and _scalar_quantized(index):
        options.use_cuvs = False  # cuVS builds have no scalar-quantizer indexes; FAISS's own kernels do
    return faiss.index_cpu_to_all_gpus(index, co=options)


def _scalar_quantized(index: Any) -> bool:
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFScalarQuantizer)

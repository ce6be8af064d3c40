"""`misp-dpo candidates`: each pair's pool of candidate negatives, by FAISS retrieval and filters.

Task t of T takes the global pair rows `task_rows(P, t, T)` of the embeddings' `pairs-*` shards
and writes exactly one row per pair, in the same order (pairs whose pool ends up empty included),
so later stages join candidates and pairs by position. The core is `misp_dpo.mining.candidates`.

The image store and the corpus index are loaded once per process and shared by its tasks; the
index is saved under `_index/` of the output (or `--index-dir`) and reused by reruns, other tasks
and other processes (see `index_files`), with byte-identical outputs either way.

Over the 150-line aim: it checks every embeddings shard against its manifest before any work, owns the
per-process corpus/index loading and the GPU layout options, and writes the pools as the contract's
`candidates` column (list<struct>), all I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from misp_dpo.config import option
from misp_dpo.errors import UserError
from misp_dpo.log import LOGGER
from misp_dpo.mining.candidates import FILTERS, PoolSettings, RetrievedPools, candidate_pools
from misp_dpo.mining.index import (
    IndexSpec,
    Searcher,
    choose_index,
    faiss_device,
    import_faiss,
    parse_memory,
)
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.embeddings import ClipModelInfo, ImageStore, pair_shards, read_embeddings
from misp_dpo.pipelines.index_files import INDEX_DIR, index_key, open_index
from misp_dpo.pipelines.io import iter_row_range, task_rows, vectors_to_numpy
from misp_dpo.pipelines.manifest import Manifest, manifest_hash
from misp_dpo.pipelines.process_cache import ProcessCache
from misp_dpo.pipelines.stage import Plan, ShardedConfig, Stage, TaskContext, TaskResources

PAIR_COLUMNS = ["pair_id", "image_id", "prompt_embedding", "chosen_embedding"]


@dataclass(frozen=True, kw_only=True)
class CandidatesConfig(ShardedConfig):
    embeddings: Path = option(
        help="an `embed` output folder (images-*, pairs-*, manifest.json)", hashed=False
    )
    out: Path = option(help="output folder for candidates-NNNNN.parquet", hashed=False)
    pools: PoolSettings = option(PoolSettings(), "pool size and filter thresholds")
    index: str = option(
        "auto", "auto (exact until --max-index-memory, IVF above), flat, or a FAISS factory string"
    )
    max_index_memory: str = option("16GB", "memory budget of the index; `auto` picks exact search below it")
    nprobe: int = option(0, "inverted lists visited per query by IVF indexes (0: 1/16 of them, at least 16)")
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto",
        "auto: every GPU FAISS sees, else the CPU (and the CPU for --pool + --headroom > 2048)",
        hashed=False,
    )
    gpu_layout: Literal["auto", "replicate", "shard"] = option(
        "auto",
        "on several GPUs: a copy of the index on each (queries split between them) or 1/G of it on "
        "each (G times the capacity); auto replicates when a copy fits in 60% of every GPU's free memory",
        hashed=False,
    )
    gpu_float16: bool = option(
        True,
        "store flat indexes as float16 on GPU: lossless for float16 embeddings, half the GPU memory",
        hashed=False,
    )
    batch_size: int = option(4096, "pairs searched at once", hashed=False)
    index_dir: Path | None = option(
        None, "where the index is saved and reused (default: OUT/_index); share it between runs", hashed=False
    )
    save_index: bool = option(True, "save the built index so reruns and other tasks load it", hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_memory(self.max_index_memory)
        if self.nprobe < 0 or self.batch_size < 1:
            raise ValueError(f"need nprobe >= 0 and batch_size >= 1, got {self.nprobe}, {self.batch_size}")


@dataclass(frozen=True)
class CandidatesWork:
    spec: IndexSpec
    index_key: str  # names the saved index: inputs and settings it was built from


class CandidatesStage(Stage[CandidatesConfig]):
    """Retrieve each pair's candidate negatives (FAISS), minus the positive, duplicates, false negatives."""

    name = "candidates"
    config = CandidatesConfig
    # One process holds the index on every GPU it sees, replicated or sharded (--gpu-layout): a local
    # run starts one worker over all GPUs (--workers W: W workers, each on 1/W of the GPUs, each with
    # its own copy of the corpus), a Slurm array task uses its [slurm] gpus, a Ray actor one GPU.
    resources = TaskResources(cpus=2.0, gpus=1.0, all_gpus=True)

    def plan(self, cfg: CandidatesConfig) -> Plan:
        embeddings, clip = read_embeddings(cfg.embeddings)
        check_embeddings(embeddings, clip)
        images = embeddings.rows("images")
        spec = choose_index(images, clip.dim, parse_memory(cfg.max_index_memory), cfg.index, cfg.nprobe)
        faiss = import_faiss()
        if cfg.device == "cuda":
            faiss_device(cfg.device, faiss.get_num_gpus(), cfg.pools.k)
        inputs = {"embeddings": manifest_hash(embeddings.root)}
        key = index_key(inputs["embeddings"], spec, cfg.seed)
        meta = {
            "clip": embeddings.meta["clip"],
            "embeddings_dir": str(embeddings.root.resolve()),
            "index": spec.as_meta(),
            "pool": cfg.pools.pool,
            "pairs": embeddings.rows("pairs"),
        }
        return Plan(num_tasks=cfg.tasks, inputs=inputs, meta=meta, work=CandidatesWork(spec, key))

    def run_task(self, cfg: CandidatesConfig, plan: Plan, ctx: TaskContext) -> None:
        embeddings, _ = read_embeddings(cfg.embeddings)
        paths, counts = pair_shards(embeddings)
        lo, hi = task_rows(sum(counts), ctx.task, ctx.num_tasks)
        settings = cfg.pools
        small: list[str] = []
        with ctx.writer("candidates", schemas.CANDIDATES) as writer:
            if hi > lo:
                store, searcher = corpus(cfg, embeddings, plan.work)
                for batch in iter_row_range(paths, counts, lo, hi, PAIR_COLUMNS, cfg.batch_size):
                    writer.write(pool_batch(batch, store, searcher, settings, ctx, small))
        if small:
            LOGGER.warning(
                f"task {ctx.task}: {ctx.counts['small_pools']} pairs kept fewer than --min-pool "
                f"{cfg.pools.min_pool} candidates "
                f"(e.g. {', '.join(small[:5])}); a larger corpus or looser filters would fill them"
            )

    def finalize(self, cfg: CandidatesConfig, plan: Plan, out: Path, stats: dict[str, Any]) -> list[str]:
        CORPUS.clear()  # free the corpus and index before later stages of a pipeline run
        if stats.get("small_pools"):
            LOGGER.warning(
                f"candidates: {stats['small_pools']} of {stats.get('pairs', 0)} pairs have fewer than "
                f"--min-pool {cfg.pools.min_pool} candidates "
                f"(stats key small_pools in {out / 'manifest.json'})"
            )
        return []


def check_embeddings(manifest: Manifest, clip: ClipModelInfo, flag: str = "--embeddings") -> None:
    """Refuse, in one line, an embed output whose files no longer match its manifest."""
    where = f"{flag} {manifest.root}"
    fix = "rerun `misp-dpo embed` into it with --overwrite"
    for prefix in ("images", "pairs"):
        if not manifest.shard_paths(prefix):
            raise UserError(f"{where}: its manifest lists no {prefix}-*.parquet shards; {fix}")
    for record in manifest.shards:
        path = manifest.root / record.path
        if not path.is_file():
            raise UserError(f"{where}: {record.path} is listed in manifest.json but missing; {fix}")
        metadata = pq.read_metadata(path)
        if metadata.num_rows != record.rows:
            raise UserError(
                f"{where}: {record.path} has {metadata.num_rows} rows, manifest.json says "
                f"{record.rows}; {fix}"
            )
        schema = metadata.schema.to_arrow_schema()
        for name in ("embedding", "prompt_embedding", "chosen_embedding"):
            if name in schema.names and schema.field(name).type.list_size != clip.dim:
                raise UserError(
                    f"{where}: {record.path} column {name} has {schema.field(name).type.list_size} "
                    f"dimensions, the manifest's CLIP model has {clip.dim}; {fix}"
                )


CORPUS: ProcessCache[tuple[ImageStore, Searcher]] = ProcessCache(size=1)  # shared by this process's tasks


def corpus(cfg: CandidatesConfig, embeddings: Manifest, work: CandidatesWork) -> tuple[ImageStore, Searcher]:
    """The image store and a ready searcher, loaded once per process and reused by its tasks."""
    key = f"{work.index_key}:{cfg.device}:{cfg.gpu_layout}:{cfg.gpu_float16}:{cfg.pools.k}"

    def load() -> tuple[ImageStore, Searcher]:
        store = ImageStore.load(embeddings)
        pa.default_memory_pool().release_unused()  # parquet read buffers: peak RSS is store + index
        folder = cfg.index_dir if cfg.index_dir is not None else cfg.out / INDEX_DIR
        index = open_index(store.vectors, work.spec, cfg.seed, folder, work.index_key, cfg.save_index)
        searcher = Searcher(index, work.spec, cfg.device, cfg.pools.k, cfg.gpu_layout, cfg.gpu_float16)
        return store, searcher

    return CORPUS.get(key, load)


def pool_batch(
    batch: pa.RecordBatch,
    store: ImageStore,
    searcher: Searcher,
    settings: PoolSettings,
    ctx: TaskContext,
    small: list[str],
) -> pa.Table:
    """One row per pair of `batch`: its filtered pool (empty for a pair that failed), counted."""
    pair_ids, image_ids = batch.column(0), batch.column(1)
    prompt, chosen = vectors_to_numpy(batch.column(2)), vectors_to_numpy(batch.column(3))
    found = candidate_pools(searcher.search, store.vectors, store.rows(image_ids), prompt, chosen, settings)
    for p, reason in found.unusable:
        ctx.fail(f"pair {pair_ids[p].as_py()}", reason, f"image_id {image_ids[p].as_py()}")
    too_small = np.flatnonzero(found.usable & (found.pools.sizes < settings.min_pool))
    _count(ctx, found.pools, len(batch), len(too_small))
    small.extend(pair_ids[int(p)].as_py() for p in too_small[: max(0, 5 - len(small))])
    columns = {"pair_id": pair_ids, "image_id": image_ids, "candidates": pool_column(found.pools, store.ids)}
    return pa.table(columns, schema=schemas.CANDIDATES)


def _count(ctx: TaskContext, pools: RetrievedPools, n_pairs: int, small_pools: int) -> None:
    ctx.count("items", n_pairs)
    ctx.count("pairs", n_pairs)
    ctx.count("retrieved", pools.retrieved)
    ctx.count("candidates", int(pools.sizes.sum()))
    ctx.count("small_pools", small_pools)
    for name in FILTERS:
        ctx.count(f"removed_{name}", pools.removed[name])


def pool_column(pools: RetrievedPools, ids: np.ndarray) -> pa.ListArray:
    """The `candidates` column (list<struct<image_id, sim_image, sim_prompt, rank>>) from flat arrays."""
    mask = pools.rows >= 0
    sizes = mask.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    flat_rows = pools.rows[mask]
    rank = (np.arange(len(flat_rows)) - np.repeat(offsets[:-1], sizes)).astype(np.int32)
    image_id = pa.array(ids[flat_rows], type=pa.binary()).cast(pa.string())
    struct = pa.StructArray.from_arrays(
        [image_id, pa.array(pools.sim_image[mask]), pa.array(pools.sim_prompt[mask]), pa.array(rank)],
        fields=list(schemas.CANDIDATE),
    )
    return pa.ListArray.from_arrays(pa.array(offsets), struct)

"""`misp-dpo embed`: CLIP embeddings of the pairs' images, prompts and chosen responses, and of a corpus.

Task t of T takes the pairs rows `task_rows(P, t, T)` and the corpus items `task_rows(C, t, T)`
(without `--corpus`, the pairs' own images are the corpus) and writes `images-t.parquet` (each
distinct image of the task once, id = sha1 of its bytes, pair images first) and `pairs-t.parquet`
(its pairs in table order, minus failed ones), so the pairs shards read back to back are the
input rows in order. The same image may reach two tasks; `ImageStore.load` keeps one copy.

The cores: `misp_dpo.embed.pairs` / `readers` (inputs), `decode` (DataLoader workers), `clip`
(the model) and `encode` (batches to tables).

Over the 150-line aim: it resolves three corpus kinds (folder, table, tar shards) and the model
before any work, and records per-image failures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from misp_dpo.config import option
from misp_dpo.embed.clip import (
    ClipEncoder,
    Device,
    ModelDescription,
    clip_device,
    compute_identity,
    describe_model,
    fetch_weights,
)
from misp_dpo.embed.decode import TaskBatches, loader
from misp_dpo.embed.encode import embed_batches
from misp_dpo.embed.pairs import PairColumns, PairsTable, open_pairs
from misp_dpo.embed.readers import Corpus, FolderCorpus, TableCorpus, TarCorpus, open_corpus
from misp_dpo.errors import UserError
from misp_dpo.log import progress
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.embeddings import EMBED_STAGE, ClipModelInfo
from misp_dpo.pipelines.io import ROW_GROUP_ROWS, ShardWriter, sha256_file, task_rows
from misp_dpo.pipelines.stage import Plan, ShardedConfig, Stage, TaskContext, TaskResources


@dataclass(frozen=True, kw_only=True)
class EmbedConfig(ShardedConfig):
    pairs: Path = option(
        help="pairs table (.parquet, .jsonl or .csv): prompt, chosen, image, optional rejected and id",
        hashed=False,
    )
    corpus: Path | None = option(
        None,
        "image corpus for negatives: a folder (recursive), a table with an image column, or webdataset "
        ".tar shards (a file, a folder of them, a glob or shard-{000..009}.tar); default: the pairs' images",
        hashed=False,
    )
    out: Path = option(help="output folder for images-NNNNN.parquet and pairs-NNNNN.parquet", hashed=False)
    model: str = option(help="open_clip model name (with --pretrained), misp-tiny-clip, or local-dir:PATH")
    pretrained: str = option("", "open_clip pretrained tag or weights file (default none: random weights)")
    # hashed: a forward pass's kernels depend on the batch, and so the embeddings' last bits
    batch_size: int = option(128, "images (and pairs) encoded per forward pass")
    device: Device = option(
        "auto", "auto: CUDA with bf16 autocast when present, else CPU float32", hashed=False
    )
    num_workers: int = option(
        2, "DataLoader processes decoding images for each task (0: inline)", hashed=False
    )
    prompt_column: str = option("prompt", "pairs table column holding the prompt")
    chosen_column: str = option("chosen", "pairs table column holding the chosen response")
    rejected_column: str = option("rejected", "pairs table column holding the rejected response (optional)")
    image_column: str = option(
        "image", "pairs table column holding the image: a path relative to the table, or {bytes, path}"
    )
    id_column: str = option("id", "pairs table column holding the pair id (optional; default: row number)")
    corpus_image_column: str = option("image", "image column of a --corpus table")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(
                f"need batch_size >= 1 and num_workers >= 0, got {self.batch_size}, {self.num_workers}"
            )

    def columns(self) -> PairColumns:
        return PairColumns(
            prompt=self.prompt_column,
            chosen=self.chosen_column,
            rejected=self.rejected_column,
            image=self.image_column,
            id=self.id_column,
        )


@dataclass(frozen=True)
class EmbedWork:
    model: ModelDescription
    pairs: PairsTable
    corpus: Corpus | None


def _corpus_fingerprint(corpus: Corpus | None) -> str:
    """Changes when the corpus listing does, so resume refuses a corpus that changed under it."""
    digest = hashlib.sha256()
    if isinstance(corpus, FolderCorpus):
        digest.update(str(corpus.root).encode())
        arrays = [corpus.paths]
    elif isinstance(corpus, TarCorpus):
        digest.update("\0".join(corpus.shards).encode())
        arrays = [corpus.shard, corpus.member, corpus.offset, corpus.size]
    elif isinstance(corpus, TableCorpus):
        digest.update(f"{corpus.table.path}\0{corpus.column}\0{sha256_file(corpus.table.path)}".encode())
        arrays = []
    else:
        return "none"
    for array in arrays:
        for buffer in array.buffers():
            if buffer is not None:
                digest.update(buffer)
    return digest.hexdigest()


class RowGroupWriter:
    """Buffers tables into full row groups, so small batches do not make small row groups."""

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self.pending: list[pa.Table] = []
        self.rows = 0

    def write(self, table: pa.Table | None) -> None:
        if table is None or not table.num_rows:
            return
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= ROW_GROUP_ROWS:
            merged = pa.concat_tables(self.pending)
            full = self.rows - self.rows % ROW_GROUP_ROWS
            self.writer.write(merged.slice(0, full))
            self.pending, self.rows = [merged.slice(full)], self.rows - full

    def flush(self) -> None:
        if self.rows:
            self.writer.write(pa.concat_tables(self.pending))
        self.pending, self.rows = [], 0


class EmbedStage(Stage[EmbedConfig]):
    """CLIP embeddings of the pairs (image, prompt, chosen response) and of an image corpus.

    Images are decoded in DataLoader workers; every distinct image (id = sha1 of its bytes) is
    embedded once per task. Undecodable, missing or empty images and empty prompts are recorded in
    _failures/ and skipped. On CUDA the model runs under bf16 autocast, else in float32 on the CPU.
    """

    name = EMBED_STAGE
    config = EmbedConfig
    resources = TaskResources(cpus=3.0, gpus=1.0)  # the encoder, plus decoding workers

    def plan(self, cfg: EmbedConfig) -> Plan:
        model = describe_model(cfg.model, cfg.pretrained)
        compute = compute_identity(clip_device(cfg.device))
        pairs = open_pairs(cfg.pairs, cfg.columns())
        corpus = open_corpus(str(cfg.corpus), cfg.corpus_image_column) if cfg.corpus is not None else None
        fetch_weights(model)
        clip = ClipModelInfo(model.model, model.pretrained, model.fingerprint, model.dim).as_meta()
        meta = {
            "clip": {**clip, "preprocess": model.preprocess, "context_length": model.context_length},
            "pairs": str(pairs.table.path),
            "pairs_rows": pairs.num_rows,
            "corpus": str(cfg.corpus) if cfg.corpus is not None else None,
            "corpus_items": corpus.num_items if corpus is not None else 0,
        }
        inputs = {
            "pairs": f"{pairs.table.path}:{sha256_file(pairs.table.path)}",
            "corpus": _corpus_fingerprint(corpus),
            "model": model.fingerprint,
            "compute": compute,  # device and autocast dtype change the bytes: part of the config hash
        }
        return Plan(num_tasks=cfg.tasks, inputs=inputs, meta=meta, work=EmbedWork(model, pairs, corpus))

    def run_task(self, cfg: EmbedConfig, plan: Plan, ctx: TaskContext) -> None:
        work: EmbedWork = plan.work
        device = clip_device(cfg.device)
        if compute_identity(device) != plan.inputs["compute"]:
            raise UserError(
                f"--device {cfg.device}: task {ctx.task} computes in {compute_identity(device)}, the run was "
                f"planned in {plan.inputs['compute']}; pass --device cpu or cuda so every task computes alike"
            )
        encoder = ClipEncoder(work.model, device, cfg.seed)
        pair_range = task_rows(work.pairs.num_rows, ctx.task, ctx.num_tasks)
        corpus_items = work.corpus.num_items if work.corpus is not None else 0
        corpus_range = task_rows(corpus_items, ctx.task, ctx.num_tasks)
        dataset = TaskBatches(
            work.pairs,
            pair_range,
            work.corpus,
            corpus_range,
            cfg.batch_size,
            encoder.transform(),
            encoder.tokenizer,
        )
        batches = loader(dataset, cfg.num_workers, pin_memory=device == "cuda")
        total = pair_range[1] - pair_range[0] + corpus_range[1] - corpus_range[0]
        dim = work.model.dim
        bar = progress(total=total, desc=f"embed task {ctx.task}", unit="item")
        with (
            ctx.writer("images", schemas.images(dim)) as images,
            ctx.writer("pairs", schemas.pair_embeddings(dim)) as pairs,
        ):
            image_rows, pair_rows = RowGroupWriter(images), RowGroupWriter(pairs)
            for batch in embed_batches(encoder, batches):
                image_rows.write(batch.images)
                pair_rows.write(batch.pairs)
                for failure in batch.failures:
                    ctx.fail(*failure)
                for key, value in batch.counts.items():
                    ctx.count(key, value)
                bar.update(batch.counts["items"])
            image_rows.flush()
            pair_rows.flush()
        bar.close()

"""`misp-dpo fit-clip --corpus DIR --out OUT`: train the demo's tiny open_clip model (a local-dir checkpoint).

OUT holds `open_clip_config.json` and `open_clip_model.safetensors`, the layout open_clip's
`local-dir:` loads, so `--model local-dir:OUT` works wherever a model is named; plus
`metrics.json` (held-out retrieval against chance, the loss curve) and the usual manifest.
The core is `misp_dpo.embed.fit_clip`.

Over the 150-line aim: it assembles and logs metrics.json (held-out retrieval against chance, the loss).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from misp_dpo.config import option
from misp_dpo.embed import fit_clip
from misp_dpo.embed.clip import (
    CONFIG_FILE,
    TINY_MODEL,
    WEIGHTS_FILE,
    open_clip_module,
    register_model_configs,
)
from misp_dpo.embed.synth import IMAGE_SIZE
from misp_dpo.errors import UserError
from misp_dpo.log import log_event, progress
from misp_dpo.pipelines.io import atomic_path
from misp_dpo.pipelines.manifest import manifest_hash, read_manifest
from misp_dpo.pipelines.stage import Plan, Stage, StageConfig, TaskContext

METRICS_FILE = "metrics.json"
LOG_EVERY = 50


@dataclass(frozen=True, kw_only=True)
class FitClipConfig(StageConfig):
    """--out is an open_clip local-dir checkpoint; --seed seeds the initialisation, split and batches."""

    corpus: Path = option(help="output folder of `misp-dpo synth`", hashed=False)
    arch: str = option(TINY_MODEL, "open_clip architecture trained from scratch (a registered config name)")
    steps: int = option(400, "optimiser steps (the default took 60 s on 2 idle CPU cores)")
    batch_size: int = option(128, "images per step, each of a different attribute combination")
    lr: float = option(3e-3, "peak AdamW learning rate (linear warm-up over 10% of the steps, then cosine)")
    weight_decay: float = option(0.1, "AdamW weight decay of the weight matrices")
    caption_share: float = option(
        0.5, "probability that an image's training text is its caption (else one of its chosen answers)"
    )
    holdout: float = option(0.1, "share of the images held out to measure text->image retrieval")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"need steps >= 1 and batch_size >= 2, got {self.steps}, {self.batch_size}")
        if not 0.0 < self.holdout < 1.0 or not 0.0 <= self.caption_share <= 1.0:
            raise ValueError(
                f"holdout must be in (0, 1) and caption_share in [0, 1], "
                f"got {self.holdout}, {self.caption_share}"
            )
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


class FitClipStage(Stage[FitClipConfig]):
    """Train a tiny open_clip model on a synth corpus (demo only: real runs name a pretrained model).

    Uses open_clip's ClipLoss on captions and chosen answers, reports held-out text->image
    retrieval against chance, and saves an open_clip local-dir checkpoint: --model local-dir:OUT.
    """

    name = "fit-clip"
    config = FitClipConfig

    def plan(self, cfg: FitClipConfig) -> Plan:
        synth = read_manifest(cfg.corpus, "synth", "--corpus")
        register_model_configs()
        if open_clip_module().get_model_config(cfg.arch) is None:
            raise UserError(f"--arch {cfg.arch}: not an open_clip model config; use {TINY_MODEL}")
        images = synth.stats.get("images", 0)
        if round(images * cfg.holdout) < 2 or images - round(images * cfg.holdout) < 2:
            raise UserError(
                f"--corpus {cfg.corpus}: {images} images are too few to train and hold out; use more"
            )
        return Plan(num_tasks=1, inputs={"corpus": manifest_hash(cfg.corpus)}, meta={"arch": cfg.arch})

    def run_task(self, cfg: FitClipConfig, plan: Plan, ctx: TaskContext) -> None:
        data = _load_corpus(cfg.corpus)
        train_rows, held_rows = fit_clip.split_holdout(
            len(data.codes), round(len(data.codes) * cfg.holdout), cfg.seed
        )
        torch.manual_seed(cfg.seed)
        model = open_clip_module().create_model(cfg.arch)
        tokenizer = open_clip_module().get_tokenizer(cfg.arch)
        settings = fit_clip.FitSettings(
            cfg.steps, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.caption_share, cfg.seed
        )
        bar = progress(total=cfg.steps, desc="fit-clip", unit="step")

        def on_step(step: int, loss: float, seconds: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step % LOG_EVERY == 0 or step == cfg.steps - 1:
                log_event("fit-clip", step=step, loss=round(loss, 4), seconds=round(seconds, 1))

        started = time.perf_counter()
        losses = fit_clip.train_clip(model, tokenizer, data.subset(train_rows), settings, on_step)
        bar.close()
        metrics = fit_clip.retrieval_metrics(model, tokenizer, data.subset(held_rows))
        log_event("fit-clip held-out text->image retrieval", **metrics.as_dict())
        _write_json(ctx.output_file(CONFIG_FILE), _checkpoint_config(cfg.arch, model))
        with atomic_path(ctx.output_file(WEIGHTS_FILE)) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        report = {
            "retrieval": metrics.as_dict(),
            "train_images": len(train_rows),
            "steps": cfg.steps,
            "seconds": round(time.perf_counter() - started, 1),
            "loss_first": round(losses[0], 4),
            "loss_last": round(float(np.mean(losses[-20:])), 4),
            "loss_every_50_steps": [round(x, 4) for x in losses[::LOG_EVERY]],
        }
        _write_json(ctx.output_file(METRICS_FILE), report)
        ctx.count("steps", cfg.steps)
        ctx.count("train_images", len(train_rows))
        ctx.count("heldout_images", len(held_rows))


def _load_corpus(folder: Path) -> fit_clip.SynthData:
    """The synth corpus's images and attribute codes, the images decoded once into uint8."""
    table = pq.read_table(folder / "attributes.parquet")
    names = [n for n in table.column_names if n != "image"]
    codes, vocab = [], []
    for name in names:
        encoded = table.column(name).combine_chunks().dictionary_encode()
        codes.append(encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64))
        vocab.append(encoded.dictionary.to_pylist())
    pngs = ((folder / path.as_py()).read_bytes() for path in table.column("image"))
    pixels = fit_clip.decode_pixels(pngs, table.num_rows, IMAGE_SIZE)
    return fit_clip.SynthData(pixels, np.stack(codes, axis=1), names, vocab)


def _checkpoint_config(arch: str, model: object) -> dict[str, object]:
    """open_clip's local-dir config: the architecture and the preprocessing the model was trained with."""
    preprocess = model.visual.preprocess_cfg  # type: ignore[attr-defined]
    return {
        "model_cfg": open_clip_module().get_model_config(arch),
        "preprocess_cfg": {
            "mean": list(preprocess["mean"]),
            "std": list(preprocess["std"]),
            "interpolation": preprocess["interpolation"],
            "resize_mode": preprocess["resize_mode"],
        },
    }


def _write_json(path: Path, payload: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

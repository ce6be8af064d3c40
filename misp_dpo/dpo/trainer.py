"""The train stage's core: `train_policy` loads the policy, gets the reference log-probs, and runs the
loop from the last checkpoint to the end, writing metrics, checkpoints and the trained weights.

Only rank 0 writes (metrics.jsonl, checkpoints, the adapter); every rank computes. On resume the
newest checkpoint restores weights, optimizer, schedule and RNGs, and metrics.jsonl is cut back to
that step, so an interrupted and resumed run writes the same files as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from misp_dpo.dpo.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from misp_dpo.dpo.data import PreferenceData
from misp_dpo.dpo.distributed import DistInfo, barrier, init, shutdown
from misp_dpo.dpo.loop import (
    LoopConfig,
    TrainState,
    backward_step,
    make_optimizer,
    optimizer_step,
    step_record,
    total_steps,
)
from misp_dpo.dpo.losses import LossConfig
from misp_dpo.dpo.model import ModelConfig, Policy, base_reference, load_policy, save_policy
from misp_dpo.dpo.reference import Failure, ReferenceCache, ReferenceLogps, align_reference, reference_pass
from misp_dpo.dpo.sequences import SequenceEncoder
from misp_dpo.dpo.step import StepPlan
from misp_dpo.dpo.tiny import parse_tiny, tiny_model, tiny_processor
from misp_dpo.log import log_event, progress

METRICS = "metrics.jsonl"
PROPOSAL_FITS = "proposal_fits.jsonl"  # --proposal fitted: q_phi's w at each refit
ADAPTER = "adapter"  # LoRA: the peft adapter folder
MODEL = "model"  # --no-lora: the whole fine-tuned model
BASE = "base"


@dataclass(frozen=True)
class TrainOutcome:
    """What one process did: counts for the stats, the reference pass's failures, files rank 0 wrote."""

    pairs: int
    trained_pairs: int
    steps: int
    failures: list[Failure]  # (pair_id, reason, detail)
    files: list[str]  # relative to `out`


class NothingToTrain(ValueError):
    """No pair of the dataset can be trained on; the caller names the dataset in its error."""


def train_policy(
    negatives: pa.Table,
    image_root: Path,
    out: Path,
    *,
    model: str,
    options: ModelConfig,
    loss: LossConfig,
    loop: LoopConfig,
    seed: int,
    dist: DistInfo,
    cache: ReferenceCache,
    facts: Mapping[str, Any],
) -> TrainOutcome:
    """Train `model` on the listwise `negatives` rows (images under `image_root`): all one process does.

    Every torchrun rank calls this; rank 0 alone writes under `out` (metrics, checkpoints, the trained
    weights, their card listing `facts`). Raises NothingToTrain when no pair has readable images and
    reference log-probs.
    """
    policy = load_policy(model, options, seed, dist.local_rank)
    init(dist, policy.device)
    data = PreferenceData(negatives, image_root)
    table, failures = reference_pass(policy, data, loop.ref_batch_size, dist, cache)
    reference = align_reference(table, data)
    rows = reference.trainable(data.counts)
    if len(rows) == 0:
        raise NothingToTrain("no pair has readable images and negatives to train on")
    state = build_state(policy, data, reference, rows, loss, loop, seed, dist)
    records = run_training(state, out, show_progress=dist.is_main)
    files = save_outputs(policy, model, seed, out, facts) if dist.is_main else []
    barrier()
    shutdown()
    if records:
        log_event("training done", **{k: records[-1][k] for k in ("step", "loss", "accuracy", "margin")})
    return TrainOutcome(len(data), len(rows), total_steps(loop, len(rows), dist.world), failures, files)


def build_state(
    policy: Policy,
    data: PreferenceData,
    reference: ReferenceLogps,
    rows: np.ndarray,
    loss: LossConfig,
    loop: LoopConfig,
    seed: int,
    dist: DistInfo,
) -> TrainState:
    """The per-process training state; under torchrun the model is wrapped in DDP (gloo on CPU)."""
    model = policy.model
    if dist.enabled:
        device_ids = [policy.device.index] if policy.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    plan = StepPlan(loop.sample_negatives, loop.proposal, seed)
    encoder = SequenceEncoder(policy.processor)
    return TrainState(policy, model, encoder, data, reference, rows, loss, loop, plan, dist)


def _rewind_metrics(path: Path, step: int) -> None:
    """Keep only the lines of steps <= `step` (those written after the checkpoint are redone)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def run_training(
    state: TrainState,
    out: Path,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Train from the newest checkpoint in `out` (or from scratch) to the last step; returns new records."""
    steps = total_steps(state.loop, len(state.rows), state.dist.world)
    optimizer, scheduler = make_optimizer(state, steps)
    torch.manual_seed(state.plan.seed)
    start = 0
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, state.policy.trainable(), optimizer, scheduler)
        log_event("resuming training", checkpoint=str(checkpoint), step=start, steps=steps)
    metrics_path = out / METRICS
    state.fits = out / PROPOSAL_FITS
    if state.dist.is_main:
        _rewind_metrics(metrics_path, start)
    state.model.train()
    records: list[dict[str, Any]] = []
    bar = progress(total=steps, initial=start, desc="train", unit="step", disable=not show_progress)
    started = time.perf_counter()
    for step in range(start, steps):
        metrics = backward_step(state, step)
        lr = scheduler.get_last_lr()[0]
        record = step_record(step, metrics, optimizer_step(state, optimizer, scheduler), lr)
        records.append(record)
        if state.dist.is_main:
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
        if show_progress and bar.disable and (step + 1) % max(1, steps // 20) == 0:  # logs, not a terminal
            log_event(
                "train step", **{k: record[k] for k in ("step", "loss", "accuracy", "margin")}, steps=steps
            )
        if (step + 1) % state.loop.checkpoint_every == 0 or step + 1 == steps:
            if state.dist.is_main:
                save_checkpoint(out, step + 1, state.policy.trainable(), optimizer, scheduler)
                prune_checkpoints(out, state.loop.keep_checkpoints)
            barrier()
        if on_step is not None:
            on_step(record)
    bar.close()
    if records:
        seconds = time.perf_counter() - started
        log_event("trained", steps=len(records), seconds_per_step=round(seconds / len(records), 4))
    return records


def save_outputs(
    policy: Policy, spec: str, seed: int, out: Path, facts: Mapping[str, Any] | None = None
) -> list[str]:
    """Write the trained weights (peft adapter, or the full model without LoRA) and the tiny base.

    Returns the written files relative to `out`. The tiny base is rebuilt from spec and seed, so
    `AutoModelForImageTextToText.from_pretrained(out/base)` + the adapter reproduce the policy; the
    adapter names it by absolute path (a hub id or local folder otherwise), and its model card lists
    `facts` (dataset, loss settings) and the last step's metrics.
    """
    size = parse_tiny(spec)
    if size is not None:
        processor = tiny_processor()
        tiny_model(size, processor, seed).save_pretrained(out / BASE, safe_serialization=True)
        processor.save_pretrained(out / BASE)
    base = str((out / BASE).resolve()) if size is not None else base_reference(spec)
    card = {**(facts or {}), **_last_metrics(out)}
    save_policy(policy, out / (ADAPTER if policy.lora else MODEL), base, card)
    folders = [out / name for name in (ADAPTER, MODEL, BASE) if (out / name).is_dir()]
    return sorted(str(p.relative_to(out)) for folder in folders for p in folder.rglob("*") if p.is_file())


def _last_metrics(out: Path) -> dict[str, Any]:
    """The last training step's loss, accuracy and margin, for the model card."""
    path = out / METRICS
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not lines:
        return {}
    last = json.loads(lines[-1])
    return {"final step": {k: last[k] for k in ("step", "loss", "accuracy", "margin") if k in last}}

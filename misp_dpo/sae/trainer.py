"""Training either SAE variant on a `Dataset`: settings, the step, logging, checkpoints, evaluation.

The loop is split as sparsify's trainer is: `train_step` does one optimiser step, `_Log` collects
per-step scalars (synchronising with the device only every `log_every` steps) and drives the
progress bar, and a `Checkpointer` (given by the caller, who owns the files) saves and restores the
full training state, so an interrupted run resumes at its last checkpoint and, on CPU, ends with
the same bits as an uninterrupted one. Everything is fp32 and seeded: the init from a CPU
generator, the data order from `data.epoch_windows`.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from misp_dpo.log import log_event, progress
from misp_dpo.sae.checkpoint import SaeSpec
from misp_dpo.sae.config import SaeSettings
from misp_dpo.sae.data import Dataset, chunk_ranges, concat, sequential, train_stream
from misp_dpo.sae.metrics import HeldOut
from misp_dpo.sae.stats import InputStats, input_stats
from misp_dpo.sae.steps import PaperSteps, TopKSteps, paper_evaluate, topk_evaluate


@dataclass(frozen=True, kw_only=True)
class TrainSettings(SaeSettings):
    """The SAE's settings plus what one run decides; 0 means "the default" where noted (`resolve`)."""

    dead_after: int = 0  # topk, samples without firing; 0: min(10M, training images)
    seed: int = 0
    device: str = "cpu"
    preload_bytes: int = -1  # -1: half the free GPU memory, or a quarter of the free RAM
    log_every: int = 10


# [ours] Adam moves every entry of the D×D matrices W_k, M_k by about lr per step, a change of norm
# ~lr·D per latent, mostly noise (a batch's gradient has rank <= its pair count); lr ∝ 1/D keeps that
# noise constant across CLIP sizes. 0.016/D: stable from D = 64 (2.5e-4) to D = 512 (3.1e-5) on our
# data, where lr·D = 0.06 already made the loss rise above the mean predictor's at D = 512.
PAPER_LR_TIMES_D = 0.016


class TrainResult(NamedTuple):
    model: torch.nn.Module
    spec: SaeSpec
    settings: TrainSettings  # resolved: no zeros left
    stats: InputStats
    history: dict[str, list[float]]  # per step
    metrics: dict[str, Any]  # held-out
    seconds: float  # training wall time (not in the outputs: they must not depend on timing)
    cpu_seconds: float  # CPU time of this process during the training loop
    throughput: float  # training samples per second


class Checkpointer(Protocol):
    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...

    def due(self, step: int) -> bool: ...


def resolve(settings: TrainSettings, dim: int, stats: InputStats) -> TrainSettings:
    latents = settings.latents or (128 if settings.variant == "paper" else 8 * dim)
    if settings.variant == "topk" and not 0 < settings.k <= latents:
        raise ValueError(f"k ({settings.k}) must be between 1 and latents ({latents})")
    lr = settings.lr or (
        PAPER_LR_TIMES_D / dim if settings.variant == "paper" else 2e-4 / math.sqrt(latents / 2**14)
    )
    # auto: large batches, but at least ~32 steps per epoch on small data (the demo has ~4k images)
    largest = 16384 if settings.device.startswith("cuda") else 4096
    batch = settings.batch_size or min(largest, max(128, stats.samples // 32))
    batch = min(batch, stats.samples)
    steps = settings.steps or max(1, math.ceil(settings.epochs * stats.samples / batch))
    return replace(
        settings,
        latents=latents,
        lr=lr,
        batch_size=batch,
        steps=steps,
        aux_k=settings.aux_k or max(1, dim // 2),
        dead_after=settings.dead_after or min(10_000_000, stats.samples),
    )


def items_per_batch(settings: TrainSettings, stats: InputStats) -> int:
    """Pairs per step (paper: whole pools, as many as make ~batch_size differences) or images."""
    return max(1, round(settings.batch_size * stats.items / stats.samples))


def _to_device(device: str) -> Any:
    def move(chunk: Any) -> Any:
        return type(chunk)(*(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in chunk))

    return move


def _preload_budget(settings: TrainSettings) -> int:
    if settings.preload_bytes >= 0:
        return settings.preload_bytes
    if settings.device.startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0] * 0.5)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.25)
    except (ValueError, OSError):
        return 1 << 30


def _preload(dataset: Dataset, settings: TrainSettings, dim: int) -> Any:
    """Every item in device memory when it fits the budget; None means stream from the reader."""
    per_item = dim * 2 * (2 if settings.variant == "paper" else 1) + dataset.width * 8
    if dataset.num_items * per_item > _preload_budget(settings):
        return None
    chunks = [dataset.read(lo, hi) for lo, hi in chunk_ranges(dataset.num_items)]
    return _to_device(settings.device)(concat(chunks))


def build(spec: SaeSpec, stats: InputStats, seed: int, device: str) -> torch.nn.Module:
    model = spec.build()
    generator = torch.Generator().manual_seed(seed)
    model.initialise(generator, torch.from_numpy(stats.mean).float(), stats.scale)  # type: ignore[operator]
    return model.to(device)


def lr_factor(step: int, total: int) -> float:
    """Short linear warm-up, constant, then linear decay to 0 over the last 20% (notes §A6)."""
    warmup = min(1000, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int(total * 0.8)
    if step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def train_step(
    model: torch.nn.Module, steps: PaperSteps | TopKSteps, optimizer: torch.optim.Optimizer, batch: Any
) -> dict[str, torch.Tensor]:
    out = steps.loss(batch)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    steps.before_update()
    optimizer.step()
    steps.after_update()
    return out.logs


class _Log:
    """Per-step scalars, pulled from the device in groups, and the progress bar's live loss."""

    def __init__(
        self, history: dict[str, list[float]], total: int, start: int, every: int, desc: str
    ) -> None:
        self.history, self.every = history, every
        self.pending: list[dict[str, torch.Tensor]] = []
        self.bar = progress(total=total, initial=start, desc=desc, unit="step")

    def record(self, step: int, logs: dict[str, torch.Tensor], last: bool) -> None:
        self.pending.append(logs)
        if (step + 1) % self.every == 0 or last:
            self.flush()
        self.bar.update()

    def flush(self) -> None:
        if not self.pending:
            return
        for key in self.pending[0]:
            self.history[key].extend(torch.stack([p[key] for p in self.pending]).tolist())
        self.pending = []
        self.bar.set_postfix({k: f"{v[-1]:.4g}" for k, v in self.history.items()})

    def close(self) -> None:
        self.bar.close()


def _state(
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: PaperSteps | TopKSteps,
    history: dict[str, list[float]],
) -> dict[str, Any]:
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": dict(history),
    }
    if isinstance(steps, TopKSteps):
        state["since_fired"] = steps.since_fired
    return state


def _restore(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: PaperSteps | TopKSteps,
) -> tuple[int, dict[str, list[float]]]:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if isinstance(steps, TopKSteps):
        steps.since_fired.copy_(state["since_fired"])
    log_event("sae: resuming from checkpoint", step=state["step"])
    return int(state["step"]), defaultdict(list, state["history"])


def _steps(model: torch.nn.Module, dataset: Dataset, settings: TrainSettings) -> PaperSteps | TopKSteps:
    if settings.variant == "paper":
        assert dataset.images is not None
        images = torch.from_numpy(np.ascontiguousarray(dataset.images)).to(settings.device)
        return PaperSteps(model, images)  # type: ignore[arg-type]
    return TopKSteps(model, settings.aux_k, settings.aux_coef, settings.dead_after)  # type: ignore[arg-type]


def train_sae(
    dataset: Dataset, settings: TrainSettings, checkpointer: Checkpointer | None = None
) -> TrainResult:
    """Scan the inputs, train for `steps` batches, evaluate on the held-out items."""
    stats = input_stats(dataset, settings.variant)
    dim = int(stats.mean.shape[0])
    settings = resolve(settings, dim, stats)
    spec = SaeSpec(settings.variant, dim, settings.latents, settings.k, settings.rho, settings.gamma)
    model = build(spec, stats, settings.seed, settings.device)
    steps = _steps(model, dataset, settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    history: dict[str, list[float]] = defaultdict(list)
    start = 0
    if checkpointer is not None and (state := checkpointer.load()) is not None:
        start, history = _restore(state, model, optimizer, steps)
    per_batch = items_per_batch(settings, stats)
    stream = train_stream(
        dataset,
        settings.seed,
        per_batch,
        start,
        _preload(dataset, settings, dim),
        _to_device(settings.device),
    )
    log = _Log(history, settings.steps, start, settings.log_every, f"sae {settings.variant}")
    started, cpu = time.perf_counter(), time.process_time()
    model.train()
    for step in range(start, settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step, settings.steps)
        logs = train_step(model, steps, optimizer, next(stream))
        log.record(step, logs, last=step + 1 == settings.steps)
        if checkpointer is not None and step + 1 < settings.steps and checkpointer.due(step + 1):
            log.flush()
            checkpointer.save(_state(step + 1, model, optimizer, steps, history))
    log.close()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    metrics = evaluate(model, steps, dataset, per_batch, settings.device)
    throughput = (settings.steps - start) * settings.batch_size / max(seconds, 1e-9)
    return TrainResult(model, spec, settings, stats, dict(history), metrics, seconds, cpu, throughput)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, steps: Any, dataset: Dataset, per_batch: int, device: str
) -> dict[str, Any]:
    """Held-out metrics (metrics.py says what each one means)."""
    model.eval()
    paper = isinstance(steps, PaperSteps)
    latents: int = model.latents  # type: ignore[assignment]
    acc = HeldOut(latents, 0.5 if paper else 0.0, (0.0, 1.0))  # topk: inputs have energy 1
    stats = model.decoder_stats() if paper else None  # type: ignore[operator]
    move = _to_device(device)
    for chunk in sequential(dataset, heldout=True, batch_size=per_batch):
        if paper:
            paper_evaluate(steps, move(chunk), acc, stats)  # type: ignore[arg-type]
        else:
            topk_evaluate(steps, move(chunk), acc)
    return acc.result(sigmoid=paper)

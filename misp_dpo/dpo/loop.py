"""The training loop: data order, gradient accumulation, DDP, AdamW with warm-up + cosine, logging.

Step s trains on a fixed global batch of G = batch_size x grad_accum x world pairs: positions
[sG, (s+1)G) of the concatenation of per-epoch permutations (seeded by seed and epoch). Rank r's
k-th micro-batch is slice (k * world + r) of it, so one process with batch B * world and W processes
with batch B see the same pairs, and a resumed run sees the same pairs as an uninterrupted one.
Each micro-batch's loss is its pairs' summed loss over the pairs one rank sees per step; DDP's
gradient average over ranks then makes the step's gradient the mean over the global batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from misp_dpo.config import option
from misp_dpo.dpo.data import PreferenceData
from misp_dpo.dpo.distributed import DistInfo, sum_all
from misp_dpo.dpo.losses import LossConfig
from misp_dpo.dpo.model import Policy
from misp_dpo.dpo.reference import ReferenceLogps
from misp_dpo.dpo.sampling import FittedProposal
from misp_dpo.dpo.sequences import SequenceEncoder
from misp_dpo.dpo.step import StepPlan, draw_for, micro_batch_loss, refit_proposal
from misp_dpo.log import log_event

METRIC_SUMS: tuple[str, ...] = (
    "loss",
    "loss_image",
    "loss_text",
    "loss_anchor",
    "accuracy",
    "margin",
    "effective_negatives",
)
METRIC_SUMS += ("chosen_reward",)


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Optimisation, negative sampling, schedule and bookkeeping of the training loop."""

    sample_negatives: int = option(
        0,
        "M: negatives forwarded per pair and step, drawn with replacement from the dataset's proposal q "
        "with importance weights (unbiased estimate of sum_i exp(a_i)); 0 or >= N: all N, the exact loss",
    )
    proposal: Literal["dataset", "uniform", "fitted"] = option(
        "dataset",
        "what --sample-negatives draws from: the dataset's q_i (renormalised), uniform, or fitted [ours]: "
        "q_phi = softmax(w . mined fields), refitted every --refit-every steps to the model's a_i",
    )
    refit_every: int = option(50, "--proposal fitted: steps between refits of q_phi")
    fit_pairs: int = option(
        32, "--proposal fitted: held-out pairs whose a_i (all N forwarded) q_phi is fitted to"
    )
    epochs: float = option(1.0, "passes over the pairs (fractions allowed)")
    max_steps: int = option(0, "optimizer steps to run; 0: as many as --epochs take")
    batch_size: int = option(4, "pairs per micro-batch on each process (each pair forwards 2 + M sequences)")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    lr: float = option(1e-4, "peak AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.1, "share of the steps with a linear warm-up, then cosine decay to 0")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this; 0: no clipping")
    checkpoint_every: int = option(100, "save a resumable checkpoint every this many steps", hashed=False)
    keep_checkpoints: int = option(2, "checkpoints kept on disk (the newest ones)", hashed=False)
    ref_batch_size: int = option(32, "sequences per forward in the reference pass", hashed=False)

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum}
        positive |= {"checkpoint_every": self.checkpoint_every, "keep_checkpoints": self.keep_checkpoints}
        positive |= {"ref_batch_size": self.ref_batch_size, "refit_every": self.refit_every}
        positive |= {"fit_pairs": self.fit_pairs}
        bad = {k: v for k, v in positive.items() if v < 1}
        if bad:
            raise ValueError(f"must be at least 1: {bad}")
        if self.sample_negatives < 0 or self.max_steps < 0:
            raise ValueError(
                f"sample_negatives and max_steps must be >= 0, got {self.sample_negatives}, {self.max_steps}"
            )
        if self.epochs <= 0 or self.lr <= 0:
            raise ValueError(f"epochs and lr must be positive, got {self.epochs}, {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def total_steps(cfg: LoopConfig, pairs: int, world: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * pairs / (cfg.batch_size * cfg.grad_accum * world)))


def warmup_cosine(total: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear from 1/warmup up to 1 over the warm-up, then cosine down to 0 at `total`."""
    warmup = int(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def global_batch(rows: np.ndarray, step: int, size: int, seed: int) -> np.ndarray:
    """Dataset rows of step `step`'s global batch (positions [step*size, (step+1)*size) of the epochs)."""
    positions = np.arange(step * size, (step + 1) * size)
    epochs = positions // len(rows)
    out = np.empty(size, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(rows)
        at = epochs == epoch
        out[at] = order[positions[at] % len(rows)]
    return out


@dataclass
class TrainState:
    """What one process trains with; `model` is `policy.model`, wrapped in DDP under torchrun."""

    policy: Policy
    model: torch.nn.Module
    encoder: SequenceEncoder
    data: PreferenceData
    reference: ReferenceLogps
    rows: np.ndarray  # trainable dataset rows
    loss: LossConfig
    loop: LoopConfig
    plan: StepPlan
    dist: DistInfo
    fitted: FittedProposal | None = None  # --proposal fitted: q_phi, (re)fitted by `maybe_refit`
    fits: Path | None = None  # where each refit's w is logged (JSON lines), so a resumed run reuses it


def maybe_refit(state: TrainState, step: int, batch: np.ndarray) -> None:
    """Refit q_phi every `refit_every` steps on `fit_pairs` held-out pairs outside this step's batch,
    with the model as it is now. Every rank computes the same fit from the same weights, so draws stay
    consistent across ranks. A resumed run takes the fit in force at its first step from `fits`, so
    it draws what an uninterrupted run would have drawn."""
    cfg, plan = state.loop, state.plan
    if plan.proposal != "fitted" or plan.sample_negatives <= 0:
        return
    if state.fitted is None:
        state.fitted = FittedProposal.for_data(state.data.fields[state.rows], state.data.counts[state.rows])
        if step % cfg.refit_every and _restore_fit(state, step):
            return  # resumed between refits (without a record, it refits now: not the same draws)
        if step % cfg.refit_every == 0:
            _restore_fit(state, step)  # the previous fit, which this refit starts from
    elif step % cfg.refit_every:
        return
    outside = np.setdiff1d(state.rows, batch)
    pool = outside if len(outside) else state.rows
    rng = np.random.default_rng([plan.seed, step, 1])
    held_out = rng.choice(pool, size=min(cfg.fit_pairs, len(pool)), replace=False)
    model: torch.nn.Module = state.model.module if hasattr(state.model, "module") else state.model  # type: ignore[assignment]
    was_training = model.training
    model.eval()
    variance = refit_proposal(
        state.fitted,
        model,
        state.policy.device,
        state.encoder,
        state.data,
        state.reference,
        held_out,
        state.loss.beta,
    )
    model.train(was_training)
    if state.dist.is_main:
        log_event(
            "proposal refit",
            step=step,
            relative_variance_before=round(float(variance[0].mean()), 4),
            relative_variance_after=round(float(variance[1].mean()), 4),
            w=[round(float(v), 4) for v in state.fitted.w],
        )
        if state.fits is not None:
            record = {"step": step, "w": state.fitted.w.tolist(), "variance": variance.mean(axis=1).tolist()}
            state.fits.parent.mkdir(parents=True, exist_ok=True)
            with open(state.fits, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def _restore_fit(state: TrainState, step: int) -> bool:
    """Load the last fit made before `step` (at `step` itself a refit follows) and drop later ones."""
    if state.fits is None or state.fitted is None or not state.fits.is_file():
        return False
    cut = step if step % state.loop.refit_every == 0 else step + 1
    records = [json.loads(line) for line in state.fits.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["step"] < cut]
    if state.dist.is_main and len(kept) < len(records):
        state.fits.write_text("".join(json.dumps(r) + "\n" for r in kept))
    if not kept:
        return False
    state.fitted.w = np.array(kept[-1]["w"], dtype=np.float64)
    return True


def backward_step(state: TrainState, step: int) -> dict[str, float]:
    """Forward and backward every micro-batch of this rank for `step`; gradients end up synced.

    Returns the step's metrics, averaged over the global batch (identical on every rank).
    """
    cfg, dist = state.loop, state.dist
    batch = global_batch(state.rows, step, cfg.batch_size * cfg.grad_accum * dist.world, state.plan.seed)
    per_rank = cfg.batch_size * cfg.grad_accum
    maybe_refit(state, step, batch)
    sums = torch.zeros(len(METRIC_SUMS) + 1, dtype=torch.float64)
    for k in range(cfg.grad_accum):
        lo = (k * dist.world + dist.rank) * cfg.batch_size
        rows = batch[lo : lo + cfg.batch_size]
        draw = draw_for(state.data, rows, state.plan, step, state.fitted)
        last = k == cfg.grad_accum - 1
        sync = nullcontext() if last or not hasattr(state.model, "no_sync") else state.model.no_sync()  # type: ignore[operator]
        with sync:
            terms, stats = micro_batch_loss(
                state.model,
                state.policy.device,
                state.encoder,
                state.data,
                state.reference,
                rows,
                draw,
                state.loss,
            )
            (terms.total.sum() / per_rank).backward()
        values = [terms.total, terms.image, terms.text, terms.anchor, *stats]
        sums += torch.tensor(
            [float(v.detach().double().sum()) for v in values] + [len(rows)], dtype=torch.float64
        )
    totals = sum_all(sums.to(state.policy.device)).cpu()
    count = float(totals[-1])
    return {name: float(totals[i]) / count for i, name in enumerate(METRIC_SUMS)}


def optimizer_step(
    state: TrainState, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> float:
    """Clip, step, zero; returns the gradient norm before clipping."""
    params = [p for p in state.model.parameters() if p.requires_grad]
    limit = state.loop.max_grad_norm if state.loop.max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def make_optimizer(state: TrainState, steps: int) -> tuple[Any, Any]:
    params = [p for p in state.policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=state.loop.lr, weight_decay=state.loop.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, state.loop.warmup_ratio))
    return optimizer, scheduler


def step_record(step: int, metrics: dict[str, float], grad_norm: float, lr: float) -> dict[str, Any]:
    """One line of metrics.jsonl; no wall-clock times, so a resumed run writes the same bytes."""
    return {
        "step": step + 1,
        **{k: round(v, 6) for k, v in metrics.items()},
        "grad_norm": round(grad_norm, 6),
        "lr": lr,
    }


@torch.no_grad()
def evaluate(state: TrainState, rows: np.ndarray) -> dict[str, float]:
    """Mean exact-loss metrics over `rows` (all stored negatives, no update): a fixed yardstick.

    Unlike the per-step metrics it does not depend on the batch drawn, so runs can be compared.
    """
    was_training = state.model.training
    state.model.eval()
    sums = np.zeros(len(METRIC_SUMS))
    exact = StepPlan(0, state.plan.proposal, state.plan.seed)
    for lo in range(0, len(rows), state.loop.batch_size):
        chunk = rows[lo : lo + state.loop.batch_size]
        draw = draw_for(state.data, chunk, exact, 0)
        terms, stats = micro_batch_loss(
            state.policy.model,
            state.policy.device,
            state.encoder,
            state.data,
            state.reference,
            chunk,
            draw,
            state.loss,
        )
        values = [terms.total, terms.image, terms.text, terms.anchor, *stats]
        sums += [float(v.double().sum()) for v in values]
    state.model.train(was_training)
    return {name: float(sums[i] / max(1, len(rows))) for i, name in enumerate(METRIC_SUMS)}

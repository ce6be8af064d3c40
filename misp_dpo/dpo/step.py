"""One micro-batch: draw negatives, forward each distinct (response, image) once, compute the losses.

Per pair the forward holds the chosen response with the positive and with each drawn negative, and
the rejected response with the positive (when the text term is on and the pair has one): 2 + M
sequences instead of 2 + N. All of a micro-batch's sequences go through the model together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from misp_dpo.dpo.data import PairRecord, PreferenceData, load_image
from misp_dpo.dpo.losses import LossConfig, LossTerms, PairStats, pair_stats, preference_loss
from misp_dpo.dpo.reference import ReferenceLogps
from misp_dpo.dpo.sampling import Draw, FittedProposal, Proposal, draw_negatives, relative_variance
from misp_dpo.dpo.sequences import Encoded, SequenceEncoder, collate, sequence_logps


@dataclass(frozen=True)
class StepPlan:
    """How a step treats negatives: M (0 = all N, exact) and the proposal the draws follow."""

    sample_negatives: int
    proposal: Proposal
    seed: int


def pair_rngs(seed: int, step: int, rows: np.ndarray) -> list[np.random.Generator]:
    """One generator per (seed, step, pair row): a pair's draw is the same whatever the batch layout."""
    return [np.random.default_rng([seed, step, int(row)]) for row in rows]


def draw_for(
    data: PreferenceData, rows: np.ndarray, plan: StepPlan, step: int, fitted: FittedProposal | None = None
) -> Draw:
    """The step's draw; `--proposal fitted` draws from `fitted`'s q~ (the dataset's q until one exists)."""
    proposals = data.proposals[rows]
    if plan.proposal == "fitted" and fitted is not None and plan.sample_negatives > 0:
        proposals = fitted.probabilities(data.fields[rows], data.counts[rows])
    return draw_negatives(
        proposals,
        data.counts[rows],
        plan.sample_negatives,
        plan.proposal,
        pair_rngs(plan.seed, step, rows),
    )


def pair_sequences(
    records: list[PairRecord], draw: Draw, encoder: SequenceEncoder, data: PreferenceData, use_text: bool
) -> tuple[Encoded, list[int], np.ndarray, list[int]]:
    """The micro-batch's sequences, and where each pair's positive, negatives and rejected sit."""
    items: list[tuple[str, str, Image.Image]] = []
    positive_at: list[int] = []
    negative_at = np.full(draw.index.shape, -1, dtype=np.int64)
    rejected_at: list[int] = []
    for b, record in enumerate(records):
        positive = load_image(record.positive.uri, data.root)
        positive_at.append(len(items))
        items.append((record.prompt, record.chosen, positive))
        for k, index in enumerate(draw.index[b]):
            if index >= 0:
                negative_at[b, k] = len(items)
                image = load_image(record.negatives[index].uri, data.root)
                items.append((record.prompt, record.chosen, image))
        rejected_at.append(len(items) if use_text and record.rejected else -1)
        if rejected_at[-1] >= 0:
            items.append((record.prompt, record.rejected or "", positive))
    return encoder.encode(items), positive_at, negative_at, rejected_at


def micro_batch_loss(
    model: torch.nn.Module,
    device: torch.device,
    encoder: SequenceEncoder,
    data: PreferenceData,
    reference: ReferenceLogps,
    rows: np.ndarray,
    draw: Draw,
    loss_cfg: LossConfig,
) -> tuple[LossTerms, PairStats]:
    """Per-pair loss terms and stats for `rows`, with the policy forward holding the graph."""
    h_pos, h_neg, log_weights, h_rejected, has_rejected = pair_rewards(
        model, device, encoder, data, reference, rows, draw, loss_cfg.text_weight > 0
    )
    terms = preference_loss(loss_cfg, h_pos, h_neg, log_weights, h_rejected, has_rejected)
    return terms, pair_stats(h_pos.detach(), h_neg.detach(), log_weights, loss_cfg.beta)


def pair_rewards(
    model: torch.nn.Module,
    device: torch.device,
    encoder: SequenceEncoder,
    data: PreferenceData,
    reference: ReferenceLogps,
    rows: np.ndarray,
    draw: Draw,
    use_text: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h_p (B,), h_i (B, K) of the drawn negatives, their log weights, h of the rejected, has_rejected)."""
    records = data.records(rows)
    encoded, positive_at, negative_at, rejected_at = pair_sequences(records, draw, encoder, data, use_text)
    dtype = next(p for p in model.parameters()).dtype
    batch = collate([encoded], encoder.tokenizer.pad_token_id or 0).to(device, dtype)
    logps = sequence_logps(model, batch)

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=device)

    h_pos = logps[positive_at] - tensor(reference.positive[rows])
    present = negative_at >= 0
    gathered = logps[torch.as_tensor(np.where(present, negative_at, 0), device=device)]
    slots = np.where(present, draw.index, 0)
    ref_neg = np.where(present, reference.negatives[rows[:, None], slots], 0.0)
    h_neg = torch.where(
        torch.as_tensor(present, device=device), gathered - tensor(ref_neg), torch.zeros_like(gathered)
    )
    log_weights = tensor(draw.log_weight)
    ref_rejected = reference.rejected[rows]
    has_rejected = torch.as_tensor((np.array(rejected_at) >= 0) & np.isfinite(ref_rejected), device=device)
    rejected_logps = logps[torch.as_tensor(np.maximum(rejected_at, 0), device=device)]
    h_rejected = torch.where(
        has_rejected, rejected_logps - tensor(np.nan_to_num(ref_rejected)), h_pos.detach()
    )
    return h_pos, h_neg, log_weights, h_rejected, has_rejected


@torch.no_grad()
def refit_proposal(
    fitted: FittedProposal,
    model: torch.nn.Module,
    device: torch.device,
    encoder: SequenceEncoder,
    data: PreferenceData,
    reference: ReferenceLogps,
    rows: np.ndarray,
    beta: float,
) -> np.ndarray:
    """Refit q_phi on the current model's a_i = beta (h_i - h_p) over every stored negative of `rows`
    (a held-out batch); returns each pair's relative variance at M = 1 before and after, (2, B)."""
    width = int(data.counts[rows].max(initial=0))
    index = np.where(np.arange(width)[None, :] < data.counts[rows, None], np.arange(width)[None, :], -1)
    draw = Draw(index=index, log_weight=np.where(index >= 0, 0.0, -np.inf))
    h_pos, h_neg, *_ = pair_rewards(model, device, encoder, data, reference, rows, draw, use_text=False)
    a = (beta * (h_neg - h_pos[:, None])).double().cpu().numpy()
    fields, counts = data.fields[rows, :width], data.counts[rows]
    before = relative_variance(a, fitted.probabilities(fields, counts), counts)
    fitted.fit(fields, counts, a)
    return np.stack([before, relative_variance(a, fitted.probabilities(fields, counts), counts)])

"""The MISP-DPO objective in plain torch (docs/method.md §4).

Every term takes implicit rewards h(m) = log pi_theta(y|x,m) - log pi_ref(y|x,m), one per sequence:

- image term (Plackett-Luce, the positive ranked first among 1 + N images):
  L_img = log(1 + sum_i w_i exp(a_i)), a_i = beta (h(m_i) - h(m_p)), computed as the cross-entropy of
  softmax([beta h_p, beta h_i + log w_i]) at index 0, never by summing raw exponentials (S-DPO's
  overflow). w_i = 1 gives the exact loss; importance sampling passes log w_i (see `sampling.py`);
- text term: DPO of the chosen response against the rejected one, both with the positive image;
- anchor (mDPO, off by default): -log sigmoid(beta h_p), against DPO's falling chosen likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from misp_dpo.config import option


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Weights and temperature of the three terms (the paper: beta 0.5, lambda_text 1, no anchor)."""

    beta: float = option(0.5, "DPO temperature beta (the paper's best; its good range is 0.45-0.75)")
    image_weight: float = option(1.0, "weight of the Plackett-Luce image term (positive vs N negatives)")
    text_weight: float = option(
        1.0, "lambda: weight of the text DPO term (chosen vs rejected, positive image)"
    )
    anchor_weight: float = option(0.0, "weight of mDPO's anchor -log sigmoid(beta h_p); 0 = off (the paper)")

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        weights = {"image_weight": self.image_weight, "text_weight": self.text_weight}
        weights["anchor_weight"] = self.anchor_weight
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative or sum(weights.values()) <= 0:
            raise ValueError(
                f"image_weight, text_weight, anchor_weight must be >= 0, not all 0; got {weights}"
            )


class LossTerms(NamedTuple):
    """Per-pair losses (shape (B,)); `total` is the weighted sum that is minimised."""

    total: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor
    anchor: torch.Tensor


class PairStats(NamedTuple):
    """Per-pair diagnostics (shape (B,)), detached: what `metrics.jsonl` averages."""

    correct: torch.Tensor  # 1.0 where h_p > max_i h_i
    margin: torch.Tensor  # h_p - max_i h_i, the gap to the hardest negative
    effective_negatives: torch.Tensor  # exp(entropy of the (weighted) softmax over negatives)
    chosen_reward: torch.Tensor  # h_p itself: DPO tends to lower the chosen likelihood (the anchor's target)


def image_loss(
    h_pos: torch.Tensor, h_neg: torch.Tensor, beta: float, log_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Plackett-Luce top-1 loss per pair: CE of softmax([beta h_p, beta h_i + log w_i]) at 0.

    h_pos: (B,); h_neg: (B, K); log_weights: (B, K), -inf marks padding (pairs with fewer negatives).
    At K = 1 and w = 1 this is -log sigmoid(beta (h_p - h_n)), mDPO's conditional image term.
    """
    logits = beta * torch.cat([h_pos.unsqueeze(1), h_neg], dim=1)
    if log_weights is not None:
        logits = logits + F.pad(log_weights, (1, 0), value=0.0)
    target = torch.zeros(h_pos.shape[0], dtype=torch.long, device=h_pos.device)
    return F.cross_entropy(logits, target, reduction="none")


def text_loss(h_chosen: torch.Tensor, h_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Standard DPO per pair: -log sigmoid(beta (h_chosen - h_rejected)), both with the positive image."""
    return -F.logsigmoid(beta * (h_chosen - h_rejected))


def anchor_loss(h_pos: torch.Tensor, beta: float) -> torch.Tensor:
    """mDPO's reward anchor with delta = 0: keeps the chosen response's likelihood from falling."""
    return -F.logsigmoid(beta * h_pos)


def preference_loss(
    cfg: LossConfig,
    h_pos: torch.Tensor,
    h_neg: torch.Tensor,
    log_weights: torch.Tensor,
    h_rejected: torch.Tensor,
    has_rejected: torch.Tensor,
) -> LossTerms:
    """All terms for B pairs; pairs without a rejected response (has_rejected False) get no text term."""
    image = image_loss(h_pos, h_neg, cfg.beta, log_weights)
    rejected = torch.where(has_rejected, h_rejected, h_pos.detach())
    text = torch.where(has_rejected, text_loss(h_pos, rejected, cfg.beta), torch.zeros_like(h_pos))
    anchor = anchor_loss(h_pos, cfg.beta)
    total = cfg.image_weight * image + cfg.text_weight * text
    if cfg.anchor_weight:
        total = total + cfg.anchor_weight * anchor
    return LossTerms(total=total, image=image, text=text, anchor=anchor)


@torch.no_grad()
def pair_stats(h_pos: torch.Tensor, h_neg: torch.Tensor, log_weights: torch.Tensor, beta: float) -> PairStats:
    """Accuracy, margin to the hardest negative and effective number of negatives, per pair.

    Only the negatives forwarded this step count (padding has log weight -inf); the effective number
    is exp(H) of softmax(beta h_i + log w_i), the share of the gradient each negative gets.
    """
    present = torch.isfinite(log_weights)
    hardest = torch.where(present, h_neg, torch.full_like(h_neg, -torch.inf)).amax(dim=1)
    margin = h_pos - hardest
    logits = torch.where(present, beta * h_neg + log_weights, torch.full_like(h_neg, -torch.inf))
    log_p = torch.log_softmax(logits, dim=1)
    entropy = -(torch.where(present, log_p.exp() * log_p, torch.zeros_like(log_p))).sum(dim=1)
    correct = (margin > 0).to(h_pos.dtype)
    return PairStats(correct, margin, entropy.exp(), h_pos)

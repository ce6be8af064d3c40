"""TopK SAE on image embeddings (docs/method.md [ours]; Gao et al. 2024, "Scaling and evaluating SAEs").

z = ReLU(TopK(W_enc (x − b_dec) + b_enc)) with a per-sample k, x̂ = W_decᵀ z + b_dec, unit-norm decoder
rows, and the AuxK loss that lets dead latents learn from the residual. The AuxK details follow
the bugs other libraries fixed (sparsify PR #134, SAELens PR #432): the residual is detached, the
auxiliary reconstruction has no b_dec (sparsify PR #134), it is normalised by the same total
variance as the main FVU (dictionary_learning PR #36), and k_aux comes from d_in (SAELens PR #432).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class TopKOutput(NamedTuple):
    values: torch.Tensor  # (n, k) kept activations
    indices: torch.Tensor  # (n, k) their latents
    pre: torch.Tensor  # (n, L) pre-activations, before the ReLU
    x_hat: torch.Tensor  # (n, D)


class TopKLoss(NamedTuple):
    loss: torch.Tensor  # fvu + aux_coef * min(n_dead / k_aux, 1) * auxk
    fvu: torch.Tensor  # Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch (mean-centred)
    auxk: torch.Tensor  # ‖e − ê‖² / the same total variance; 0 without dead latents
    output: TopKOutput


class TopKSAE(nn.Module):
    scale: torch.Tensor  # a registered buffer
    """W_enc (L, D), W_dec (L, D) with unit rows, biases b_enc (L,), b_dec (D,)."""

    def __init__(self, dim: int, latents: int, k: int) -> None:
        super().__init__()
        if not 0 < k <= latents:
            raise ValueError(f"k must be in 1..latents ({latents}), got {k}")
        self.dim, self.latents, self.k = dim, latents, k
        self.W_enc = nn.Parameter(torch.zeros(latents, dim))
        self.b_enc = nn.Parameter(torch.zeros(latents))
        self.W_dec = nn.Parameter(torch.zeros(latents, dim))
        self.b_dec = nn.Parameter(torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))  # input multiplier: E‖scale·(x − x̄)‖² = 1

    def initialise(self, generator: torch.Generator, data_mean: torch.Tensor, scale: float) -> None:
        """Random unit decoder rows, W_enc = W_decᵀ, b_dec at the (scaled) data mean."""
        rows = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
        rows /= rows.norm(dim=1, keepdim=True)
        with torch.no_grad():
            self.W_dec.copy_(rows)
            self.W_enc.copy_(rows)
            self.b_enc.zero_()
            self.b_dec.copy_(data_mean * scale)
            self.scale.fill_(scale)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """W_enc (x − b_dec) + b_enc before the ReLU, with W_enc b_dec as its own (L,) term: the input
        needs no gradient, so the backward is one n·L·D product instead of two."""
        return x @ self.W_enc.T + (self.b_enc - self.W_enc @ self.b_dec)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_i values_i · W_dec[indices_i] as one gather-sum (memory n·k·D, not n·L)."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")

    def forward(self, x: torch.Tensor) -> TopKOutput:
        """TopK then ReLU: the same codes as ReLU then TopK (ReLU is monotone; only the latents that
        would carry a zero may differ), without two elementwise passes over the (n, L) block."""
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        values = F.relu(values)
        return TopKOutput(values, indices, pre, self.decode(values, indices) + self.b_dec)

    @staticmethod
    def dense_codes(out: TopKOutput) -> torch.Tensor:
        """(n, L) codes with zeros off the support: what mining compares between images."""
        return torch.zeros_like(out.pre).scatter_(-1, out.indices, out.values)

    def loss(self, x: torch.Tensor, dead: torch.Tensor, aux_k: int, aux_coef: float) -> TopKLoss:
        """FVU + AuxK on a batch; `dead` (L,) marks latents that have not fired for a while."""
        out = self.forward(x)
        residual = x - out.x_hat
        total_variance = ((x - x.mean(0)) ** 2).sum().clamp_min(1e-12)
        fvu = (residual**2).sum() / total_variance
        n_dead = int(dead.sum())
        if n_dead == 0 or aux_coef == 0:
            return TopKLoss(fvu, fvu, fvu.new_zeros(()), out)
        k_aux = min(aux_k, n_dead)
        dead_ids = dead.nonzero().squeeze(1)
        # the top k_aux of the dead latents, from their columns of the (autograd) pre-activations
        dead_pre = F.relu(out.pre[:, dead_ids])
        aux_values, aux_local = dead_pre.topk(k_aux, dim=-1, sorted=False)
        aux_hat = F.embedding_bag(aux_local, self.W_dec[dead_ids], per_sample_weights=aux_values, mode="sum")
        auxk = ((residual.detach() - aux_hat) ** 2).sum() / total_variance  # no b_dec: it models the residual
        scale = min(n_dead / aux_k, 1.0)
        return TopKLoss(fvu + aux_coef * scale * auxk, fvu, auxk, out)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove each decoder row's gradient component along the row, so the step keeps ‖row‖ ≈ 1."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

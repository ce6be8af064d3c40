"""The paper's SAE on fused differences d = vec(Δv tᵀ), Δv = v(m_p) − v(m_c), without materialising d.

d has D² entries (262 144 at D = 512), but it is rank one, so every quantity the model needs is a
bilinear form in (Δv, t) (docs/method.md):

- encoder: pre_k = ⟨W_k, Δv tᵀ⟩ + b_k = Δvᵀ W_k t + b_k, with W_k the k-th encoder row as a D×D matrix;
- reconstruction d̂ = Σ_k z_k M_k + B (M_k the k-th decoder column as D×D, B the decoder bias), so
  ‖d − d̂‖² = ‖Δv‖²‖t‖² − 2 Σ_k z_k Δvᵀ M_k t − 2 Δvᵀ B t + zᵀ G z + 2 zᵀ c + ‖B‖²,
  with G = [⟨M_j, M_k⟩] the decoder's L×L Gram matrix and c_k = ⟨M_k, B⟩.

A pair's candidates share its prompt t, so W_k t and M_k t are computed once per pair, (P, L, D), and
each candidate costs two (K×D)·(D×L) products: memory grows with pairs × latents × D, never × D².
Data arrive as pool blocks: Δv (P, K, D) already multiplied by the stored input scale, t (P, D).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class PaperOutput(NamedTuple):
    """One pool block through the model; `error` is ‖d − d̂‖² per (pair, candidate), scaled units."""

    pre: torch.Tensor  # (P, K, L) pre-activations
    z: torch.Tensor  # (P, K, L) sigmoid codes
    error: torch.Tensor  # (P, K)


class PaperLoss(NamedTuple):
    loss: torch.Tensor  # recon + gamma * kl, the training objective
    recon: torch.Tensor  # mean ‖d − d̂‖² over valid samples
    kl: torch.Tensor  # Σ_j KL(ρ ‖ ρ̂_j)
    rho_hat: torch.Tensor  # (L,) batch mean activation of each latent
    output: PaperOutput


def kl_sparsity(rho: float, rho_hat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Σ_j KL(ρ ‖ ρ̂_j) between Bernoulli means (the classic sparse-autoencoder penalty)."""
    rho_hat = rho_hat.clamp(eps, 1 - eps)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


class FusedDifferenceSAE(nn.Module):
    scale: torch.Tensor  # a registered buffer
    """Sigmoid SAE with input d = vec(Δv tᵀ); weights kept as (L, D, D) stacks of D×D matrices."""

    def __init__(self, dim: int, latents: int, rho: float = 0.05, gamma: float = 1.0) -> None:
        super().__init__()
        self.dim, self.latents, self.rho, self.gamma = dim, latents, rho, gamma
        self.W_enc = nn.Parameter(torch.zeros(latents, dim, dim))
        self.b_enc = nn.Parameter(torch.zeros(latents))
        self.W_dec = nn.Parameter(torch.zeros(latents, dim, dim))  # column k of the D²×L decoder = W_dec[k]
        self.b_dec = nn.Parameter(torch.zeros(dim, dim))
        self.register_buffer("scale", torch.ones(()))  # input multiplier: E‖scale·(d − d̄)‖² = 1
        # The encoder sees scale·d·D, unit variance per entry on average, so that unit-norm encoder
        # rows (entries ~ 1/D, LeCun-style) give O(1) pre-activations; the reconstruction and its
        # loss stay at energy 1, where the KL term's weight γ = 1 is meaningful.
        self.gain = float(dim)

    def initialise(self, generator: torch.Generator, data_mean: torch.Tensor, scale: float) -> None:
        """Unit-norm random encoder rows, a zero decoder, b_dec at the (scaled) data mean, b_enc = logit(ρ).

        Training then starts from the mean reconstruction (loss 1 = the centred energy) and the KL
        term at zero (every latent at its target mean ρ), instead of from random decoder noise and
        a KL term that dominates the first steps. The encoder's gain D makes its pre-activations
        O(1) from the first step (see `gain`).
        """
        rows = torch.randn(self.W_enc.shape, generator=generator, dtype=torch.float32)
        rows /= rows.flatten(1).norm(dim=1)[:, None, None]
        with torch.no_grad():
            self.W_enc.copy_(rows)
            self.W_dec.zero_()
            self.b_enc.fill_(math.log(self.rho / (1 - self.rho)))
            self.b_dec.copy_(data_mean * scale)
            self.scale.fill_(scale)

    def pre_activations(self, dv: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """pre[p, c, k] = Δv_pcᵀ W_k t_p + b_k for a pool block."""
        n_pairs, latents, dim = t.shape[0], self.latents, self.dim
        wt = (t @ self.W_enc.reshape(latents * dim, dim).T).view(n_pairs, latents, dim)  # (W_k t)_i
        return torch.bmm(dv, wt.transpose(1, 2)) * self.gain + self.b_enc

    def decoder_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G, c, ‖B‖²): what ‖d̂‖² needs from the decoder, computed once per step or per encode."""
        flat = self.W_dec.reshape(self.latents, -1)
        return flat @ flat.T, flat @ self.b_dec.reshape(-1), (self.b_dec * self.b_dec).sum()

    @staticmethod
    def reconstruction_norm(
        z: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """‖d̂‖² per sample from the decoder's Gram matrix (for the cosine of d and d̂)."""
        gram, c, bb = stats
        return ((z @ gram) * z).sum(-1) + 2 * (z @ c) + bb

    def squared_error(
        self,
        dv: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """‖d − d̂‖² per (pair, candidate) through the bilinear expansion in the module docstring."""
        n_pairs, latents, dim = t.shape[0], self.latents, self.dim
        gram, c, bb = stats if stats is not None else self.decoder_stats()
        mt = (t @ self.W_dec.reshape(latents * dim, dim).T).view(n_pairs, latents, dim)  # (M_k t)_i
        cross_latents = torch.bmm(dv, mt.transpose(1, 2))  # Δvᵀ M_k t, (P, K, L)
        bias_t = t @ self.b_dec.T  # (B t)_i
        cross = (z * cross_latents).sum(-1) + (dv * bias_t[:, None, :]).sum(-1)
        d_norm = (dv * dv).sum(-1) * (t * t).sum(-1)[:, None]
        return d_norm - 2 * cross + self.reconstruction_norm(z, (gram, c, bb))

    def forward(
        self,
        dv: torch.Tensor,
        t: torch.Tensor,
        stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> PaperOutput:
        pre = self.pre_activations(dv, t)
        z = torch.sigmoid(pre)
        return PaperOutput(pre=pre, z=z, error=self.squared_error(dv, t, z, stats))

    def loss(self, dv: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> PaperLoss:
        """recon + γ·KL over the valid (mask True) samples of a pool block."""
        out = self.forward(dv, t)
        weight = mask.to(out.z.dtype)
        count = weight.sum().clamp_min(1.0)
        recon = (out.error * weight).sum() / count
        rho_hat = (out.z * weight[..., None]).sum((0, 1)) / count
        kl = kl_sparsity(self.rho, rho_hat)
        return PaperLoss(recon + self.gamma * kl, recon, kl, rho_hat, out)


def dense_reference(model: FusedDifferenceSAE, dv: torch.Tensor, t: torch.Tensor) -> PaperOutput:
    """The same model with d materialised (n, D²): the test reference for small D only."""
    d = (dv[..., :, None] * t[:, None, None, :]).flatten(2)  # (P, K, D²), d[i*D + j] = Δv_i t_j
    pre = (d * model.gain) @ model.W_enc.flatten(1).T + model.b_enc
    z = torch.sigmoid(pre)
    d_hat = z @ model.W_dec.flatten(1) + model.b_dec.flatten()
    return PaperOutput(pre=pre, z=z, error=((d - d_hat) ** 2).sum(-1))

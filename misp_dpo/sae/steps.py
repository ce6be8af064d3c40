"""What differs between the two variants inside the training loop: inputs, loss, weight constraints.

A batch arrives as a chunk of device tensors (`PoolChunk` for paper, `VectorChunk` for topk); a
`Steps` object turns it into model inputs, computes the loss with the values worth logging, and
applies the variant's weight constraints around the optimiser step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from misp_dpo.sae.data import PoolChunk, VectorChunk
from misp_dpo.sae.metrics import HeldOut
from misp_dpo.sae.paper import FusedDifferenceSAE
from misp_dpo.sae.topk import TopKSAE


class StepLoss(NamedTuple):
    loss: torch.Tensor
    logs: dict[str, torch.Tensor]  # scalars, synchronised to the host only when logged


class PoolInputs(NamedTuple):
    dv: torch.Tensor  # (P, K, D) scaled differences, zero on padding
    t: torch.Tensor  # (P, D)
    mask: torch.Tensor  # (P, K) bool


def pool_inputs(chunk: PoolChunk, images: torch.Tensor, scale: float) -> PoolInputs:
    rows = torch.as_tensor(chunk.candidates).long()  # a chunk moved to the device holds tensors
    mask = rows >= 0
    candidates = images[rows.clamp_min(0)].float()
    dv = (torch.as_tensor(chunk.positive).float()[:, None, :] - candidates) * (mask[..., None] * scale)
    return PoolInputs(dv, torch.as_tensor(chunk.prompt).float(), mask)


class PaperSteps:
    """recon + γ·KL on pool blocks; like the paper's autoencoder, no constraint on the decoder norm."""

    def __init__(self, model: FusedDifferenceSAE, images: torch.Tensor) -> None:
        self.model, self.images = model, images

    def inputs(self, batch: Any) -> PoolInputs:
        return pool_inputs(batch, self.images, float(self.model.scale))

    def samples(self, batch: Any) -> int:
        return int((batch.candidates >= 0).sum())

    def loss(self, batch: Any) -> StepLoss:
        dv, t, mask = self.inputs(batch)
        out = self.model.loss(dv, t, mask)
        logs = {
            "loss": out.loss.detach(),
            "recon": out.recon.detach(),
            "kl": out.kl.detach(),
            "rho_hat_min": out.rho_hat.detach().min(),
            "rho_hat_max": out.rho_hat.detach().max(),
        }
        return StepLoss(out.loss, logs)

    def before_update(self) -> None:
        pass

    def after_update(self) -> None:
        pass


class TopKSteps:
    """FVU + AuxK; dead latents are those that have not fired for `dead_after` samples."""

    def __init__(self, model: TopKSAE, aux_k: int, aux_coef: float, dead_after: int) -> None:
        self.model, self.aux_k, self.aux_coef, self.dead_after = model, aux_k, aux_coef, dead_after
        self.since_fired = torch.zeros(model.latents, dtype=torch.long, device=model.W_dec.device)

    def inputs(self, batch: Any) -> torch.Tensor:
        assert isinstance(batch, VectorChunk)
        return torch.as_tensor(batch.vectors).float() * float(self.model.scale)

    def samples(self, batch: Any) -> int:
        return len(batch.vectors)

    def loss(self, batch: Any) -> StepLoss:
        x = self.inputs(batch)
        dead = self.since_fired > self.dead_after
        out = self.model.loss(x, dead, self.aux_k, self.aux_coef)
        fired = torch.zeros_like(dead)
        fired[out.output.indices[out.output.values > 0]] = True
        self.since_fired += len(x)
        self.since_fired[fired] = 0
        logs = {
            "loss": out.loss.detach(),
            "fvu": out.fvu.detach(),
            "auxk": out.auxk.detach(),
            "dead_fraction": dead.float().mean(),
        }
        return StepLoss(out.loss, logs)

    def before_update(self) -> None:
        self.model.project_decoder_grad()

    def after_update(self) -> None:
        self.model.normalise_decoder()


def paper_evaluate(
    steps: PaperSteps, batch: Any, acc: HeldOut, stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> None:
    """Held-out sums of a pool block: errors, ‖d‖², cos(d, d̂) and Σd, all via the bilinear forms."""
    dv, t, mask = steps.inputs(batch)
    out = steps.model(dv, t, stats)
    d_norm = ((dv * dv).sum(-1) * (t * t).sum(-1)[:, None])[mask]
    z = out.z[mask]
    error = out.error[mask]
    d_hat_norm = steps.model.reconstruction_norm(z, stats)
    cosine = (d_norm + d_hat_norm - error) / (2 * (d_norm * d_hat_norm).sqrt()).clamp_min(1e-12)
    acc.add(dv.sum(1).T @ t, d_norm, error, cosine, z)


def topk_evaluate(steps: TopKSteps, batch: Any, acc: HeldOut) -> None:
    x = steps.inputs(batch)
    out = steps.model(x)
    error = ((x - out.x_hat) ** 2).sum(-1)
    cosine = torch.nn.functional.cosine_similarity(x, out.x_hat, dim=-1)
    acc.add(x.sum(0), (x * x).sum(-1), error, cosine, steps.model.dense_codes(out))

"""The SAE core's config: what an SAE is and how it trains, declared once (the `sae` stage nests it).

Torch-free, so the CLI builds its flags without importing torch; `trainer.TrainSettings` extends it
with what a run resolves (device, seed, preload budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from misp_dpo.config import option

Variant = Literal["paper", "topk"]


@dataclass(frozen=True, kw_only=True)
class SaeSettings:
    """The SAE and its training; 0 means "the variant's default" where noted (`trainer.resolve`)."""

    variant: Variant = option(
        "paper",
        "paper: sigmoid SAE on fused differences vec((v(m_p) - v(m_c)) t(x)^T) with KL sparsity; "
        "topk: TopK SAE on image embeddings",
    )
    latents: int = option(0, "dictionary size; 0: 128 (paper) or 8 x the embedding dimension (topk)")
    k: int = option(32, "topk: active latents per sample")
    rho: float = option(0.05, "paper: target mean activation of each latent (the KL sparsity target)")
    gamma: float = option(1.0, "paper: weight of the KL sparsity term")
    aux_k: int = option(0, "topk: dead latents used by the AuxK loss; 0: half the embedding dimension")
    aux_coef: float = option(1 / 32, "topk: weight of the AuxK loss (0 turns it off)")
    steps: int = option(0, "optimisation steps; 0: as many as --epochs takes")
    epochs: float = option(10.0, "passes over the training samples (used when --steps is 0)")
    batch_size: int = option(
        0,
        "samples per step (paper: (pair, candidate) differences, whole pools); "
        "0: 1/32 of the training samples, at least 128, at most 4096 (16384 on a GPU)",
    )
    lr: float = option(0.0, "Adam learning rate; 0: 2e-4/sqrt(latents/2^14) (topk) or 0.016/D (paper)")

    def __post_init__(self) -> None:
        checks = [
            (self.latents >= 0, f"latents must be >= 0, got {self.latents}"),
            (self.k >= 1, f"k must be >= 1, got {self.k}"),
            (
                not self.latents or self.k <= self.latents or self.variant == "paper",
                f"k ({self.k}) must not exceed latents ({self.latents})",
            ),
            (0 < self.rho < 1, f"rho must be in (0, 1), got {self.rho}"),
            (
                self.gamma >= 0 and self.aux_coef >= 0,
                f"gamma ({self.gamma}) and aux_coef ({self.aux_coef}) must be >= 0",
            ),
            (self.aux_k >= 0, f"aux_k must be >= 0, got {self.aux_k}"),
            (
                self.steps >= 0 and self.batch_size >= 0 and self.lr >= 0,
                f"steps ({self.steps}), batch_size ({self.batch_size}) and lr ({self.lr}) must be >= 0",
            ),
            (self.steps > 0 or self.epochs > 0, f"epochs must be > 0 when steps is 0, got {self.epochs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

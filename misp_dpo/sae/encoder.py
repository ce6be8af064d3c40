"""What the mine stage asks a trained SAE: the code z_i and reconstruction error ℓ_i of each candidate.

`load_sae(folder)` rebuilds either variant; `encode_pools` takes whole pool blocks as numpy
(positive (P, D), candidates (P, K, D), prompt (P, D), mask (P, K)) and returns numpy, batching pairs
internally so a block of any size fits in a fixed memory budget, on the GPU when one is present.

- paper: z_i = σ(pre) of the fused difference d_i = vec((v(m_p) − v(m_c)) tᵀ) and ℓ_i = ‖d_i − d̂_i‖²;
- topk: z_i = z(m_c) − z(m_p) and ℓ_i = the candidate's own reconstruction error ‖v(m_c) − v̂(m_c)‖².

ℓ_i is returned in the units of the raw embeddings (the model's input scale divided out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from misp_dpo.sae.checkpoint import SaeSpec, read_model, sae_device

# Elements of the largest intermediate per chunk of pairs (~256 MB of float32).
CHUNK_ELEMENTS = 1 << 26


class PoolCodes(NamedTuple):
    """What the SAE says about each (pair, candidate) difference; zeros where mask is False."""

    codes: np.ndarray  # (P, K, L) float32: z_i
    recon_error: np.ndarray  # (P, K) float32: ℓ_i


class DifferenceEncoder:
    """A trained SAE of either variant, read-only, answering pool blocks."""

    def __init__(self, model: torch.nn.Module, spec: SaeSpec, cfg: dict[str, Any], device: str) -> None:
        self.model, self.spec, self.cfg, self.device = model, spec, cfg, device
        self.variant: str = spec.variant
        self.latents: int = spec.latents
        self.clip: dict[str, Any] = dict(cfg.get("clip") or {})
        self._stats: tuple[torch.Tensor, ...] | None = None

    def _pairs_per_chunk(self, width: int) -> int:
        dim, latents = self.spec.dim, self.latents
        per_pair = width * (2 * latents + dim) + (2 * latents * dim if self.variant == "paper" else 0)
        return max(1, CHUNK_ELEMENTS // max(per_pair, 1))

    @torch.no_grad()
    def encode_pools(
        self, positive: np.ndarray, candidates: np.ndarray, prompt: np.ndarray, mask: np.ndarray
    ) -> PoolCodes:
        n_pairs, width = mask.shape
        dim = self.spec.dim
        if positive.shape != (n_pairs, dim) or prompt.shape != (n_pairs, dim):
            raise ValueError(
                f"positive {positive.shape} and prompt {prompt.shape} must be ({n_pairs}, {dim}) "
                f"for this SAE (D={dim})"
            )
        if candidates.shape != (n_pairs, width, dim):
            raise ValueError(f"candidates {candidates.shape} must be ({n_pairs}, {width}, {dim})")
        codes = np.zeros((n_pairs, width, self.latents), dtype=np.float32)
        errors = np.zeros((n_pairs, width), dtype=np.float32)
        step = self._pairs_per_chunk(width)
        for lo in range(0, n_pairs, step):
            part = slice(lo, min(n_pairs, lo + step))
            z, err = self._encode_chunk(positive[part], candidates[part], prompt[part])
            valid = mask[part]
            codes[part] = np.where(valid[..., None], z, 0.0)
            errors[part] = np.where(valid, err, 0.0)
        return PoolCodes(codes=codes, recon_error=errors)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array, dtype=np.float32)).to(self.device)

    def _encode_chunk(
        self, positive: np.ndarray, candidates: np.ndarray, prompt: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        pos, cand = self._tensor(positive), self._tensor(candidates)
        scale = float(self.model.scale)  # type: ignore[arg-type]
        if self.variant == "paper":
            if self._stats is None:
                self._stats = self.model.decoder_stats()  # type: ignore[operator]
            dv = (pos[:, None, :] - cand) * scale
            out = self.model(dv, self._tensor(prompt), self._stats)
            z, err = out.z, out.error
        else:
            n_pairs, width, dim = cand.shape
            x = cand.reshape(-1, dim) * scale
            out = self.model(x)
            z_c = self.model.dense_codes(out).view(n_pairs, width, -1)  # type: ignore[operator]
            z = z_c - self.model.dense_codes(self.model(pos * scale))[:, None, :]  # type: ignore[operator]
            err = ((x - out.x_hat) ** 2).sum(-1).view(n_pairs, width)
        err = (err / scale**2).clamp_min(0.0)
        return z.float().cpu().numpy(), err.float().cpu().numpy()


def load_sae(folder: Path, device: str = "auto") -> DifferenceEncoder:
    """The SAE of a `misp-dpo sae` output folder; a one-line UserError for any other folder."""
    resolved = sae_device(device)
    model, spec, cfg = read_model(Path(folder), resolved)
    return DifferenceEncoder(model, spec, cfg, resolved)

"""An SAE on disk: `sae.safetensors` (the module's tensors) + `cfg.json` (how to rebuild and read it).

Save and load are symmetric (sparsify's `sae.safetensors` + `cfg.json`): `cfg.json` holds the
`SaeSpec` that rebuilds the module, and provenance the caller adds (CLIP model, input manifests,
normalisation, training settings). Writers take explicit paths so the caller decides where and how
atomically they are written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from misp_dpo.errors import UserError
from misp_dpo.sae.config import Variant
from misp_dpo.sae.paper import FusedDifferenceSAE
from misp_dpo.sae.topk import TopKSAE

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
FORMAT = "misp_dpo.sae/1"
INPUT_KIND = {"paper": "fused_difference", "topk": "image_embedding"}


@dataclass(frozen=True)
class SaeSpec:
    """What rebuilds the module: variant, CLIP dimension D, latents and the activation settings."""

    variant: Variant
    dim: int  # D of the CLIP embeddings; the paper variant's input has D² entries
    latents: int
    k: int = 0  # topk: active latents per sample
    rho: float = 0.05  # paper: target mean activation
    gamma: float = 1.0  # paper: weight of the KL sparsity term

    @property
    def d_in(self) -> int:
        return self.dim * self.dim if self.variant == "paper" else self.dim

    def build(self) -> nn.Module:
        if self.variant == "paper":
            return FusedDifferenceSAE(self.dim, self.latents, self.rho, self.gamma)
        return TopKSAE(self.dim, self.latents, self.k)

    def describe(self) -> dict[str, Any]:
        """The cfg.json fields every reader relies on."""
        sparsity: dict[str, Any] = (
            {"kind": "kl", "rho": self.rho, "gamma": self.gamma}
            if self.variant == "paper"
            else {"kind": "topk", "k": self.k}
        )
        return {
            "format": FORMAT,
            "spec": asdict(self),
            "variant": self.variant,
            "input": INPUT_KIND[self.variant],
            "d_in": self.d_in,
            "latents": self.latents,
            "activation": "sigmoid" if self.variant == "paper" else "topk",
            "sparsity": sparsity,
        }


def write_weights(model: nn.Module, path: Path) -> None:
    """The module's parameters and buffers, on CPU, contiguous, in one safetensors file."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT})


def write_config(spec: SaeSpec, extra: dict[str, Any], path: Path) -> None:
    payload = {**extra, **spec.describe()}
    path.write_text(json.dumps(payload, sort_keys=True, indent=2) + "\n")


def read_config(folder: Path) -> dict[str, Any]:
    """cfg.json of an SAE folder, or a one-line UserError when the folder is not one."""
    weights, config = folder / WEIGHTS, folder / CONFIG
    if not weights.is_file() or not config.is_file():
        raise UserError(
            f"{folder}: not an `sae` output (needs {WEIGHTS} and {CONFIG}); "
            "point it at the --out folder of a finished `misp-dpo sae` run"
        )
    try:
        cfg = json.loads(config.read_text())
    except ValueError as error:
        raise UserError(f"{config}: unreadable ({error}); rerun `misp-dpo sae` with --overwrite") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        found = cfg.get("format") if isinstance(cfg, dict) else None
        raise UserError(
            f"{config}: format {found!r}, expected {FORMAT!r}; rerun `misp-dpo sae` with --overwrite"
        )
    return cfg


def read_model(folder: Path, device: str = "cpu") -> tuple[nn.Module, SaeSpec, dict[str, Any]]:
    """Rebuild the module of an SAE folder and load its tensors exactly (strict: no missing keys)."""
    cfg = read_config(folder)
    try:
        spec = SaeSpec(**cfg["spec"])
        model = spec.build()
        model.load_state_dict(load_file(str(folder / WEIGHTS), device="cpu"), strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{folder / WEIGHTS}: does not match {CONFIG} ({first}); rerun `misp-dpo sae` with --overwrite"
        ) from None
    return model.to(device).eval(), spec, cfg


def sae_device(device: str) -> str:
    """auto: CUDA when a GPU is visible, else CPU; an explicit cuda without one is a user error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible; use --device cpu or auto")
    return device

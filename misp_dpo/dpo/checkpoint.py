"""Training checkpoints: trainable weights as safetensors, optimizer/scheduler/RNG state, the step.

A checkpoint is written into a temporary folder and renamed into `checkpoints/step-NNNNNNN`, so a
folder with that name is always complete; resume loads the newest one. Restoring the RNG state as
well as the optimizer makes a resumed run continue exactly as the uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
INFO = "checkpoint.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / CHECKPOINTS / f"step-{step:07d}"


def save_checkpoint(
    root: Path,
    step: int,
    trainable: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Path:
    final = checkpoint_dir(root, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, str(tmp / WEIGHTS))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.random.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
    }
    torch.save(state, tmp / STATE)
    (tmp / INFO).write_text(json.dumps({"step": step}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    folder = root / CHECKPOINTS
    if not folder.is_dir():
        return None
    complete = sorted(p for p in folder.glob("step-*") if (p / INFO).is_file())
    return complete[-1] if complete else None


def load_checkpoint(
    path: Path,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Restore weights, optimizer, scheduler and RNGs in place; returns the step the checkpoint ended."""
    weights = load_file(str(path / WEIGHTS))
    missing = sorted(set(trainable) ^ set(weights))
    if missing:
        raise ValueError(f"{path}: checkpoint does not match the model's trainable weights ({missing[:3]})")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.random.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    return int(json.loads((path / INFO).read_text())["step"])


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (and leftovers of interrupted writes)."""
    folder = root / CHECKPOINTS
    for tmp in folder.glob(".step-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    complete = sorted(p for p in folder.glob("step-*") if (p / INFO).is_file())
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)

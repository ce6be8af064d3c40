"""Launched by `test_ddp` (under torchrun, or alone): the first step's gradients of one process.

`python -m tests.dpo.ddp_worker NEGATIVES BATCH_SIZE OUT` computes step 0 of the real loop
(`backward_step`, DDP-wrapped under torchrun) and rank 0 saves the synced gradients and metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from misp_dpo.dpo import distributed
from misp_dpo.dpo.data import PreferenceData
from misp_dpo.dpo.loop import LoopConfig, backward_step
from misp_dpo.dpo.losses import LossConfig
from misp_dpo.dpo.model import ModelConfig, load_policy
from misp_dpo.dpo.reference import align_reference, compute_reference
from misp_dpo.dpo.trainer import build_state
from misp_dpo.pipelines.io import read_table


def first_step(
    negatives: Path, batch_size: int, sample_negatives: int
) -> tuple[dict[str, torch.Tensor], dict]:
    info = distributed.from_env()
    policy = load_policy("tiny", ModelConfig(device="cpu"), seed=0)
    distributed.init(info, policy.device, timeout_s=120)
    data = PreferenceData(read_table(sorted(negatives.glob("train-*.parquet"))), negatives)
    table, _ = compute_reference(policy, data, np.arange(len(data)), 32, show_progress=False)
    reference = align_reference(table, data)
    loop = LoopConfig(batch_size=batch_size, max_steps=1, sample_negatives=sample_negatives)
    rows = reference.trainable(data.counts)
    state = build_state(policy, data, reference, rows, LossConfig(anchor_weight=0.5), loop, 0, info)
    metrics = backward_step(state, 0)
    grads = {name: p.grad.detach().clone() for name, p in policy.trainable().items()}
    return grads, metrics


def main(argv: list[str]) -> None:
    negatives, batch_size, sample_negatives, out = Path(argv[0]), int(argv[1]), int(argv[2]), Path(argv[3])
    torch.set_num_threads(1)
    grads, metrics = first_step(negatives, batch_size, sample_negatives)
    if distributed.from_env().is_main:
        torch.save({"grads": grads, "metrics": metrics}, out)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])

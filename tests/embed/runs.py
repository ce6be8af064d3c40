"""Running the embed stage in tests: the tiny model with seeded random weights, small batches."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from misp_dpo.pipelines.manifest import Manifest
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stages.embed import EmbedConfig, EmbedStage

TINY = "misp-tiny-clip"


def run_embed(
    pairs: Path, out: Path, options: dict[str, Any] | None = None, **fields: Any
) -> Manifest | None:
    values: dict[str, Any] = {"model": TINY, "batch_size": 16, "num_workers": 0, **fields}
    cfg = EmbedConfig(pairs=pairs, out=out, **values)
    return run_stage(EmbedStage(), cfg, RunOptions(**(options or {})))


def output_files(folder: Path) -> dict[str, str]:
    """sha256 of every file of an output (temporary leftovers of killed writers excluded)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".tmp-" not in p.name
    }

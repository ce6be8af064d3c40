"""`misp-dpo synth`: write the demo corpus (images/, pairs.parquet, attributes.parquet)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from misp_dpo.config import option
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.io import atomic_path
from misp_dpo.pipelines.stage import Plan, Stage, StageConfig, TaskContext


@dataclass(frozen=True, kw_only=True)
class SynthConfig(StageConfig):
    out: Path = option(
        help="output folder for images/, pairs.parquet and attributes.parquet", argument=True, hashed=False
    )
    n: int = option(4000, "number of images (one preference pair each); ~n/800 share every attribute")

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be positive, got {self.n}")


class SynthStage(Stage[SynthConfig]):
    """Draw the demo corpus: shapes images with ground-truth attributes, captions and preference pairs."""

    name = "synth"
    config = SynthConfig

    def plan(self, cfg: SynthConfig) -> Plan:
        return Plan(num_tasks=1, meta={"attributes": {k: list(v) for k, v in _attributes().items()}})

    def run_task(self, cfg: SynthConfig, plan: Plan, ctx: TaskContext) -> None:
        from misp_dpo.embed import synth
        from misp_dpo.log import progress

        rng = np.random.default_rng(cfg.seed)
        all_attrs = synth.draw_attributes(cfg.n, rng)
        paths, prompts, chosen, rejected = [], [], [], []
        for i, attrs in enumerate(progress(all_attrs, desc="synth", unit="img")):
            item = synth.make_item(attrs, rng)
            relative = f"images/{i:05d}.png"
            with atomic_path(ctx.output_file(relative)) as tmp:
                tmp.write_bytes(item.png)
            prompt, good, bad = synth.make_pair(attrs, rng)
            paths.append(relative)
            prompts.append(prompt)
            chosen.append(good)
            rejected.append(bad)
        ids = [f"synth-{i:05d}" for i in range(cfg.n)]
        pairs = pa.table(
            {"id": ids, "prompt": prompts, "chosen": chosen, "rejected": rejected, "image": paths},
            schema=schemas.PAIRS_INPUT,
        )
        names = list(synth.ATTRIBUTES)
        attributes = pa.table(
            {"image": paths, **{k: [a[k] for a in all_attrs] for k in names}},
            schema=schemas.synth_attributes(names),
        )
        for table, name in ((pairs, "pairs.parquet"), (attributes, "attributes.parquet")):
            with ctx.writer_at(name, table.schema) as writer:
                writer.write(table)
        ctx.count("images", cfg.n)
        ctx.count("pairs", cfg.n)


def _attributes() -> dict[str, tuple[str, ...]]:
    from misp_dpo.embed.synth import ATTRIBUTES

    return ATTRIBUTES

"""`misp-dpo synth`: write the demo world.

`images/` with `pairs.parquet` and `attributes.parquet` are the training corpus; `heldout/` with
`heldout_attributes.parquet`, `probes.parquet` (POPE splits) and `heldout_pairs.parquet` are for
evaluation only and never enter the corpus. The world itself is `misp_dpo.embed.synth_world`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from misp_dpo.config import option, stable_hash
from misp_dpo.embed import synth
from misp_dpo.embed.synth_world import USUAL, WorldConfig, make_world
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.io import atomic_path
from misp_dpo.pipelines.stage import Plan, Stage, StageConfig, TaskContext


# The world's fields (n, prior, heldout) are inherited rather than nested: the flags and TOML keys are
# the same either way, and `SynthConfig(out=..., n=...)` keeps working where tests and benches build it.
@dataclass(frozen=True, kw_only=True)
class SynthConfig(WorldConfig, StageConfig):
    out: Path = option(
        help="output folder for images/, pairs.parquet, attributes.parquet and the held-out heldout/, "
        "heldout_attributes.parquet, probes.parquet, heldout_pairs.parquet",
        hashed=False,
    )


class SynthStage(Stage[SynthConfig]):
    """Draw the demo world: a shapes corpus with a language prior, held-out images, POPE probes."""

    name = "synth"
    config = SynthConfig

    def plan(self, cfg: SynthConfig) -> Plan:
        attributes = {k: list(v) for k, v in synth.ATTRIBUTES.items()}
        # The usual values shape the world as much as the config does: a folder drawn with other ones
        # is another world, not one to resume (no prior draws none: those folders stay valid).
        inputs = {"usual": stable_hash(USUAL)} if cfg.prior > 0 else {}
        return Plan(num_tasks=1, inputs=inputs, meta={"attributes": attributes, "usual": USUAL})

    def run_task(self, cfg: SynthConfig, plan: Plan, ctx: TaskContext) -> None:
        made = make_world(cfg, np.random.default_rng(cfg.seed))
        images = _write_images(ctx, [f"images/{i:05d}.png" for i in range(len(made.corpus))], made.corpus)
        names = [
            f"heldout/{i:05d}.png" if i < made.probed else f"heldout/neg-{i - made.probed:05d}.png"
            for i in range(len(made.heldout))
        ]
        heldout = _write_images(ctx, names, made.heldout)
        prompts, chosen, rejected = (list(column) for column in zip(*made.pairs, strict=True))
        ids = [f"synth-{i:05d}" for i in range(len(images))]
        pairs = {"id": ids, "prompt": prompts, "chosen": chosen, "rejected": rejected, "image": images}
        probes = {
            "image": [heldout[p.image] for p in made.probes],
            "question": [p.question for p in made.probes],
            "label": [p.label for p in made.probes],
            "category": [p.split for p in made.probes],
            "attribute": [p.attribute for p in made.probes],
            "id": [f"{p.split}-{p.image:05d}-{p.attribute}-{p.label}" for p in made.probes],
        }
        held_pairs = {
            "id": [f"heldout-{p.image:05d}" for p in made.heldout_pairs],
            "prompt": [p.prompt for p in made.heldout_pairs],
            "chosen": [p.chosen for p in made.heldout_pairs],
            "rejected": [p.rejected for p in made.heldout_pairs],
            "image": [heldout[p.image] for p in made.heldout_pairs],
            "negatives": [[heldout[j] for j in p.negatives] for p in made.heldout_pairs],
            # each negative differs from the positive in one attribute, in synth.ATTRIBUTES order
            "negative_kinds": [list(synth.ATTRIBUTES)] * len(made.heldout_pairs),
        }
        attributes = schemas.synth_attributes(list(synth.ATTRIBUTES))
        tables = {
            "pairs.parquet": pa.table(pairs, schema=schemas.PAIRS_INPUT),
            "attributes.parquet": _attributes(images, made.corpus, attributes),
            "heldout_attributes.parquet": _attributes(heldout, made.heldout, attributes),
            "probes.parquet": pa.table(probes, schema=schemas.SYNTH_PROBES),
            "heldout_pairs.parquet": pa.table(held_pairs, schema=schemas.SYNTH_HELDOUT_PAIRS),
        }
        for name, table in tables.items():
            with ctx.writer_at(name, table.schema) as writer:
                writer.write(table)
        ctx.count("images", len(images))
        ctx.count("pairs", len(images))
        ctx.count("heldout_images", made.probed)
        ctx.count("heldout_pairs", len(made.heldout_pairs))
        for key, value in made.stats.items():
            ctx.count(key, value)


def _write_images(ctx: TaskContext, names: list[str], items: list[synth.SynthItem]) -> list[str]:
    for name, item in zip(names, items, strict=True):
        with atomic_path(ctx.output_file(name)) as tmp:
            tmp.write_bytes(item.png)
    return names


def _attributes(images: list[str], items: list[synth.SynthItem], schema: pa.Schema) -> pa.Table:
    columns = {name: [item.attributes[name] for item in items] for name in synth.ATTRIBUTES}
    return pa.table({"image": images, **columns}, schema=schema)

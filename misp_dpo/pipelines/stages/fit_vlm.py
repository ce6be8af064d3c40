"""`misp-dpo fit-vlm --corpus CORPUS --out OUT [--clip CLIP]`: fit the demo's small LLaVA that sees.

OUT is a `save_pretrained` folder (model and processor) that `AutoModelForImageTextToText` /
`AutoProcessor` load and `misp-dpo train --model OUT` trains, plus `metrics.json` (yes/no accuracy
on held-out corpus images per attribute type, and with blank or shuffled images) and `curves.png`.
The core is `misp_dpo.eval.fit_vlm`. Demo only: real runs name their own VLM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from misp_dpo.config import option
from misp_dpo.errors import UserError
from misp_dpo.eval import fit_vlm
from misp_dpo.eval.fit_vlm import FitVlmConfig
from misp_dpo.log import log_event, progress
from misp_dpo.pipelines.manifest import manifest_hash, read_manifest
from misp_dpo.pipelines.stage import Plan, Stage, StageConfig, TaskContext

LOG_EVERY = 50


# The core's fields are inherited rather than nested, as synth does with its world: `seed` is both
# the stage's and the core's, and the flags are the same either way.
@dataclass(frozen=True, kw_only=True)
class FitVlmStageConfig(FitVlmConfig, StageConfig):
    corpus: Path = option(
        help="output folder of `misp-dpo synth` (its held-out images are not read)", hashed=False
    )
    clip: Path | None = option(
        None,
        "output folder of `misp-dpo fit-clip`: the vision tower also learns to see what it sees",
        hashed=False,
    )
    out: Path = option(help="output folder: a transformers model folder (save_pretrained)", hashed=False)


class FitVlmStage(Stage[FitVlmStageConfig]):
    """Fit a small LLaVA on a synth corpus so that it answers from the pixels (demo only)."""

    name = "fit-vlm"
    config = FitVlmStageConfig

    def plan(self, cfg: FitVlmStageConfig) -> Plan:
        synth = read_manifest(cfg.corpus, "synth", "--corpus")
        images = synth.stats.get("images", 0)
        held = round(images * cfg.holdout)
        if held < 2 or images - held < 2:
            raise UserError(
                f"--corpus {cfg.corpus}: {images} images are too few to train and hold out; use more"
            )
        inputs = {"corpus": manifest_hash(cfg.corpus)}
        if cfg.clip is not None:
            read_manifest(cfg.clip, "fit-clip", "--clip")
            inputs["clip"] = manifest_hash(cfg.clip)
        return Plan(num_tasks=1, inputs=inputs, meta={"image_tokens": cfg.size.image_tokens})

    def run_task(self, cfg: FitVlmStageConfig, plan: Plan, ctx: TaskContext) -> None:
        data = fit_vlm.read_corpus(cfg.corpus)
        teacher = None
        if cfg.clip is not None:
            teacher = fit_vlm.clip_teacher(cfg.clip, data.pixels, cfg.size.image // cfg.size.patch)
        comparison = cfg.comparison_steps if cfg.reasoned else 0  # bare answers skip that phase
        bars = {
            "tower": progress(total=cfg.tower_steps, desc="fit-vlm tower", unit="step"),
            "comparison": progress(total=comparison, desc="fit-vlm comparison", unit="step"),
            "language": progress(total=cfg.steps, desc="fit-vlm language", unit="step"),
        }
        totals = {"tower": cfg.tower_steps, "comparison": comparison, "language": cfg.steps}
        started = time.perf_counter()

        def on_step(phase: str, step: int, loss: float) -> None:
            bars[phase].update(1)
            bars[phase].set_postfix(loss=f"{loss:.3f}")
            last = totals[phase] - 1
            if step % LOG_EVERY == 0 or step == last:
                seconds = round(time.perf_counter() - started, 1)
                log_event("fit-vlm", phase=phase, step=step, loss=round(loss, 4), seconds=seconds)

        fitted = fit_vlm.fit_vlm(data, cfg, teacher, on_step)
        for bar in bars.values():
            bar.close()
        fitted.metrics["seconds"] = round(time.perf_counter() - started, 1)
        log_event("fit-vlm held-out yes/no accuracy", **fitted.metrics["accuracy"])
        for path in fit_vlm.save_vlm(fitted, ctx.out):
            ctx.output_file(path.name)
        ctx.count("train_images", fitted.metrics["train_images"])
        ctx.count("heldout_images", fitted.metrics["images"])
        ctx.count("steps", sum(totals.values()))

"""`misp-dpo eval`: the base model and (with --adapter) the trained one on POPE probes and held-out pairs.

A single task: it loads the probe tables and the preference table (`misp_dpo.eval`), calls the
core's `evaluate`, and writes `answers-00000.parquet` (every answer, parsed, per model),
`metrics.json` (`{"models": {"base": ..., "trained": ...}}`) and `summary.md` (the same as a table).
Probes whose image cannot be read are counted failures (rows with `error` set), not a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from misp_dpo.config import option
from misp_dpo.dpo.model import check_model_spec
from misp_dpo.errors import UserError
from misp_dpo.eval.config import EvalConfig
from misp_dpo.eval.evaluate import ANSWERS, evaluate
from misp_dpo.eval.models import resolve_base
from misp_dpo.eval.preference import find_pairs_table, load_preference_pairs
from misp_dpo.eval.probes import load_probes, parse_probe_spec
from misp_dpo.eval.summary import summary_table
from misp_dpo.log import log_event
from misp_dpo.pipelines.io import atomic_path, sha256_file, write_json
from misp_dpo.pipelines.stage import Plan, Stage, StageConfig, TaskContext, TaskResources

ANSWERS_PREFIX = "answers"
METRICS = "metrics.json"
SUMMARY = "summary.md"


@dataclass(frozen=True, kw_only=True)
class EvalStageConfig(StageConfig):
    model: str | None = option(
        None,
        "the base model: a hub id, a local folder or tiny; default: the base the adapter names "
        "(give it when the base has moved)",
    )
    adapter: Path | None = option(
        None, "the adapter/ (or model/) folder `misp-dpo train` wrote: evaluated as 'trained'", hashed=False
    )
    probes: tuple[str, ...] = option(
        (),
        "POPE probe tables, FILE or FILE:SPLIT (random|popular|adversarial), repeatable or "
        "comma-separated: ours, the public coco_pope_{split}.json files, or the merged file with a "
        "category column",
        hashed=False,
    )
    image_root: Path | None = option(
        None, "folder the probes' image names are resolved against (COCO val2014); default: the table's"
    )
    pairs: Path | None = option(
        None,
        "held-out preference table (prompt, chosen, optional rejected, image, negatives, optional "
        "negative_kinds: how each negative differs, for accuracy per kind) or its folder",
        hashed=False,
    )
    eval_options: EvalConfig = option(EvalConfig(), "generation and scoring")


class EvalStage(Stage[EvalStageConfig]):
    """Evaluate a VLM (and its trained adapter) on POPE probes and held-out preference pairs."""

    name = "eval"
    config = EvalStageConfig
    resources = TaskResources(cpus=2.0, gpus=1.0)

    def plan(self, cfg: EvalStageConfig) -> Plan:
        if not _specs(cfg) and cfg.pairs is None:
            raise UserError("eval: nothing to evaluate; pass --probes FILE[:SPLIT] and/or --pairs TABLE")
        if cfg.adapter is not None and not cfg.adapter.is_dir():
            raise UserError(f"--adapter {cfg.adapter}: no such folder; pass the adapter/ folder train wrote")
        base = resolve_base(cfg.model, cfg.adapter)
        check_model_spec(base)
        inputs = {}
        for spec in _specs(cfg):
            inputs[f"probes:{spec}"] = sha256_file(_existing(parse_probe_spec(spec).path, "--probes"))
        meta: dict[str, Any] = {"model": base, "adapter": _text(cfg.adapter)}
        if _specs(cfg):  # bad tables fail here, in one line, before any model is loaded
            meta["probes"] = load_probes(_specs(cfg), cfg.image_root).num_rows
        if cfg.pairs is not None:
            table = find_pairs_table(_existing(cfg.pairs, "--pairs"))
            inputs["pairs"] = sha256_file(_existing(table, "--pairs"))
            meta["pairs"] = len(load_preference_pairs(table, cfg.image_root, cfg.eval_options.limit))
        if cfg.adapter is not None and (cfg.adapter / "adapter_model.safetensors").is_file():
            inputs["adapter"] = sha256_file(cfg.adapter / "adapter_model.safetensors")
        return Plan(num_tasks=1, inputs=inputs, meta=meta)

    def run_task(self, cfg: EvalStageConfig, plan: Plan, ctx: TaskContext) -> None:
        options = cfg.eval_options
        probes = load_probes(_specs(cfg), cfg.image_root) if _specs(cfg) else None
        pairs = load_preference_pairs(cfg.pairs, cfg.image_root, options.limit) if cfg.pairs else None
        result = evaluate(probes, pairs, cfg.model, cfg.adapter, options)
        with ctx.writer(ANSWERS_PREFIX, ANSWERS) as writer:
            writer.write(result.answers)
        for row in result.answers.filter(result.answers.column("error").is_valid()).to_pylist():
            reason, _, detail = row["error"].partition(": ")
            ctx.fail(f"{row['model']} probe {row['id']}", reason, detail)
        ctx.count("items", result.answers.num_rows)
        for name, metrics in result.metrics["models"].items():
            ctx.count(f"{name}_pair_failures", (metrics.get("preference") or {}).get("failures", 0))
        write_json(result.metrics, ctx.output_file(METRICS))
        table = summary_table(result.metrics)
        with atomic_path(ctx.output_file(SUMMARY)) as tmp:
            tmp.write_text(table, encoding="utf-8")
        log_event("eval summary\n" + table)


def _specs(cfg: EvalStageConfig) -> tuple[str, ...]:
    """The --probes values, without the empty one an absent flag leaves."""
    return tuple(spec.strip() for spec in cfg.probes if spec.strip())


def _existing(path: Path, flag: str) -> Path:
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file or folder")
    return path


def _text(path: Path | None) -> str | None:
    return str(path) if path is not None else None

"""One evaluation: the base model, then (given an adapter) the trained one, on the same probes and pairs.

`evaluate` is the core's entry point: Arrow probes and a held-out preference table in, the metrics
(`{"models": {"base": {...}, "trained": {...}}}`, docs/method.md §5) and the answers table out. Every probe
gets a row per model; a probe whose image cannot be read keeps its row with `error` set (counted in
its split's `failures`, outside `n`), so any figure can be recomputed from the answers alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from misp_dpo.dpo.data import PreferenceData, SampleError, load_image
from misp_dpo.dpo.model import Policy
from misp_dpo.dpo.sequences import SequenceEncoder
from misp_dpo.eval.config import EvalConfig
from misp_dpo.eval.generate import generate_answers
from misp_dpo.eval.models import load_base, load_trained, resolve_base
from misp_dpo.eval.preference import preference_accuracy
from misp_dpo.eval.probes import SPLITS
from misp_dpo.eval.scoring import parse_answer, split_report
from misp_dpo.log import log_event, progress

BASE, TRAINED = "base", "trained"
SCHEMA_KEY = b"misp_dpo.schema"
ANSWERS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # the probe's id (question_id of POPE files)
        pa.field("split", pa.string(), nullable=False),
        pa.field("attribute", pa.string()),
        pa.field("label", pa.string(), nullable=False),  # yes | no
        pa.field("answer", pa.string()),  # the generated text; null when the probe failed
        pa.field("parsed", pa.string()),  # yes | no, as POPE parses `answer`
        pa.field("model", pa.string(), nullable=False),  # base | trained
        pa.field("error", pa.string()),  # why the probe could not be answered (unreadable image)
    ],
    metadata={SCHEMA_KEY: b"eval_answers/1"},
)


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, Any]  # {"models": {name: {"pope": {split: ...}, "preference": ...}}, ...}
    answers: pa.Table  # ANSWERS


def limit_per_split(probes: pa.Table, limit: int) -> pa.Table:
    """The first `limit` probes of each split, in table order (all when 0)."""
    if not limit:
        return probes
    keep = []
    for split in SPLITS:
        rows = pc.indices_nonzero(pc.equal(probes.column("split"), split)).to_numpy()
        keep.extend(rows[:limit].tolist())
    return probes.take(pa.array(sorted(keep), pa.int64()))


def answer_probes(
    model: torch.nn.Module,
    base: Policy,
    probes: pa.Table,
    cfg: EvalConfig,
    name: str,
    show_progress: bool = True,
) -> pa.Table:
    """Greedy answers of `model` to every probe, parsed, as an ANSWERS table."""
    encoder = SequenceEncoder(base.processor)
    rows = probes.select(["id", "split", "attribute", "label", "question", "uri"]).to_pylist()
    answers: list[str | None] = [None] * len(rows)
    errors: list[str | None] = [None] * len(rows)
    bar = progress(total=len(rows), desc=f"POPE ({name})", unit="probe", disable=not show_progress)
    for lo in range(0, len(rows), cfg.batch_size):
        ready, images = [], []
        for i in range(lo, min(lo + cfg.batch_size, len(rows))):
            try:
                images.append(load_image(rows[i]["uri"], Path.cwd()))
                ready.append(i)
            except SampleError as error:
                errors[i] = f"{error.reason}: {error.detail}"
        texts = generate_answers(
            model, encoder, base.device, [rows[i]["question"] for i in ready], images, cfg.max_new_tokens
        )
        for i, text in zip(ready, texts, strict=True):
            answers[i] = text
        bar.update(min(cfg.batch_size, len(rows) - lo))
    bar.close()
    return pa.table(
        {
            "id": [r["id"] for r in rows],
            "split": [r["split"] for r in rows],
            "attribute": [r["attribute"] for r in rows],
            "label": [r["label"] for r in rows],
            "answer": answers,
            "parsed": [parse_answer(a) if a is not None else None for a in answers],
            "model": [name] * len(rows),
            "error": errors,
        },
        schema=ANSWERS,
    )


def pope_report(answers: pa.Table) -> dict[str, Any]:
    """Per split present in `answers` (one model's): metrics over the answered probes."""
    out: dict[str, Any] = {}
    rows = answers.to_pylist()
    for split in SPLITS:
        mine = [r for r in rows if r["split"] == split]
        if not mine:
            continue
        done = [r for r in mine if r["parsed"] is not None]
        out[split] = split_report(
            [r["label"] for r in done],
            [r["parsed"] for r in done],
            [r["attribute"] for r in done],
            failures=len(mine) - len(done),
        )
    return out


def _evaluate_model(
    model: torch.nn.Module,
    base: Policy,
    name: str,
    probes: pa.Table | None,
    pairs: PreferenceData | None,
    cfg: EvalConfig,
    show_progress: bool,
) -> tuple[dict[str, Any], pa.Table]:
    metrics: dict[str, Any] = {}
    answers = ANSWERS.empty_table()
    if probes is not None:
        answers = answer_probes(model, base, probes, cfg, name, show_progress)
        metrics["pope"] = pope_report(answers)
    if pairs is not None:
        metrics["preference"] = preference_accuracy(model, base, pairs, cfg.batch_size, show_progress)
    log_event("evaluated", model=name, **_headline(metrics))
    return metrics, answers


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    fields = {f"{split}_accuracy": round(m["accuracy"], 4) for split, m in metrics.get("pope", {}).items()}
    preference = metrics.get("preference") or {}
    if preference.get("image_accuracy") is not None:
        fields["image_accuracy"] = round(preference["image_accuracy"], 4)
    return fields


def evaluate(
    probes: pa.Table | None,
    pairs: PreferenceData | None,
    model: str | None,
    adapter: Path | None,
    cfg: EvalConfig,
    show_progress: bool = True,
) -> EvalResult:
    """Evaluate the base model and, with `adapter`, the trained model on the same probes and pairs."""
    if probes is None and pairs is None:
        raise ValueError("nothing to evaluate: give probes, pairs or both")
    spec = resolve_base(model, adapter)
    probes = limit_per_split(probes, cfg.limit) if probes is not None else None
    base = load_base(spec, cfg)
    results: dict[str, Any] = {}
    tables = []
    results[BASE], answers = _evaluate_model(base.model, base, BASE, probes, pairs, cfg, show_progress)
    tables.append(answers)
    if adapter is not None:
        trained = load_trained(base, adapter, cfg)
        results[TRAINED], answers = _evaluate_model(trained, base, TRAINED, probes, pairs, cfg, show_progress)
        tables.append(answers)
    metrics = {"models": results, "model": spec, "adapter": str(adapter) if adapter else None}
    return EvalResult(metrics, pa.concat_tables(tables))

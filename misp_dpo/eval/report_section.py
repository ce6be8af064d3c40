"""The report's Evaluation section: `misp-dpo eval`'s metrics.json as HTML tables and one bar chart.

Pure functions of the metrics dict (`{"model", "adapter", "models": {"base": ..., "trained": ...}}`):
`check_metrics` says what is wrong with one, `evaluation_section` renders the section (POPE per
split with base and trained side by side and their difference, accuracy per attribute and split,
preference accuracy) and `accuracy_chart` draws accuracy per split for each model as a PNG. The
report stage reads the file and writes the PNG; the page (`misp_dpo.mining.report`) places the section.
Every string from the file (model names, splits, attributes) goes through `html.escape`.
"""

from __future__ import annotations

import html
import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from misp_dpo.eval.probes import SPLITS
from misp_dpo.eval.summary import POPE_COLUMNS
from misp_dpo.mining.card import portable

CHART = "eval-accuracy.png"
BASE, TRAINED = "base", "trained"
POPE_LABELS = {
    "accuracy": "accuracy",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "yes_ratio": "yes-ratio",
    "n": "n (probes answered)",
    "failures": "failures (unreadable images)",
}
PREFERENCE_ROWS = (
    ("image_accuracy", "image accuracy (chosen likelier with the positive than with a negative)"),
    ("image_margin", "image margin (mean log-prob difference, nats)"),
    ("text_accuracy", "text accuracy (chosen likelier than rejected)"),
    ("n", "pairs"),
    ("n_negatives", "(pair, negative) comparisons"),
    ("n_text", "pairs with a rejected text"),
    ("failures", "failed pairs"),
)


def check_metrics(metrics: Any) -> str | None:
    """What makes `metrics` unusable for the section, or None when it is fine."""
    if not isinstance(metrics, dict) or not isinstance(metrics.get("models"), dict):
        return 'no "models" object'
    if not metrics["models"]:
        return "no model was evaluated"
    for name, result in metrics["models"].items():
        if not isinstance(result, dict) or not isinstance(result.get("pope", {}), dict):
            return f"model {name!r} has no per-split results"
    return None


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _e(value)
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _difference(base: Any, trained: Any) -> str:
    """trained - base, signed ("+0.027", "-3"), or "-" when either is missing."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (base, trained))
    if not numbers:
        return "-"
    if isinstance(base, int) and isinstance(trained, int):
        return f"{trained - base:+d}"
    return f"{round(trained - base, 3) or 0.0:+.3f}"  # no "-0.000"


def _row(label: str, values: list[Any], paired: bool, head: str = "") -> str:
    cells = "".join(f"<td>{_cell(v)}</td>" for v in values)
    if paired:
        cells += f'<td class="diff">{_e(_difference(values[0], values[1]))}</td>'
    return f'<tr>{head}<td class="label">{_e(label)}</td>{cells}</tr>'


def _order(models: dict[str, Any]) -> list[str]:
    """base, trained, then any other model, as the file lists them."""
    known = [name for name in (BASE, TRAINED) if name in models]
    return known + [name for name in models if name not in known]


def _splits(models: dict[str, Any], names: list[str]) -> list[str]:
    found = {split for name in names for split in (models[name].get("pope") or {})}
    return [s for s in SPLITS if s in found] + sorted(found - set(SPLITS))


def _pope_table(models: dict[str, Any], names: list[str], paired: bool) -> str:
    splits = _splits(models, names)
    if not splits:
        return ""
    head = "".join(f"<th>{_e(name)}</th>" for name in names) + ("<th>difference</th>" if paired else "")
    rows = []
    for split in splits:
        scores = [(models[name].get("pope") or {}).get(split) or {} for name in names]
        metrics = list(POPE_COLUMNS)
        if any(s.get("failures") for s in scores):
            metrics.append("failures")
        for i, metric in enumerate(metrics):
            label = f'<th class="label" rowspan="{len(metrics)}">{_e(split)}</th>' if i == 0 else ""
            rows.append(_row(POPE_LABELS[metric], [s.get(metric) for s in scores], paired, label))
    return (
        "<h3>POPE probes per split</h3>"
        '<table class="eval" id="eval-pope"><thead><tr><th class="label">split</th>'
        f'<th class="label">metric</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _attribute_table(models: dict[str, Any], names: list[str], paired: bool) -> str:
    splits = _splits(models, names)
    by = {
        (name, split): ((models[name].get("pope") or {}).get(split) or {}).get("by_attribute") or {}
        for name in names
        for split in splits
    }
    attributes = sorted({a for found in by.values() for a in found})
    if not attributes:
        return ""
    per_split = len(names) + (1 if paired else 0)
    top = "".join(f'<th colspan="{per_split}">{_e(split)}</th>' for split in splits)
    sub = "".join(
        "".join(f"<th>{_e(name)}</th>" for name in names) + ("<th>diff.</th>" if paired else "")
        for _ in splits
    )
    rows = []
    for attribute in attributes:
        cells = ""
        for split in splits:
            values = [(by[(name, split)].get(attribute) or {}).get("accuracy") for name in names]
            cells += "".join(f"<td>{_cell(v)}</td>" for v in values)
            if paired:
                cells += f'<td class="diff">{_e(_difference(values[0], values[1]))}</td>'
        rows.append(f'<tr><td class="label">{_e(attribute)}</td>{cells}</tr>')
    return (
        "<h3>POPE accuracy per attribute</h3>"
        '<table class="eval compact" id="eval-attributes"><thead>'
        f'<tr><th class="label" rowspan="2">attribute</th>{top}</tr><tr>{sub}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _preference_table(models: dict[str, Any], names: list[str], paired: bool) -> str:
    preferences = [models[name].get("preference") or {} for name in names]
    if not any(preferences):
        return ""
    head = "".join(f"<th>{_e(name)}</th>" for name in names) + ("<th>difference</th>" if paired else "")
    rows = [
        _row(label, [p.get(key) for p in preferences], paired)
        for key, label in PREFERENCE_ROWS
        if any(p.get(key) is not None for p in preferences)
    ]
    kinds = sorted({kind for p in preferences for kind in p.get("by_kind") or {}})
    per_kind = [
        _row(
            kind,
            [((p.get("by_kind") or {}).get(kind) or {}).get("image_accuracy") for p in preferences],
            paired,
        )
        for kind in kinds
    ]
    kind_table = (
        "<h3>Image accuracy per kind of negative</h3><p>How each negative differs from the positive, "
        "as the table's <code>negative_kinds</code> names it: which differences the answer depends on.</p>"
        '<table class="eval" id="eval-preference-kinds">'
        f'<thead><tr><th class="label">kind</th>{head}</tr></thead>'
        f"<tbody>{''.join(per_kind)}</tbody></table>"
        if kinds
        else ""
    )
    return (
        "<h3>Preference accuracy on held-out pairs</h3>"
        '<table class="eval" id="eval-preference">'
        f'<thead><tr><th class="label">metric</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>{kind_table}"
    )


def evaluation_section(metrics: dict[str, Any], chart: str | None = None) -> str:
    """The section's HTML (an `<h2>` and what follows); `chart` is the relative path of the PNG."""
    models: dict[str, Any] = metrics["models"]
    names = _order(models)
    paired = names[:2] == [BASE, TRAINED]
    about = f"base model <b>{_e(portable(metrics.get('model') or '?'))}</b>"
    if metrics.get("adapter"):
        about += f"; trained: the base with the adapter <b>{_e(portable(metrics['adapter']))}</b>"
    note = " Differences are trained minus base." if paired else ""
    figure = (
        f'<figure class="eval-chart"><img src="{_e(chart)}" alt="POPE accuracy per split, '
        f'{_e(" vs ".join(names))}"><figcaption>POPE accuracy per split, {_e(" vs ".join(names))} '
        "(dashed: chance, 0.5)</figcaption></figure>"
        if chart
        else ""
    )
    return (
        '<section id="evaluation"><h2>Evaluation</h2>'
        f"<p>From <code>misp-dpo eval</code>: {about}.{note}</p>{figure}"
        f"{_pope_table(models, names, paired)}{_attribute_table(models, names, paired)}"
        f"{_preference_table(models, names, paired)}</section>"
    )


def accuracy_chart(metrics: dict[str, Any]) -> bytes | None:
    """A small PNG: POPE accuracy per split, one bar per model (None without POPE results).

    Drawn on the Agg canvas directly, like the report's histograms (`misp_dpo.mining.plots`).
    """
    models: dict[str, Any] = metrics["models"]
    names = _order(models)
    splits = _splits(models, names)
    if not splits:
        return None
    figure = Figure(figsize=(4.4, 2.9), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    width = 0.8 / len(names)
    colors = {BASE: "#8c8c8c", TRAINED: "#4c72b0"}
    for i, name in enumerate(names):
        values = [((models[name].get("pope") or {}).get(split) or {}).get("accuracy") for split in splits]
        heights = [float(v) if isinstance(v, int | float) else 0.0 for v in values]
        xs = [s + (i - (len(names) - 1) / 2) * width for s in range(len(splits))]
        bars = axis.bar(xs, heights, width, label=name, color=colors.get(name))
        axis.bar_label(bars, labels=[_cell(v) for v in values], fontsize=7, padding=1)
    axis.axhline(0.5, color="#c0392b", linestyle="--", linewidth=0.8, label="chance (0.5)")
    axis.set_xticks(range(len(splits)), splits)
    axis.set_ylim(0, 1.25)  # room above 1 for the value labels under the legend
    axis.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axis.set_title("POPE accuracy per split", fontsize=10)
    axis.set_xlabel("POPE split", fontsize=9)
    axis.set_ylabel("accuracy", fontsize=9)
    axis.tick_params(labelsize=8)
    axis.legend(fontsize=7, loc="upper right", ncols=len(names) + 1)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()

"""The metrics as Markdown tables: base vs trained per POPE split, then preference accuracy (and its
image accuracy per kind of negative where the held-out table names the kinds)."""

from __future__ import annotations

from typing import Any

from misp_dpo.eval.probes import SPLITS

POPE_COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")
PREFERENCE_COLUMNS = ("image_accuracy", "image_margin", "text_accuracy", "n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary_table(metrics: dict[str, Any]) -> str:
    """`metrics.json`'s content as Markdown (one row per model and split)."""
    models: dict[str, Any] = metrics["models"]
    lines = ["| model | split | " + " | ".join(POPE_COLUMNS) + " |", "|---" * (2 + len(POPE_COLUMNS)) + "|"]
    for split in SPLITS:
        for name, result in models.items():
            scores = result.get("pope", {}).get(split)
            if scores is not None:
                cells = " | ".join(_cell(scores[c]) for c in POPE_COLUMNS)
                lines.append(f"| {name} | {split} | {cells} |")
    if any("preference" in result for result in models.values()):
        lines += ["", "| model | " + " | ".join(PREFERENCE_COLUMNS) + " |"]
        lines.append("|---" * (1 + len(PREFERENCE_COLUMNS)) + "|")
        for name, result in models.items():
            preference = result.get("preference")
            if preference is not None:
                lines.append(
                    f"| {name} | " + " | ".join(_cell(preference[c]) for c in PREFERENCE_COLUMNS) + " |"
                )
    by_kind = {name: (result.get("preference") or {}).get("by_kind") or {} for name, result in models.items()}
    kinds = sorted({kind for found in by_kind.values() for kind in found})
    if kinds:
        names = [name for name in models if by_kind[name]]
        lines += ["", "| image accuracy per kind of negative | " + " | ".join(names) + " |"]
        lines.append("|---" * (1 + len(names)) + "|")
        for kind in kinds:
            cells = " | ".join(_cell((by_kind[name].get(kind) or {}).get("image_accuracy")) for name in names)
            lines.append(f"| {kind} | {cells} |")
    return "\n".join(lines) + "\n"

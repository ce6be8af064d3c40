"""POPE scoring as the official evaluation does it (POPE `evaluate.py`, Li et al. 2023).

An answer is "no" when a word of its first sentence (text before the first '.', commas removed,
split on spaces) is exactly `No`, `no` or `not`; anything else is "yes". "yes" is the positive class.
Metrics are computed per split, never over the parsed answers of several splits pooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

YES, NO = "yes", "no"
NEGATION_WORDS = frozenset({"No", "no", "not"})


def parse_answer(text: str) -> str:
    """ "yes" or "no", exactly as POPE's evaluation reads a free-form answer."""
    first_sentence = text.split(".")[0].replace(",", "")
    return NO if any(word in NEGATION_WORDS for word in first_sentence.split(" ")) else YES


@dataclass(frozen=True)
class PopeMetrics:
    """One split's scores; precision/recall/F1 are 0 where their denominator is 0."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pope_metrics(labels: Sequence[str], parsed: Sequence[str]) -> PopeMetrics:
    """Accuracy, precision, recall, F1 and the share of "yes" answers of labels vs parsed answers."""
    if len(labels) != len(parsed):
        raise ValueError(f"{len(labels)} labels but {len(parsed)} answers")
    n = len(labels)
    tp = sum(label == YES and answer == YES for label, answer in zip(labels, parsed, strict=True))
    fp = sum(label == NO and answer == YES for label, answer in zip(labels, parsed, strict=True))
    fn = sum(label == YES and answer == NO for label, answer in zip(labels, parsed, strict=True))
    tn = n - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PopeMetrics(
        accuracy=(tp + tn) / n if n else 0.0,
        precision=precision,
        recall=recall,
        f1=f1,
        yes_ratio=(tp + fp) / n if n else 0.0,
        n=n,
    )


def split_report(
    labels: Sequence[str], parsed: Sequence[str], attributes: Sequence[str | None], failures: int = 0
) -> dict[str, Any]:
    """A split's metrics, `by_attribute` (rows without an attribute are only in the totals) and the
    count of probes that could not be answered (unreadable images; not in n)."""
    report = pope_metrics(labels, parsed).as_dict()
    by_attribute: dict[str, Any] = {}
    for name in sorted({a for a in attributes if a is not None}):
        rows = [i for i, a in enumerate(attributes) if a == name]
        by_attribute[name] = pope_metrics([labels[i] for i in rows], [parsed[i] for i in rows]).as_dict()
    report["by_attribute"] = by_attribute
    report["failures"] = failures
    return report

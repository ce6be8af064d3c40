"""POPE parsing and metrics against hand-computed numbers (acceptance c)."""

from __future__ import annotations

import pytest

from misp_dpo.eval.scoring import parse_answer, pope_metrics, split_report


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        ("Yes, there is a red square.", "yes"),
        ("There is no square.", "no"),
        ("No.", "no"),
        ("No, it is blue.", "no"),
        ("I do not see one", "no"),
        ("Nope", "yes"),  # not one of the words No / no / not
        ("NO", "yes"),  # exact match only, as the official script
        ("Yes. There is no circle.", "yes"),  # only the first sentence counts
        ("no,", "no"),  # commas are removed before splitting
        ("", "yes"),
        ("The shape is not blue", "no"),
        ("nothing here", "yes"),
    ],
)
def test_answers_parse_as_the_official_pope_evaluation(answer: str, parsed: str) -> None:
    assert parse_answer(answer) == parsed


LABELS6 = ["yes", "yes", "yes", "no", "no", "no"]


def test_always_yes_model() -> None:
    m = pope_metrics(LABELS6, ["yes"] * 6)
    # TP 3, FP 3, FN 0, TN 0
    assert (m.accuracy, m.precision, m.recall, m.yes_ratio, m.n) == (0.5, 0.5, 1.0, 1.0, 6)
    assert m.f1 == pytest.approx(2 / 3)


def test_always_no_model() -> None:
    m = pope_metrics(LABELS6, ["no"] * 6)
    assert (m.accuracy, m.precision, m.recall, m.f1, m.yes_ratio) == (0.5, 0.0, 0.0, 0.0, 0.0)


def test_always_right_model() -> None:
    m = pope_metrics(LABELS6, LABELS6)
    assert (m.accuracy, m.precision, m.recall, m.f1, m.yes_ratio, m.n) == (1.0, 1.0, 1.0, 1.0, 0.5, 6)


def test_mixed_answers() -> None:
    # TP 3, FN 1, FP 1, TN 3
    labels = ["yes"] * 4 + ["no"] * 4
    answers = ["yes", "yes", "yes", "no", "yes", "no", "no", "no"]
    m = pope_metrics(labels, answers)
    assert (m.accuracy, m.precision, m.recall, m.f1, m.yes_ratio, m.n) == (0.75, 0.75, 0.75, 0.75, 0.5, 8)
    # TP 1, FN 1, FP 2, TN 1
    m = pope_metrics(["yes", "yes", "no", "no", "no"], ["yes", "no", "yes", "yes", "no"])
    assert m.accuracy == pytest.approx(0.4)
    assert m.precision == pytest.approx(1 / 3)
    assert m.recall == pytest.approx(0.5)
    assert m.f1 == pytest.approx(0.4)  # 2 * (1/3) * (1/2) / (5/6)
    assert m.yes_ratio == pytest.approx(0.6)


def test_split_report_breaks_down_by_attribute() -> None:
    labels = ["yes", "no", "yes", "no"]
    answers = ["yes", "yes", "yes", "no"]
    report = split_report(labels, answers, ["color", "color", "shape", None], failures=2)
    assert report["accuracy"] == 0.75 and report["n"] == 4 and report["failures"] == 2
    assert report["by_attribute"]["color"] == {
        "accuracy": 0.5,
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "yes_ratio": 1.0,
        "n": 2,
    }
    assert report["by_attribute"]["shape"]["accuracy"] == 1.0
    assert set(report["by_attribute"]) == {"color", "shape"}


def test_empty_split_and_length_mismatch() -> None:
    assert pope_metrics([], []).n == 0
    with pytest.raises(ValueError, match="2 labels but 1 answers"):
        pope_metrics(["yes", "no"], ["yes"])

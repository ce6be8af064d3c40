"""Generation, the answers table and preference accuracy on a real tiny LLaVA (`--model tiny`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from misp_dpo.dpo.data import PreferenceData
from misp_dpo.dpo.sequences import SequenceEncoder
from misp_dpo.eval.config import EvalConfig
from misp_dpo.eval.evaluate import ANSWERS, evaluate, limit_per_split
from misp_dpo.eval.generate import generate_answers
from misp_dpo.eval.models import load_base
from misp_dpo.eval.preference import KINDS, PreferenceScores, load_preference_pairs, summarise
from misp_dpo.eval.probes import load_probes
from tests.eval.fixtures import write_jsonl, write_ours

CPU = EvalConfig(device="cpu", batch_size=4, max_new_tokens=4)


def write_heldout(folder: Path) -> Path:
    """4 held-out pairs: positive, two negatives, a rejected text on half of them."""
    write_ours(folder, "jsonl")  # the images
    rows = []
    for i in range(4):
        rows.append(
            {
                "id": f"p{i}",
                "prompt": "what color is the shape?",
                "chosen": "the shape is red",
                "rejected": "the shape is blue" if i % 2 == 0 else None,
                "image": f"images/COCO_val2014_{0:012d}.png",
                "negatives": [f"images/COCO_val2014_{k:012d}.png" for k in (2, 4)],
            }
        )
    return write_jsonl(folder / "heldout.jsonl", rows)


def test_batched_left_padded_answers_equal_one_at_a_time(tmp_path: Path) -> None:
    probes = load_probes([str(write_ours(tmp_path, "jsonl"))]).to_pylist()
    base = load_base("tiny", CPU)
    encoder = SequenceEncoder(base.processor)
    from misp_dpo.dpo.data import load_image

    images = [load_image(p["uri"], tmp_path) for p in probes]
    # questions of different lengths, so that left padding matters
    questions = [p["question"] + " is it" * (i % 3) for i, p in enumerate(probes)]
    batched = generate_answers(base.model, encoder, base.device, questions, images, 6)
    single = [
        generate_answers(base.model, encoder, base.device, [q], [im], 6)[0]
        for q, im in zip(questions, images, strict=True)
    ]
    assert batched == single
    assert all(isinstance(a, str) and a for a in batched)


def test_base_run_answers_every_probe_and_counts_unreadable_images(tmp_path: Path) -> None:
    path = write_ours(tmp_path, "jsonl")
    (tmp_path / "images" / "COCO_val2014_000000000003.png").write_bytes(b"not a png")
    result = evaluate(load_probes([str(path)]), None, "tiny", None, CPU, show_progress=False)
    answers = result.answers
    assert answers.schema == ANSWERS
    assert answers.num_rows == 6 and set(answers.column("model").to_pylist()) == {"base"}
    errors = answers.column("error").to_pylist()
    assert [e is not None for e in errors] == [False, False, False, True, False, False]
    assert errors[3].startswith("undecodable image")
    parsed = answers.column("parsed").to_pylist()
    assert parsed[3] is None and all(p in ("yes", "no") for i, p in enumerate(parsed) if i != 3)
    pope = result.metrics["models"]["base"]["pope"]
    assert set(pope) == {"random", "popular", "adversarial"}
    assert pope["popular"]["n"] == 1 and pope["popular"]["failures"] == 1
    assert pope["random"]["n"] == 2 and pope["random"]["failures"] == 0
    assert set(pope["random"]["by_attribute"]) == {"color"}
    assert "trained" not in result.metrics["models"]
    json.dumps(result.metrics)  # JSON-ready


def test_limit_keeps_the_first_probes_of_each_split(tmp_path: Path) -> None:
    probes = load_probes([str(write_ours(tmp_path, "jsonl"))])
    assert limit_per_split(probes, 1).column("id").to_pylist() == ["q0", "q2", "q4"]
    assert limit_per_split(probes, 0).num_rows == 6


def test_preference_accuracy_counts(tmp_path: Path) -> None:
    pairs = load_preference_pairs(write_heldout(tmp_path))
    assert len(pairs) == 4 and pairs.max_negatives == 2
    result = evaluate(None, pairs, "tiny", None, CPU, show_progress=False)
    preference = result.metrics["models"]["base"]["preference"]
    assert preference["n"] == 4 and preference["n_negatives"] == 8 and preference["n_text"] == 2
    assert preference["failures"] == 0
    assert 0.0 <= preference["image_accuracy"] <= 1.0 and preference["text_accuracy"] in (0.0, 0.5, 1.0)
    limited = load_preference_pairs(tmp_path / "heldout.jsonl", limit=2)
    assert len(limited) == 2


def test_a_negative_identical_to_the_positive_is_never_a_win(tmp_path: Path) -> None:
    write_ours(tmp_path, "jsonl")
    row = {
        "prompt": "what color is the shape?",
        "chosen": "the shape is red",
        "image": "images/COCO_val2014_000000000000.png",
        "negatives": ["images/COCO_val2014_000000000000.png", "images/missing.png"],
    }
    pairs = load_preference_pairs(
        write_jsonl(tmp_path / "same.jsonl", [row, {**row, "negatives": [row["image"]]}])
    )
    preference = evaluate(None, pairs, "tiny", None, CPU, show_progress=False).metrics["models"]["base"][
        "preference"
    ]
    # the first pair has an unreadable negative: a failure, left out; the second ties: not a win
    assert preference["failures"] == 1 and preference["n_negatives"] == 1
    assert preference["image_accuracy"] == 0.0 and preference["text_accuracy"] is None


def test_figures_per_kind_of_negative_by_hand(tmp_path: Path) -> None:
    """Margins set by hand: kind a wins 1 of 2 (margins 1.5, -0.5), b ties (0 is not a win), the
    nan (an unreadable negative, or a pair with fewer negatives) counts nowhere."""
    pairs = load_preference_pairs(write_heldout(tmp_path))
    kinds = pa.array([["a", "b"], ["a", "b"], ["a", "b"], ["b", "a"]], pa.list_(pa.string()))
    data = PreferenceData(pairs.table.append_column(KINDS, kinds), pairs.root)
    scores = PreferenceScores(
        image=np.array([[1.5, 0.0], [-0.5, np.nan], [np.nan, np.nan], [np.nan, np.nan]]),
        text=np.array([2.0, np.nan, -1.0, np.nan]),
        scored=2,
        failures=2,
    )
    figures = summarise(scores, data)
    assert figures["image_accuracy"] == pytest.approx(1 / 3) and figures["image_margin"] == pytest.approx(
        1 / 3
    )
    assert figures["text_accuracy"] == 0.5 and figures["n_negatives"] == 3 and figures["n_text"] == 2
    assert figures["by_kind"] == {
        "a": {"image_accuracy": 0.5, "image_margin": 0.5, "n": 2},
        "b": {"image_accuracy": 0.0, "image_margin": 0.0, "n": 1},
    }
    assert "by_kind" not in summarise(scores, pairs)  # no kinds named: no breakdown


def test_kinds_through_eval_and_a_row_with_too_few(tmp_path: Path) -> None:
    from misp_dpo.errors import UserError

    write_ours(tmp_path, "jsonl")
    row = {
        "prompt": "what color is the shape?",
        "chosen": "the shape is red",
        "image": "images/COCO_val2014_000000000000.png",
        "negatives": ["images/COCO_val2014_000000000000.png", "images/COCO_val2014_000000000002.png"],
        KINDS: ["same", "other"],
    }
    pairs = load_preference_pairs(write_jsonl(tmp_path / "kinds.jsonl", [row]))
    by_kind = evaluate(None, pairs, "tiny", None, CPU, show_progress=False).metrics["models"]["base"][
        "preference"
    ]["by_kind"]
    assert by_kind["same"] == {"image_accuracy": 0.0, "image_margin": 0.0, "n": 1}  # identical: a tie
    assert set(by_kind) == {"same", "other"} and by_kind["other"]["n"] == 1
    path = write_jsonl(tmp_path / "short.jsonl", [row, {**row, KINDS: ["same"]}])
    with pytest.raises(
        UserError, match=r"short.jsonl: row 1: negative_kinds must list one kind per negative \(2\)"
    ):
        load_preference_pairs(path)


def test_pairs_table_without_negatives_column(tmp_path: Path) -> None:
    from misp_dpo.errors import UserError

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "image": "x.png"}])
    with pytest.raises(UserError, match=r"p.jsonl: no column 'negatives'; a held-out preference table needs"):
        load_preference_pairs(path)


@pytest.mark.slow
def test_another_architecture_qwen2_vl(tmp_path: Path) -> None:
    """Generation and preference accuracy through a local Qwen2-VL folder (its own image tensors and
    multimodal positions): batched answers equal one-at-a-time answers there too."""
    from tests.dpo.tiny_qwen import save_tiny_qwen2_vl

    folder = save_tiny_qwen2_vl(tmp_path / "qwen")
    probes = load_probes([str(write_ours(tmp_path / "data", "jsonl"))])
    result = evaluate(
        probes, load_preference_pairs(write_heldout(tmp_path / "held")), str(folder), None, CPU, False
    )
    assert result.metrics["models"]["base"]["preference"]["n_negatives"] == 8
    batched = result.answers.column("answer").to_pylist()
    assert all(isinstance(a, str) for a in batched)
    one = EvalConfig(device="cpu", batch_size=1, max_new_tokens=4)
    single = evaluate(probes, None, str(folder), None, one, False).answers.column("answer").to_pylist()
    assert batched == single

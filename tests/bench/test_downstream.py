"""bench/downstream.py's own logic on hand-made inputs: the corrupted negative, the shared training
pairs, and the summary's paired differences (the heavy end-to-end run is `--quick`, not a test)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def ds():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("downstream", BENCH / "downstream.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["downstream"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _image(size: int = 64) -> Image.Image:
    x = np.zeros((size, size, 3), dtype=np.uint8)
    x[:, : size // 2] = (255, 0, 0)
    return Image.fromarray(x)


def test_crop_keeps_the_size_and_changes_the_image(ds) -> None:  # type: ignore[no-untyped-def]
    image = _image()
    for seed in range(20):
        out = ds._corrupt(image, "crop", np.random.default_rng(seed))
        assert out.size == image.size
    # a crop of 1-20% of the area blown up to full size: the two-colour split moves or vanishes
    changed = [
        not np.array_equal(
            np.asarray(ds._corrupt(image, "crop", np.random.default_rng(s))), np.asarray(image)
        )
        for s in range(20)
    ]
    assert all(changed)


def test_noise_is_seeded(ds) -> None:  # type: ignore[no-untyped-def]
    a = ds._corrupt(_image(), "noise", np.random.default_rng(3))
    b = ds._corrupt(_image(), "noise", np.random.default_rng(3))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(_image()))


def test_training_pairs_are_a_seeded_subset(ds) -> None:  # type: ignore[no-untyped-def]
    table = pa.table({"pair_id": [f"p{i:03d}" for i in range(50)]})
    a, b = ds.training_pairs(table, 12, 7), ds.training_pairs(table, 12, 7)
    assert a == b and len(a) == 12 and len(set(a)) == 12
    assert ds.training_pairs(table, 12, 8) != a
    assert len(ds.training_pairs(table, 500, 7)) == 50


def _record(correct: dict[str, dict[str, bool]], image: float) -> dict:
    pope = {
        split: {
            "accuracy": float(np.mean(list(c.values()))),
            "yes_ratio": 0.5,
            "f1": 0.5,
            "n": len(c),
        }
        for split, c in correct.items()
        if split != "image_accuracy"
    }
    return {"pope": pope, "preference": {"image_accuracy": image, "text_accuracy": None}, "correct": correct}


def test_summary_identical_arms_zero_and_shifted_arm_excludes_zero(ds) -> None:  # type: ignore[no-untyped-def]
    splits = (*ds.SPLITS, "image_accuracy")
    ref = {s: {f"q{i}": i % 2 == 0 for i in range(40)} for s in splits}
    better = {s: {f"q{i}": True for i in range(40)} for s in splits}
    per_seed = {
        seed: {
            "misp": _record(ref, 0.5),
            "same": _record({s: dict(v) for s, v in ref.items()}, 0.5),
            "better": _record(better, 1.0),
        }
        for seed in (0, 1, 2)
    }
    summary = ds.summarise(per_seed, ["misp", "same", "better"])
    for split in ds.SPLITS:
        same = summary["same"]["diff"][split]
        assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
        up = summary["better"]["diff"][split]
        assert up["mean"] == pytest.approx(0.5) and up["excludes_zero"] and up["signs"] == "+++"
    assert summary["better"]["diff"]["image_accuracy"]["mean"] == pytest.approx(0.5)
    assert summary["misp"]["diff"] == {}
    excluding = ds.print_table(summary, [0, 1, 2], {s: 40 for s in ds.SPLITS})
    assert [line.split()[0] for line in excluding] == ["better"] * 3

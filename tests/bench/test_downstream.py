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


def test_oracle_negatives_differ_in_one_attribute_each(ds, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """On a corpus holding every attribute combination twice: as many negatives as the pair had,
    each a corpus image one attribute away from the positive, no attribute type twice, ids the sha1
    of the bytes, the same draw for the same seed."""
    import hashlib

    import pyarrow.parquet as pq

    from misp_dpo.embed import synth
    from misp_dpo.pipelines import schemas

    rows = synth.draw_attributes(1600, np.random.default_rng(0))
    (tmp_path / "images").mkdir()
    for i, attrs in enumerate(rows):
        (tmp_path / "images" / f"{i:05d}.png").write_bytes(f"{i} {attrs}".encode())
    pq.write_table(
        pa.Table.from_pylist([{"image": f"images/{i:05d}.png", **a} for i, a in enumerate(rows)]),
        tmp_path / "attributes.parquet",
    )
    placeholder = {"image_id": "x", "uri": "x", "rank": 0, "proposal": 1.0}
    pairs = [
        {
            "pair_id": f"p{i}",
            "prompt": "Describe the image.",
            "chosen": "...",
            "rejected": None,
            "positive": {"image_id": "pos", "uri": str(tmp_path / "images" / f"{i:05d}.png")},
            "negatives": [placeholder] * n,
        }
        for i, n in ((0, 3), (7, 3), (42, 1), (99, 5))
    ]
    table = pa.Table.from_pylist(pairs, schema=schemas.NEGATIVES)
    found = ds.oracle_negatives(table, tmp_path, seed=3).to_pylist()
    assert found == ds.oracle_negatives(table, tmp_path, seed=3).to_pylist()
    assert found != ds.oracle_negatives(table, tmp_path, seed=4).to_pylist()
    for pair, row in zip(pairs, found, strict=True):
        positive = rows[int(Path(pair["positive"]["uri"]).stem)]
        assert len(row["negatives"]) == len(pair["negatives"])
        differ = []
        for negative in row["negatives"]:
            path = Path(negative["uri"])
            assert negative["image_id"] == hashlib.sha1(path.read_bytes()).hexdigest()
            other = rows[int(path.stem)]
            differ += [name for name in synth.ATTRIBUTES if other[name] != positive[name]]
        assert len(differ) == len(set(differ)) == len(pair["negatives"])  # one each, all different

"""The demo corpus: deterministic, attributes with several values, jittered twins, one-wrong rejections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from misp_dpo.embed import synth
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.runtime.validate import validate_output
from misp_dpo.pipelines.stages.synth import SynthConfig, SynthStage
from tests.embed.runs import output_files


def _synth(out: Path, n: int, seed: int) -> dict[str, str]:
    run_stage(SynthStage(), SynthConfig(out=out, n=n, seed=seed), RunOptions())
    return output_files(out)


def test_same_seed_same_bytes_other_seed_other_corpus(tmp_path: Path) -> None:
    first = _synth(tmp_path / "a", 30, seed=7)
    assert len([name for name in first if name.startswith("images/")]) == 30
    assert _synth(tmp_path / "b", 30, seed=7) == first  # every image, table and the manifest
    other = _synth(tmp_path / "c", 30, seed=8)
    assert other["pairs.parquet"] != first["pairs.parquet"]
    assert sum(other[name] != first[name] for name in first if name.startswith("images/")) >= 25


def test_tables_and_attributes(synth_corpus: Path) -> None:
    assert validate_output(synth_corpus)[0] == []
    pairs = pq.read_table(synth_corpus / "pairs.parquet")
    attributes = pq.read_table(synth_corpus / "attributes.parquet")
    assert pairs.column_names == ["id", "prompt", "chosen", "rejected", "image"]
    assert attributes.column_names == ["image", *synth.ATTRIBUTES]
    assert len(synth.ATTRIBUTES) >= 5 and all(len(v) >= 2 for v in synth.ATTRIBUTES.values())
    assert attributes.column("image").equals(pairs.column("image"))
    assert all((synth_corpus / path).is_file() for path in pairs.column("image").to_pylist())
    for name, values in synth.ATTRIBUTES.items():  # 240 images cover every value of every attribute
        assert set(attributes.column(name).to_pylist()) == set(values), name
    assert len(set(pairs.column("prompt").to_pylist())) == len(synth.QUESTIONS)


def test_images_sharing_every_attribute_still_differ() -> None:
    rng = np.random.default_rng(0)
    for attrs in synth.draw_attributes(20, rng):
        twins = [synth.make_item(attrs, rng) for _ in range(4)]
        assert len({item.png for item in twins}) == 4, attrs  # offset, size and rotation jitter
        assert {item.caption for item in twins} == {synth.caption(attrs)}


def test_chosen_is_true_and_rejected_has_exactly_one_attribute_wrong(synth_corpus: Path) -> None:
    pairs = pq.read_table(synth_corpus / "pairs.parquet").to_pylist()
    attributes = pq.read_table(synth_corpus / "attributes.parquet").to_pylist()
    for pair, row in zip(pairs, attributes, strict=True):
        truth = {name: row[name] for name in synth.ATTRIBUTES}
        assert pair["chosen"].endswith(f"The image shows {synth.caption(truth)}.")
        wrong = [
            name
            for name, values in synth.ATTRIBUTES.items()
            for value in values
            if value != truth[name] and pair["rejected"].endswith(synth.caption({**truth, name: value}) + ".")
        ]
        assert len(wrong) == 1, pair

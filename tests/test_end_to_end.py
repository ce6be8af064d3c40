"""The whole demo at a tiny size, through `misp-dpo run`: every stage, its manifest, and resume.

Slow (about a minute or two on 2 cores) but run in CI: it is the one test that chains the real
stages exactly as `make mine && make train` does.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from misp_dpo.cli import main
from misp_dpo.pipelines.manifest import read_manifest
from misp_dpo.pipelines.runtime.validate import validate_output

PIPELINE = """
root = "unused"
[synth]
out = "{root}/synth"
n = 240
[fit-clip]
corpus = "{root}/synth"
out = "{root}/clip"
steps = 30
[embed]
pairs = "{root}/synth/pairs.parquet"
out = "{root}/embeddings"
model = "local-dir:{root}/clip"
tasks = 2
[candidates]
embeddings = "{root}/embeddings"
out = "{root}/candidates"
pool = 16
tasks = 2
[sae]
candidates = "{root}/candidates"
out = "{root}/sae"
epochs = 2
[mine]
candidates = "{root}/candidates"
sae = "{root}/sae"
out = "{root}/negatives"
negatives = 3
tasks = 2
uri-root = "{root}/synth"
[report]
negatives = "{root}/negatives"
attributes = "{root}/synth/attributes.parquet"
out = "{root}/report"
limit = 8
image-root = "{root}/synth"
[train]
negatives = "{root}/negatives"
model = "tiny"
out = "{root}/dpo"
image-root = "{root}/synth"
max-steps = 3
batch-size = 2
"""

STAGES = ["synth", "clip", "embeddings", "candidates", "sae", "negatives", "report", "dpo"]


def _run(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0


@pytest.mark.slow
@pytest.mark.timeout(900)  # 481 s on a loaded 2-core machine, above the default 300 s
def test_demo_pipeline_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(PIPELINE)
    root = tmp_path / "run"
    _run(["run", str(pipeline), "--root", str(root), "--log-format", "json"])
    for folder in STAGES:
        problems, summary = validate_output(root / folder)
        assert problems == [], summary
    dataset = pl.read_parquet(root / "negatives" / "train-*.parquet")
    assert dataset.height == 240
    # a CLIP trained for 30 steps barely separates the shapes, so the false-negative filter leaves
    # some pools short; the demo's own CLIP fills every pool (bench/quality.py)
    counts = dataset["negatives"].list.len()
    assert counts.max() == 3 and (counts == 3).mean() > 0.3
    picked = dataset.select(pl.col("positive").struct.field("image_id"), pl.col("negatives")).explode(
        "negatives"
    )
    assert not (picked["image_id"] == picked["negatives"].struct.field("image_id")).any()
    uris = picked["negatives"].struct.field("uri").drop_nulls()
    assert uris.str.starts_with("images/").all(), "published relative to the mine's uri-root"
    assert read_manifest(root / "negatives").stats["uris_outside_root"] == 0, "positives too"
    html = (root / "report" / "index.html").read_text()
    shown = dataset.filter(pl.col("pair_id").is_in(re.findall(r'data-pair-id="([^"]+)"', html)))
    assert shown.height == 8, "the report shows --limit pairs"
    thumbs = html.count('<img src="thumbs/')
    assert thumbs == shown.height + shown["negatives"].list.len().sum(), "a picture per positive and negative"
    metrics = pl.read_ndjson(root / "dpo" / "metrics.jsonl")
    assert metrics.height >= 3
    capsys.readouterr()
    _run(["run", str(pipeline), "--root", str(root), "--log-format", "json"])
    assert capsys.readouterr().err.count("already complete, skipping") == len(STAGES)

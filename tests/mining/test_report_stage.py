"""The `report` stage: a static page checked in headless Chromium (every image loaded, every pair shown)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from misp_dpo.errors import UserError
from misp_dpo.mining.attributes import AttributeTable, quality
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stages.mine import MineConfig, MineStage
from misp_dpo.pipelines.stages.report import ReportConfig, ReportStage
from tests.helpers import write_prewritten
from tests.mining.fixtures import build_inputs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL = '<script>alert("x")</script> & "quotes" <img src=x onerror=alert(1)>'


def dump_dom(page: Path, profile: Path) -> str:
    """The page's DOM after load, as headless Chromium renders it from the file system."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make test` installs Debian's chromium)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
    ]
    done = subprocess.run(
        [CHROMIUM, *flags, page.resolve().as_uri()], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def image_status(dom: str) -> tuple[int, int]:
    status = re.search(r'id="image-status" data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert status, "the page's load script did not run"
    return int(status.group(1)), int(status.group(2))


def corpus_uris(corpus: Path) -> pa.Array:
    names = pq.read_table(corpus / "attributes.parquet", columns=["image"]).column(0).to_pylist()
    return pa.array([str((corpus / n).resolve()) for n in names])


def test_mined_dataset_report_renders_every_thumbnail(synth_corpus: Path, tmp_path: Path) -> None:
    uris = corpus_uris(synth_corpus)
    inputs = build_inputs(tmp_path / "in", pairs=24, images=len(uris), uris=uris)
    negatives = tmp_path / "neg"
    cfg = MineConfig(out=negatives, candidates=inputs.candidates.root, sae=inputs.sae, tasks=2)
    run_stage(MineStage(), cfg, RunOptions())
    out = tmp_path / "report"
    report = ReportConfig(
        out=out, negatives=negatives, limit=10, attributes=synth_corpus / "attributes.parquet"
    )
    manifest = run_stage(ReportStage(), report, RunOptions())
    assert manifest is not None and manifest.stats["pairs_shown"] == 10
    page = (out / "index.html").read_text()
    assert 'src="/' not in page and "http" not in page.replace("http-equiv", "")
    dom = dump_dom(out / "index.html", tmp_path / "profile")
    loaded, total = image_status(dom)
    thumbs = len(list((out / "thumbs").iterdir()))
    histograms = len(list(out.glob("hist-*.png")))
    assert loaded == total and total >= 10 + histograms and thumbs >= 10 + 10
    assert len(re.findall(r'<article class="pair"', dom)) == 10
    shown_negatives = dom.count('<figure class="negative')
    assert shown_negatives >= 10 * 2 and dom.count("changed: ") == shown_negatives
    assert "false negatives" in dom and "coverage" in dom


def handmade_negatives(corpus: Path, out: Path, missing: bool = False) -> Path:
    """A `mine`-format folder whose prompts try to inject markup."""
    uris = corpus_uris(corpus).to_pylist()
    rows = []
    for p in range(6):
        negatives = [
            {"image_id": f"img{p}-{k}", "uri": uris[p * 4 + k + 1], "rank": k, "score": 1.0 - k / 10}
            for k in range(3)
        ]
        if missing and p == 0:
            negatives[0]["uri"] = str(corpus / "no-such-image.png")
        rows.append(
            {
                "pair_id": f"pair-{p}",
                "prompt": EVIL,
                "chosen": f"chosen {p} {EVIL}",
                "rejected": None,
                "positive": {"image_id": f"pos{p}", "uri": uris[p * 4]},
                "negatives": negatives,
            }
        )
    table = pa.Table.from_pylist(rows, schema=schemas.NEGATIVES)
    meta = {"strategy": "nearest", "negatives": 3, "format": "listwise", "clip": {"model": EVIL}}
    write_prewritten(out, "mine", {"train": table}, tasks=2, meta=meta, label=str(missing))
    return out


def test_text_from_the_data_is_escaped(synth_corpus: Path, tmp_path: Path) -> None:
    negatives = handmade_negatives(synth_corpus, tmp_path / "neg")
    out = tmp_path / "report"
    run_stage(ReportStage(), ReportConfig(out=out, negatives=negatives, limit=50), RunOptions())
    page = (out / "index.html").read_text()
    assert EVIL not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    dom = dump_dom(out / "index.html", tmp_path / "profile")
    assert len(re.findall(r"<script", dom)) == 1 and "onerror=alert" not in dom.replace(
        "onerror=alert(1)&gt;", ""
    )
    assert len(re.findall(r'<article class="pair"', dom)) == 6
    loaded, total = image_status(dom)
    assert loaded == total == 6 * 4 + len(list(out.glob("hist-*.png")))


def test_unreadable_images_are_failures_and_shown_as_placeholders(synth_corpus: Path, tmp_path: Path) -> None:
    negatives = handmade_negatives(synth_corpus, tmp_path / "neg", missing=True)
    cfg = ReportConfig(out=tmp_path / "report", negatives=negatives)
    with pytest.raises(UserError, match="1 of 24 items failed"):
        run_stage(ReportStage(), cfg, RunOptions())
    manifest = run_stage(ReportStage(), cfg, RunOptions(max_failure_rate=0.1))
    assert manifest.stats["failures"] == 1
    assert "unreadable: " in (tmp_path / "report" / "index.html").read_text()


def test_bad_inputs_are_refused_in_one_line(synth_corpus: Path, tmp_path: Path) -> None:
    negatives = handmade_negatives(synth_corpus, tmp_path / "neg")
    with pytest.raises(UserError, match="--attributes .*no such file"):
        run_stage(
            ReportStage(),
            ReportConfig(out=tmp_path / "r", negatives=negatives, attributes=tmp_path / "x"),
            RunOptions(),
        )
    with pytest.raises(UserError, match="--negatives .*no manifest.json"):
        run_stage(ReportStage(), ReportConfig(out=tmp_path / "r", negatives=tmp_path), RunOptions())


def test_quality_metrics_on_a_hand_built_table(tmp_path: Path) -> None:
    table = pa.table(
        {
            "image": ["a.png", "b.png", "c.png", "d.png"],
            "shape": ["circle", "circle", "square", "square"],
            "color": ["red", "red", "red", "blue"],
        }
    )
    attributes = AttributeTable.from_table(table, tmp_path)
    rows = attributes.rows([str(tmp_path / "c.png"), "elsewhere/d.png", "zzz.png", None])
    assert rows.tolist() == [2, 3, -1, -1]
    assert attributes.changed(0, 3) == ["shape", "color"]
    # positive a: negatives b (nothing changed: a false negative), c (shape), d (shape, color)
    q = quality(attributes, np.array([0]), np.array([[1, 2, 3]]), np.ones((1, 3), bool))
    assert q.false_negative_rate == pytest.approx(1 / 3)
    assert q.hardness == pytest.approx(1.0) and q.coverage == pytest.approx(1.0)
    q = quality(
        attributes, np.array([0, 3]), np.array([[2, -1], [2, -1]]), np.array([[True, False], [True, True]])
    )
    assert (q.pairs, q.negatives, q.unmatched) == (2, 2, 1)
    assert q.hardness == pytest.approx(1.0) and q.coverage == pytest.approx(0.5)

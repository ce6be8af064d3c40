"""The report as a dashboard, checked in headless Chromium: title, legend, quality figures without
attributes, flags, sorting by score and hardness, readable captions; a screenshot is kept."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from misp_dpo.mining.label_free import negative_flags, pair_spread
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stages.mine import MineConfig, MineStage
from misp_dpo.pipelines.stages.report import ReportConfig, ReportStage
from tests.mining.fixtures import build_inputs
from tests.mining.test_report_stage import corpus_uris

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def chromium(url: str, profile: Path, *extra: str) -> str:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make test` installs Debian's chromium)")
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000", *extra, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_pair_spread_and_flags_by_hand() -> None:
    a, b, c = np.eye(3, dtype=np.float32)
    vectors = np.stack([a, b, a, a, c])  # pair 0: a, b (orthogonal); pair 1: a, a; pair 2: c alone
    spread = pair_spread(vectors, np.array([0, 2, 4, 5]))
    assert spread[0] == pytest.approx(1.0) and spread[1] == pytest.approx(0.0) and np.isnan(spread[2])
    flags = negative_flags(np.linspace(0, 1, 11, dtype=np.float32))
    assert flags.of(0.97) == "near-duplicate" and flags.of(0.05) == "easy" and flags.of(0.5) is None


@pytest.mark.slow
def test_dashboard_without_attributes(synth_corpus: Path, tmp_path: Path) -> None:
    uris = corpus_uris(synth_corpus)
    inputs = build_inputs(tmp_path / "in", pairs=24, images=len(uris), uris=uris)
    negatives = tmp_path / "coco-misp"
    run_stage(
        MineStage(),
        MineConfig(out=negatives, candidates=inputs.candidates.root, sae=inputs.sae),
        RunOptions(),
    )
    out = tmp_path / "report"
    run_stage(ReportStage(), ReportConfig(out=out, negatives=negatives, limit=8), RunOptions())
    page = out / "index.html"
    html = page.read_text()
    assert "<title>misp-dpo report: coco-misp (misp negatives)</title>" in html
    assert str(tmp_path) not in html  # the dataset is named, its path is not
    dom = chromium(page.resolve().as_uri(), tmp_path / "p1", "--dump-dom")
    status = re.search(r'id="image-status" data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert status and status.group(1) == status.group(2) and int(status.group(2)) >= 8
    for words in ("similarity to positive", "reconstruction l", "proposal q", "Legend", "Sort pairs by"):
        assert words in dom, words
    assert "mean pairwise distance among a pair's negatives" in dom
    spread = re.search(r"mean pairwise distance among a pair's negatives[^<]*</td><td>([0-9.]+)<", dom)
    assert spread and 0 < float(spread.group(1)) <= 2
    coverage = re.search(r"SAE latent coverage[^<]*</td><td>([0-9.]+)<", dom)
    assert coverage and 1 / 3 <= float(coverage.group(1)) <= 1  # 3 negatives a pair
    assert 'class="flag easy"' in dom.split('id="pairs"')[1] or 'class="flag near-duplicate"' in dom
    assert 'class="hists"' in dom and dom.count("<figcaption>") >= 8
    for key in ("hardness", "score"):
        sorted_dom = chromium(f"{page.resolve().as_uri()}#sort={key}", tmp_path / f"p-{key}", "--dump-dom")
        assert f'data-sorted-by="{key}"' in sorted_dom
        values = [
            float(v) for v in re.findall(rf'<article class="pair"[^>]*data-{key}="([-0-9.eE]+)"', sorted_dom)
        ]
        assert len(values) == 8 and values == sorted(values, reverse=True), values
    shot = Path(os.environ.get("MISP_REPORT_SCREENSHOT", tmp_path / "report.png"))
    chromium(
        f"{page.resolve().as_uri()}#sort=hardness",
        tmp_path / "p-shot",
        f"--screenshot={shot}",
        "--window-size=1300,2400",
    )
    assert shot.stat().st_size > 10_000

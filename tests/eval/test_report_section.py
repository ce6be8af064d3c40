"""The report's Evaluation section: by hand from a written metrics dict, then `misp-dpo report --eval`
on a real `misp-dpo eval` output (tiny LLaVA, 6 probes), and a bad --eval folder refused in one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from misp_dpo.cli import main
from misp_dpo.eval.report_section import CHART, accuracy_chart, check_metrics, evaluation_section
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stages.report import ReportConfig, ReportStage
from tests.eval.fixtures import write_ours
from tests.mining.test_report_stage import EVIL, dump_dom, handmade_negatives, image_status


def pope(accuracy: float, precision: float, recall: float, n: int, by: dict[str, float]) -> dict[str, object]:
    f1 = 2 * precision * recall / (precision + recall)
    return {
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": 0.75,
        "n": n,
        "failures": 0,
        "by_attribute": {name: {"accuracy": a, "n": 4} for name, a in by.items()},
    }


METRICS = {
    "model": "/somewhere/on/this/machine/base-model",
    "adapter": "runs/demo/dpo/adapter",
    "models": {
        "base": {
            "pope": {
                "random": pope(0.5, 0.5, 1.0, 8, {"color": 0.25, "shape": 0.75}),
                "adversarial": pope(0.375, 0.4, 0.5, 8, {"color": 0.5}),
            },
            "preference": {
                "image_accuracy": 0.4,
                "image_margin": -0.125,
                "text_accuracy": None,
                "n": 5,
                "by_kind": {"shape": {"image_accuracy": 0.25, "image_margin": -1.0, "n": 4}},
            },
        },
        "trained": {
            "pope": {
                "random": pope(0.625, 0.6, 0.75, 8, {"color": 0.5, "shape": 0.75}),
                "adversarial": pope(0.5, 0.5, 0.5, 7, {"color": 0.625}) | {"failures": 1},
            },
            "preference": {
                "image_accuracy": 0.8,
                "image_margin": 1.5,
                "text_accuracy": None,
                "n": 5,
                "by_kind": {
                    "shape": {"image_accuracy": 0.75, "image_margin": 2.0, "n": 4},
                    "color": {"image_accuracy": 1.0, "image_margin": 3.0, "n": 1},
                },
            },
        },
    },
}


def cells(page: str, table: str) -> list[list[str]]:
    """The text of every body row of the table with id `table`."""
    body = re.search(rf'<table[^>]*id="{table}".*?<tbody>(.*?)</tbody>', page, re.S)
    assert body, table
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", body[1])]


def test_section_shows_the_numbers_and_the_differences() -> None:
    page = evaluation_section(METRICS, CHART)
    assert page.startswith('<section id="evaluation"><h2>Evaluation</h2>')
    assert f'<img src="{CHART}"' in page
    assert "base-model" in page and "/somewhere" not in page  # a local base by name, not by its path
    rows = cells(page, "eval-pope")
    assert rows[0] == ["random", "accuracy", "0.500", "0.625", "+0.125"]
    assert ["precision", "0.500", "0.600", "+0.100"] in rows
    assert ["recall", "1.000", "0.750", "-0.250"] in rows
    assert ["F1", "0.667", "0.667", "+0.000"] in rows
    assert ["yes-ratio", "0.750", "0.750", "+0.000"] in rows
    assert rows[6] == ["adversarial", "accuracy", "0.375", "0.500", "+0.125"]
    assert ["n (probes answered)", "8", "7", "-1"] in rows
    assert rows[-1] == ["failures (unreadable images)", "0", "1", "+1"]  # only where there were some
    assert len(rows) == 6 + 7
    attributes = cells(page, "eval-attributes")
    assert attributes == [
        ["color", "0.250", "0.500", "+0.250", "0.500", "0.625", "+0.125"],
        ["shape", "0.750", "0.750", "+0.000", "-", "-", "-"],
    ]
    assert '<th colspan="3">random</th><th colspan="3">adversarial</th>' in page
    preference = cells(page, "eval-preference")
    assert preference[0][1:] == ["0.400", "0.800", "+0.400"]
    assert preference[1][1:] == ["-0.125", "1.500", "+1.625"]
    assert [row[1:] for row in preference[2:]] == [["5", "5", "+0"]]  # no text accuracy: no row
    assert cells(page, "eval-preference-kinds") == [
        ["color", "-", "1.000", "-"],  # the base was scored without this kind
        ["shape", "0.250", "0.750", "+0.500"],
    ]


def test_base_only_has_no_difference_and_strings_are_escaped() -> None:
    base = {"pope": {EVIL: pope(0.5, 0.5, 1.0, 8, {EVIL: 0.5})}, "preference": {"n": 5}}
    metrics = {"model": EVIL, "models": {"base": base}}
    page = evaluation_section(metrics)
    assert EVIL not in page and "&lt;script&gt;" in page
    assert "<th>difference</th>" not in page and "<th>diff.</th>" not in page and "<img" not in page
    assert 'id="eval-preference-kinds"' not in page  # no kinds named: no table
    assert cells(page, "eval-pope")[0][2:] == ["0.500"]


def test_chart_and_checks() -> None:
    png = accuracy_chart(METRICS)
    assert png is not None and png.startswith(b"\x89PNG") and len(png) > 5_000
    assert accuracy_chart({"models": {"base": {"preference": {"n": 1}}}}) is None
    assert check_metrics(METRICS) is None
    assert check_metrics([]) == 'no "models" object'
    assert check_metrics({"models": {}}) == "no model was evaluated"
    assert "'base' has no per-split results" in str(check_metrics({"models": {"base": 3}}))


@pytest.fixture(scope="module")
def eval_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `misp-dpo eval` output: tiny LLaVA (base only) on the 6 probes of tests/eval/fixtures."""
    root = tmp_path_factory.mktemp("eval")
    probes = write_ours(root / "data", "parquet")
    args = ["eval", "--model", "tiny", "--probes", str(probes), "--out", str(root / "eval")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--max-new-tokens", "2", "--log-format", "json", "--device", "cpu"])
    assert exit_info.value.code == 0
    return root / "eval"


def test_report_with_eval_renders_the_section(synth_corpus: Path, tmp_path: Path, eval_out: Path) -> None:
    negatives = handmade_negatives(synth_corpus, tmp_path / "neg")
    out = tmp_path / "report"
    cfg = ReportConfig(out=out, negatives=negatives, limit=2, eval=eval_out)
    manifest = run_stage(ReportStage(), cfg, RunOptions())
    assert manifest is not None and "eval" in manifest.inputs
    page = (out / "index.html").read_text()
    metrics = json.loads((eval_out / "metrics.json").read_text())
    accuracy = metrics["models"]["base"]["pope"]["random"]["accuracy"]
    section = page.split('<section id="evaluation">')[1].split("</section>")[0]
    assert cells(section, "eval-pope")[0] == ["random", "accuracy", f"{accuracy:.3f}"]
    assert ["color", "shape"] == [row[0] for row in cells(section, "eval-attributes")]
    assert (out / CHART).stat().st_size > 5_000 and f'src="{CHART}"' in section
    loaded, total = image_status(dump_dom(out / "index.html", tmp_path / "profile"))
    assert loaded == total == 2 * 4 + len(list(out.glob("hist-*.png"))) + 1  # the chart loads too


def test_bad_eval_folder_is_refused_in_one_line(
    synth_corpus: Path, tmp_path: Path, eval_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    negatives = handmade_negatives(synth_corpus, tmp_path / "neg")
    broken = tmp_path / "broken-eval"
    shutil.copytree(eval_out, broken)
    (broken / "metrics.json").unlink()
    capsys.readouterr()  # the fixtures' logs
    cases = {
        negatives: "--eval .*: holds a `mine` output, expected `eval`",
        tmp_path / "nowhere": "--eval .*nowhere: no such folder; point it at the output of a finished `eval`",
        broken: r"--eval .*broken-eval: no metrics.json; rerun `misp-dpo eval \.\.\. --out .* --overwrite`",
    }
    for folder, message in cases.items():
        args = ["report", "--negatives", str(negatives), "--eval", str(folder), "--out", str(tmp_path / "r")]
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), err
    (broken / "metrics.json").write_text('{"scores": []}')
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--negatives", str(negatives), "--eval", str(broken), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert 'metrics.json has no "models" object' in capsys.readouterr().err

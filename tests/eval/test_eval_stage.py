"""`misp-dpo eval` through the CLI: --help, an in-process run on tiny LLaVA with 6 probes, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from misp_dpo.cli import app, main
from misp_dpo.eval.evaluate import ANSWERS
from misp_dpo.pipelines.manifest import read_manifest
from tests.eval.fixtures import write_ours, write_pope
from tests.eval.test_evaluate import write_heldout


def test_help_lists_the_flags() -> None:
    result = CliRunner().invoke(app, ["eval", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for flag in (
        "--model",
        "--adapter",
        "--probes",
        "--image-root",
        "--pairs",
        "--out",
        "--limit",
        "--batch-size",
    ):
        assert flag in result.output
    assert "--device" in result.output


def test_cli_run_on_tiny_llava_with_six_probes(tmp_path: Path) -> None:
    probes = write_ours(tmp_path / "data", "parquet")
    heldout = write_heldout(tmp_path / "held")
    out = tmp_path / "eval"
    args = ["eval", "--model", "tiny", "--probes", str(probes), "--pairs", str(heldout), "--out", str(out)]
    args += ["--batch-size", "4", "--max-new-tokens", "3", "--log-format", "json", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"base"}
    assert {s: m["n"] for s, m in metrics["models"]["base"]["pope"].items()} == {
        "random": 2,
        "popular": 2,
        "adversarial": 2,
    }
    assert metrics["models"]["base"]["preference"]["n_negatives"] == 8
    answers = pq.read_table(out / "answers-00000.parquet")
    assert answers.schema.equals(ANSWERS, check_metadata=True) and answers.num_rows == 6
    assert "| base | random |" in (out / "summary.md").read_text()
    manifest = read_manifest(out, "eval")
    assert manifest.meta["model"] == "tiny" and manifest.stats["items"] == 6


def test_pope_files_with_split_and_image_root_and_limit(tmp_path: Path) -> None:
    one, unnamed, _ = write_pope(tmp_path / "pope")
    out = tmp_path / "eval"
    args = [
        "eval",
        "--model",
        "tiny",
        "--probes",
        str(one),
        "--probes",  # repeatable
        f"{unnamed}:random",
        "--out",
        str(out),
        "--limit",
        "2",
    ]
    args += ["--image-root", str(tmp_path / "pope" / "val2014"), "--log-format", "json", "--device", "cpu"]
    args += ["--max-new-tokens", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    pope = json.loads((out / "metrics.json").read_text())["models"]["base"]["pope"]
    assert {s: m["n"] for s, m in pope.items()} == {"random": 2, "adversarial": 2}
    assert all(m["failures"] == 0 for m in pope.values())


def test_bad_probe_table_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "question": "Is it red?", "label": "maybe", "category": "random"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["eval", "--model", "tiny", "--probes", str(bad), "--out", str(tmp_path / "e"), "--device", "cpu"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "row 0: label 'maybe' is not yes or no" in err[-1] and "Traceback" not in "\n".join(err)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "tiny", "--out", str(tmp_path / "e2")])
    assert exit_info.value.code == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_unreadable_image_is_a_counted_failure(tmp_path: Path) -> None:
    probes = write_ours(tmp_path / "data", "jsonl")
    (tmp_path / "data" / "images" / "COCO_val2014_000000000001.png").unlink()
    out = tmp_path / "eval"
    args = ["eval", "--model", "tiny", "--probes", str(probes), "--out", str(out), "--max-new-tokens", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--log-format", "json", "--device", "cpu", "--max-failure-rate", "0.2"])
    assert exit_info.value.code == 0
    failures = pq.read_table(out / "_failures" / "00000.parquet").to_pylist()
    assert [(f["item"], f["reason"]) for f in failures] == [("base probe q1", "missing image file")]
    pope = json.loads((out / "metrics.json").read_text())["models"]["base"]["pope"]
    assert pope["random"]["n"] == 1 and pope["random"]["failures"] == 1
    answers = pq.read_table(out / "answers-00000.parquet").to_pylist()
    assert answers[1]["answer"] is None and answers[1]["error"].startswith("missing image file")

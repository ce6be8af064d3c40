"""`misp-dpo embed` / `fit-clip` on the command line: help, one-line user errors, SIGKILL and rerun."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from misp_dpo.cli import app, main
from misp_dpo.pipelines.stages.embed import EmbedConfig
from misp_dpo.pipelines.stages.fit_clip import FitClipConfig
from tests.embed.images import write_pairs
from tests.embed.runs import output_files, run_embed


@pytest.mark.parametrize(("command", "config"), [("embed", EmbedConfig), ("fit-clip", FitClipConfig)])
def test_help_shows_every_flag_with_its_default(command: str, config: type) -> None:
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=250)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for f in fields(config):
        if f.metadata.get("argument"):
            assert f.name in text.lower()
        else:
            assert f"--{f.name.replace('_', '-')}" in text, f.name
    assert text.count("[default: ") >= sum(f.default is not f.default_factory for f in fields(config)) - 2


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1
    return lines[0]


def test_missing_column_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = write_pairs(tmp_path / "pairs.csv", {"question": ["q"], "chosen": ["c"], "image": ["x.png"]})
    argv = ["embed", "--pairs", str(pairs), "--out", str(tmp_path / "e"), "--model", "misp-tiny-clip"]
    line = _one_line_error(argv, capsys)
    assert "no column 'prompt'" in line and "--prompt-column" in line
    assert not (tmp_path / "e").exists()


def test_unknown_model_is_one_line_exit_2(
    synth_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["embed", "--pairs", str(synth_corpus / "pairs.parquet"), "--out", str(tmp_path / "e")]
    line = _one_line_error([*argv, "--model", "ViT-Nope"], capsys)
    assert "--model ViT-Nope" in line and "local-dir:PATH" in line
    line = _one_line_error([*argv, "--model", f"local-dir:{tmp_path / 'nothing'}"], capsys)
    assert "no such folder" in line
    assert not (tmp_path / "e").exists()


def test_failures_are_counted_on_the_console(
    synth_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = pq.read_table(synth_corpus / "pairs.parquet").slice(0, 4).to_pydict()
    table["image"] = [str(synth_corpus / p) for p in table["image"]]
    table["image"][1] = str(tmp_path / "missing.png")
    pairs = write_pairs(tmp_path / "pairs.parquet", table)
    argv = ["embed", "--pairs", str(pairs), "--out", str(tmp_path / "e"), "--model", "misp-tiny-clip"]
    line = _one_line_error([*argv, "--log-format", "json"], capsys)
    assert "1 of 4 items failed (25.0% > --max-failure-rate 1.0%)" in line
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--log-format", "json", "--max-failure-rate", "0.5"])
    assert exit_info.value.code == 0
    err = capsys.readouterr().err
    assert '"failures": 1' in err and '"items": 4' in err and '"pairs": 3' in err


def _embed_command(pairs: Path, out: Path) -> list[str]:
    script = Path(sys.executable).with_name("misp-dpo")
    return [
        str(script),
        "embed",
        "--pairs",
        str(pairs),
        "--out",
        str(out),
        "--model",
        "misp-tiny-clip",
        "--tasks",
        "4",
        "--batch-size",
        "16",
        "--num-workers",
        "1",
        "--log-format",
        "json",
    ]


def _start(pairs: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        _embed_command(pairs, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )


def _kill(process: subprocess.Popen[bytes]) -> None:
    """`kill -9` on the job: the stage and its decoding workers (nothing when it already ended)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_is_byte_identical(synth_corpus: Path, tmp_path: Path) -> None:
    pairs = synth_corpus / "pairs.parquet"
    started = time.perf_counter()
    reference = _start(pairs, tmp_path / "reference")
    assert reference.wait() == 0, reference.stderr.read() if reference.stderr else ""
    duration = time.perf_counter() - started
    expected = output_files(tmp_path / "reference")
    assert len([name for name in expected if name.endswith(".parquet")]) == 8

    # once right after the first shard is complete, mid-way through the second
    process = _start(pairs, tmp_path / "after_first")
    while not (tmp_path / "after_first" / "_stats" / "00000.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    _kill(process)
    assert not (tmp_path / "after_first" / "manifest.json").exists()
    run_embed(pairs, tmp_path / "after_first", tasks=4, num_workers=1)
    assert output_files(tmp_path / "after_first") == expected

    # once at a random moment of a run
    process = _start(pairs, tmp_path / "random")
    time.sleep(random.Random(os.getpid()).uniform(0.2, 0.9) * duration)
    _kill(process)
    rerun = _start(pairs, tmp_path / "random")
    assert rerun.wait() == 0
    assert output_files(tmp_path / "random") == expected

"""In-process CLI tests: every command's --help, one-line user errors, pipeline files."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from misp_dpo.cli import app, main
from misp_dpo.pipelines.stages import STAGES

runner = CliRunner()


@pytest.mark.parametrize("command", [*STAGES, "run", "validate", "version"])
def test_help_explains_every_flag(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if command in STAGES:
        assert "--overwrite" in result.output and "[default: " in result.output


def test_user_error_is_one_line_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.txt").write_text("not ours")
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--out", str(tmp_path), "--n", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --out") and "Traceback" not in "\n".join(err)


def test_pipeline_file_runs_stages_and_skips_completed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('root = "unused"\n[synth]\nout = "{root}/synth"\nn = 12\n')
    main_args = ["run", str(pipeline), "--root", str(tmp_path / "r"), "--log-format", "json"]
    with pytest.raises(SystemExit) as first:
        main(main_args)
    assert first.value.code == 0
    assert (tmp_path / "r" / "synth" / "manifest.json").is_file()
    with pytest.raises(SystemExit):
        main(main_args)
    assert "already complete, skipping" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[nosuch]\nout = 'x'\n", "is not a stage"),
        ("[synth]\nout = '{missing}/x'\n", "unknown variable {missing}"),
        ("[synth]\nout = 'x'\nbogus = 1\n", "unknown key(s) bogus"),
        ("[synth]\nout = 'x'\nn = 'many'\n", "n: expected int"),
        ("[synth\n", "not valid TOML"),
    ],
)
def test_bad_pipeline_files_name_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(pipeline)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_example_pipelines_parse_and_accept_flag_spelled_keys() -> None:
    from misp_dpo.pipelines.runtime.pipeline_file import load_pipeline

    for path in sorted(Path("configs").glob("*.toml")):
        stages = load_pipeline(path, STAGES)
        assert [stage.name for stage, _, _ in stages], path
    coco = {stage.name: cfg for stage, cfg, _ in load_pipeline(Path("configs/coco-vitl14.toml"), STAGES)}
    assert coco["embed"].batch_size == 256 and coco["train"].loop.sample_negatives == 2
    assert coco["mine"].settings.uri_root == coco["train"].image_root == Path("data")

"""`misp-dpo mine` with the new selection settings: refusals are one line with exit 2, and the
baselines and --weights 0,0 with --relevance run end to end."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from misp_dpo.cli import main
from tests.helpers import write_random_sae
from tests.mining.fixtures import MineInputs, build_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> MineInputs:
    return build_inputs(tmp_path_factory.mktemp("mine-selection"))


def _mine(inputs: MineInputs, out: Path, *flags: str, sae: Path | None = None) -> int:
    args = ["mine", "--candidates", str(inputs.candidates.root), "--out", str(out), "--log-format", "json"]
    args += ["--sae", str(sae or inputs.sae), *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--strategy", "random", "--relevance", "2"), "--relevance 2.0 is only used by --strategy misp"),
        (("--strategy", "nearest", "--weights", "1,0"), "--weights 1.0,0.0 is only used by --strategy misp"),
        (("--weights", "0,0", "--relevance", "0"), "not both 0 unless --relevance > 0"),
        (("--preset", "paper", "--beta-div", "2"), "--preset paper sets --beta-div 1.0; drop --beta-div 2.0"),
    ],
)
def test_ignored_or_contradicting_settings_are_one_line_exit_2(
    inputs: MineInputs,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...],
    message: str,
) -> None:
    assert _mine(inputs, tmp_path / "n", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_the_paper_preset_refuses_a_topk_sae(
    inputs: MineInputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topk = write_random_sae(tmp_path / "topk", inputs.embeddings.meta["clip"], variant="topk", latents=32)
    capsys.readouterr()  # writing the SAE logged
    assert _mine(inputs, tmp_path / "n", "--preset", "paper", sae=topk) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--preset paper needs an SAE trained with --variant paper" in err[0]


def test_baselines_and_relevance_only_scores_run(inputs: MineInputs, tmp_path: Path) -> None:
    assert _mine(inputs, tmp_path / "topm", "--strategy", "topm", "--top-m", "3") == 0
    topm = pl.read_parquet(tmp_path / "topm" / "train-*.parquet")
    assert all(
        n["proposal"] == pytest.approx(1 / 3)
        for row in topm["negatives"].to_list()
        if len(row) == 3
        for n in row
    )
    assert _mine(inputs, tmp_path / "nr", "--strategy", "nearest-random", "--nearest-count", "1") == 0
    assert _mine(inputs, tmp_path / "near", "--strategy", "nearest", "--sae", str(inputs.sae)) == 0
    first = [
        r[0]["image_id"]
        for r in pl.read_parquet(tmp_path / "nr" / "train-*.parquet")["negatives"].to_list()
        if r
    ]
    nearest = [
        r[0]["image_id"]
        for r in pl.read_parquet(tmp_path / "near" / "train-*.parquet")["negatives"].to_list()
        if r
    ]
    assert first == nearest, "nearest-random's first negative is the nearest"
    assert _mine(inputs, tmp_path / "rel", "--weights", "0,0", "--relevance", "1", "--beta-div", "0") == 0
    relevance = pl.read_parquet(tmp_path / "rel" / "train-*.parquet")["negatives"].to_list()
    assert [[n["image_id"] for n in r] for r in relevance] == [
        [n["image_id"] for n in r]
        for r in pl.read_parquet(tmp_path / "near" / "train-*.parquet")["negatives"].to_list()
    ]
    assert _mine(inputs, tmp_path / "cov", "--diversity", "latent-coverage", "--preset", "none") == 0

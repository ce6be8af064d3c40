"""The `mine` stage end to end on seeded embeddings, with a stand-in SAE (see stand_in.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from misp_dpo.config import build_config
from misp_dpo.errors import UserError
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.runtime.validate import validate_output
from misp_dpo.pipelines.stages.mine import MineConfig, MineStage
from tests.helpers import fake_image_ids, write_random_sae
from tests.mining.fixtures import MineInputs, build_inputs
from tests.pipelines.test_runner import digest

STAGE = MineStage()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> MineInputs:
    return build_inputs(tmp_path_factory.mktemp("mine-inputs"))


def mine(inputs: MineInputs, out: Path, opts: RunOptions | None = None, **values: Any) -> Any:
    values.setdefault("sae", inputs.sae)
    cfg = build_config(MineConfig, {"out": out, "candidates": inputs.candidates.root, **values})
    return run_stage(STAGE, cfg, opts or RunOptions())


def filtered_pool(inputs: MineInputs, p: int) -> list[int]:
    rows = [int(r) for r in inputs.pools[p] if r >= 0 and r != inputs.pair_rows[p]]
    return list(dict.fromkeys(rows))


def test_mine_writes_a_dataset_with_card_that_polars_and_datasets_load(
    inputs: MineInputs, tmp_path: Path
) -> None:
    import datasets

    out = tmp_path / "neg"
    manifest = mine(inputs, out, tasks=3, batch_size=5)
    assert manifest.meta["strategy"] == "misp" and manifest.meta["sae"]["variant"] == "paper"
    assert manifest.meta["clip"] == inputs.embeddings.meta["clip"]
    assert manifest.meta["embeddings_dir"] == str(inputs.embeddings.root.resolve())
    stats = manifest.stats
    assert (stats["items"], stats["pairs"], stats["short_pairs"]) == (24, 24, 2)
    assert (stats["removed_positive"], stats["removed_repeats"]) == (1, 1)
    df = pl.read_parquet(out / "train-*.parquet")
    assert df["pair_id"].to_list() == [f"pair-{i:07d}" for i in range(24)]
    ids = fake_image_ids(60, "synthetic").to_pylist()
    for p, row in enumerate(df.iter_rows(named=True)):
        negatives = row["negatives"]
        pool = filtered_pool(inputs, p)
        assert len(negatives) == min(3, len(pool))
        chosen = [ids.index(n["image_id"]) for n in negatives]
        assert len(set(chosen)) == len(chosen) and set(chosen) <= set(pool)
        assert (
            row["positive"]["image_id"] == ids[inputs.pair_rows[p]] not in [n["image_id"] for n in negatives]
        )
        assert [n["uri"] for n in negatives] == [f"mem://synthetic/{r}.png" for r in chosen]
        assert [n["rank"] for n in negatives] == list(range(len(negatives)))
        assert all(0 < n["proposal"] <= 1 and n["score"] is not None for n in negatives)
    assert stats["negatives"] == sum(len(n) for n in df["negatives"].to_list())
    assert pq.read_schema(out / "train-00000.parquet").metadata == schemas.NEGATIVES.metadata
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense:") and "path: train-*.parquet" in card
    assert str(tmp_path) not in card and "s_i = 1 * l_i / max_pool(l)" in card
    assert "hist-score.png" in card and (out / "hist-score.png").stat().st_size > 1000
    cache = str(tmp_path / "hf")
    for ds in (
        datasets.load_dataset(str(out), cache_dir=cache),
        datasets.load_dataset("parquet", data_dir=str(out), cache_dir=cache),
    ):
        assert ds["train"].num_rows == 24 and ds["train"][0]["pair_id"] == "pair-0000000"
    problems, _ = validate_output(out)
    assert problems == []


@pytest.mark.parametrize("strategy", ["misp", "random"])
def test_sharding_and_batching_do_not_change_the_picks(
    inputs: MineInputs, tmp_path: Path, strategy: str
) -> None:
    mine(inputs, tmp_path / "one", strategy=strategy, tasks=1)
    mine(inputs, tmp_path / "three", strategy=strategy, tasks=3, batch_size=4)
    # Picks are identical; floats may differ in the last bit (BLAS kernels depend on block shapes).
    one = pl.read_parquet(tmp_path / "one" / "train-*.parquet").explode("negatives").unnest("negatives")
    three = pl.read_parquet(tmp_path / "three" / "train-*.parquet").explode("negatives").unnest("negatives")
    assert one.columns == three.columns and len(one) == len(three) == 70
    for column in one.columns:
        if one[column].dtype == pl.Float32:
            np.testing.assert_allclose(one[column].to_numpy(), three[column].to_numpy(), rtol=1e-5, atol=1e-6)
        else:
            assert one[column].to_list() == three[column].to_list(), column


def test_crash_then_resume_is_byte_identical(
    inputs: MineInputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from misp_dpo.mining import mine as mine_module

    reference = tmp_path / "reference"
    mine(inputs, reference, tasks=3, batch_size=3)
    out = tmp_path / "resumed"
    calls, select = [0], mine_module.select_negatives

    def crash_on_the_fifth_batch(*args: Any, **kwargs: Any) -> Any:  # task 0 has 3 batches
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("simulated crash")
        return select(*args, **kwargs)

    monkeypatch.setattr(mine_module, "select_negatives", crash_on_the_fifth_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mine(inputs, out, tasks=3, batch_size=3)
    assert (out / "train-00000.parquet").exists() and not (out / "train-00001.parquet").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(mine_module, "select_negatives", select)
    mine(inputs, out, tasks=3, batch_size=3)
    assert digest(out) == digest(reference)


def test_changed_config_is_refused(inputs: MineInputs, tmp_path: Path) -> None:
    mine(inputs, tmp_path / "neg", strategy="nearest", sae=None)
    with pytest.raises(UserError, match=r"strategy: 'nearest' -> 'maxmin'.*--overwrite"):
        mine(inputs, tmp_path / "neg", strategy="maxmin", sae=None)


def test_sae_of_another_clip_is_refused_in_one_line_before_any_work(
    inputs: MineInputs, tmp_path: Path
) -> None:
    other = dict(inputs.embeddings.meta["clip"], model="ViT-B-32", fingerprint="another-model")
    write_random_sae(tmp_path / "other-sae", other)
    out = tmp_path / "neg"
    with pytest.raises(UserError) as error:
        mine(inputs, out, sae=tmp_path / "other-sae")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--sae {tmp_path / 'other-sae'}")
    assert "ViT-B-32" in message and "rebuild it from the same embeddings" in message
    assert not out.exists()


def test_more_negatives_than_any_pool_holds_is_refused_before_any_work(
    inputs: MineInputs, tmp_path: Path
) -> None:
    pool = inputs.candidates.meta["pool"]
    out = tmp_path / "neg"
    with pytest.raises(UserError) as error:
        mine(inputs, out, negatives=pool + 1)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--negatives {pool + 1}: the pools of --candidates")
    assert f"at most {pool}" in message and "--pool" in message
    assert not out.exists()


def test_misp_without_an_sae_is_refused(inputs: MineInputs, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--sae: --strategy misp scores candidates with an SAE"):
        mine(inputs, tmp_path / "neg", sae=None)


def test_drop_short_and_pairwise_format(inputs: MineInputs, tmp_path: Path) -> None:
    listwise = mine(inputs, tmp_path / "list")
    dropped = mine(inputs, tmp_path / "drop", drop_short=True)
    assert (dropped.stats["pairs"], dropped.stats["dropped_short"]) == (22, 2)
    assert len(pl.read_parquet(tmp_path / "drop" / "train-*.parquet")) == 22
    pairwise = mine(inputs, tmp_path / "pairs", format="pairwise")
    assert pairwise.meta["format"] == "pairwise"
    rows = pl.read_parquet(tmp_path / "pairs" / "train-*.parquet")
    assert len(rows) == listwise.stats["negatives"] == pairwise.stats["negatives"]
    assert (
        pq.read_schema(tmp_path / "pairs" / "train-00000.parquet").metadata
        == schemas.NEGATIVES_PAIRWISE.metadata
    )
    flat = pl.read_parquet(tmp_path / "list" / "train-*.parquet").explode("negatives")
    assert (
        rows["rejected_image"].struct.field("image_id").to_list()
        == flat["negatives"].struct.field("image_id").to_list()
    )


def test_strategies_without_an_sae_and_with_one_for_the_record(inputs: MineInputs, tmp_path: Path) -> None:
    plain = mine(inputs, tmp_path / "maxmin", strategy="maxmin", sae=None)
    assert plain.meta["sae"] is None
    first = pl.read_parquet(tmp_path / "maxmin" / "train-*.parquet")["negatives"][2][0]
    assert first["recon_error"] is None and first["score"] is not None
    mine(inputs, tmp_path / "random", strategy="random")
    first = pl.read_parquet(tmp_path / "random" / "train-*.parquet")["negatives"][2][0]
    assert (
        first["recon_error"] is not None
        and first["score"] is None
        and first["proposal"] == pytest.approx(1 / 4)
    )


def test_non_finite_embeddings_fail_their_pairs(tmp_path: Path) -> None:
    base = build_inputs(tmp_path / "ok")
    bad_row = int(base.pools[5, 0])
    images = base.images.copy()
    images[bad_row] = np.nan
    from tests.helpers import write_candidates, write_embeddings

    prompts = np.ones((24, 8), np.float32) / np.sqrt(8)
    embeddings = write_embeddings(tmp_path / "emb", images, base.pair_rows, prompts, prompts)
    candidates = write_candidates(tmp_path / "cand", embeddings, base.pools, images)
    expected = sum(bad_row in filtered_pool(base, p) or base.pair_rows[p] == bad_row for p in range(24))
    inputs = MineInputs(embeddings, candidates, base.sae, images, base.pair_rows, base.pools)
    with pytest.raises(UserError, match=rf"{expected} of 24 items failed"):
        mine(inputs, tmp_path / "neg", strategy="maxmin", sae=None)
    manifest = mine(inputs, tmp_path / "neg", RunOptions(max_failure_rate=0.5), strategy="maxmin", sae=None)
    assert manifest.stats["failures"] == expected and manifest.stats["pairs"] == 24 - expected
    failures = pq.read_table(tmp_path / "neg" / "_failures" / "00000.parquet")
    assert set(failures["reason"].to_pylist()) == {"non-finite score"}


def test_misp_with_a_topk_sae(inputs: MineInputs, tmp_path: Path) -> None:
    clip = inputs.embeddings.meta["clip"]
    sae = write_random_sae(tmp_path / "topk", clip, variant="topk", latents=32)
    manifest = mine(inputs, tmp_path / "neg", sae=sae)
    assert manifest.meta["sae"]["variant"] == "topk" and manifest.meta["sae"]["latents"] == 32
    negatives = pl.read_parquet(tmp_path / "neg" / "train-*.parquet").explode("negatives").unnest("negatives")
    assert negatives["deviation"].min() > 0 and negatives["recon_error"].min() >= 0


def test_cli_prints_the_clip_refusal_as_one_line(
    inputs: MineInputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from misp_dpo.cli import main

    other = dict(inputs.embeddings.meta["clip"], model="ViT-L-14", fingerprint="openai-weights")
    sae = write_random_sae(tmp_path / "other-sae", other)
    capsys.readouterr()  # the fixture's own log lines are not the CLI's output
    args = [
        "mine",
        "--candidates",
        str(inputs.candidates.root),
        "--sae",
        str(sae),
        "--out",
        str(tmp_path / "n"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --sae {sae}: made with CLIP ViT-L-14")


def test_weights_flag_parses_and_bad_values_are_refused() -> None:
    cfg = build_config(MineConfig, {"out": "o", "candidates": "c", "weights": "1,0.5"}, "flags")
    assert cfg.settings.selection.weights == (1.0, 0.5)
    with pytest.raises(UserError, match="weights: expected numbers separated by commas"):
        build_config(MineConfig, {"out": "o", "candidates": "c", "weights": "1,x"}, "flags")
    with pytest.raises(UserError, match="weights must be two non-negative numbers"):
        build_config(MineConfig, {"out": "o", "candidates": "c", "weights": "1,0.5,2"}, "flags")
    with pytest.raises(UserError, match="tau must be positive"):
        build_config(MineConfig, {"out": "o", "candidates": "c", "tau": 0.0}, "flags")
    with pytest.raises(UserError, match="must be non-negative: {'relevance': -1.0}"):
        build_config(MineConfig, {"out": "o", "candidates": "c", "relevance": -1.0}, "flags")
    relevant = build_config(MineConfig, {"out": "o", "candidates": "c", "relevance": 0.5}, "flags")
    assert relevant.settings.selection.relevance == 0.5


def test_uris_outside_the_uri_root_are_kept_and_counted(inputs: MineInputs, tmp_path: Path) -> None:
    manifest = mine(inputs, tmp_path / "neg", uri_root=tmp_path)  # the fixture's mem:// uris lie elsewhere
    stats = manifest.stats
    assert stats["uris_outside_root"] == stats["pairs"] + stats["negatives"]
    assert manifest.meta["uri_root"] == str(tmp_path.resolve())
    df = pl.read_parquet(tmp_path / "neg" / "train-*.parquet")
    assert df["positive"].struct.field("uri").str.starts_with("mem://synthetic/").all()

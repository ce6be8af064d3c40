"""`misp-dpo sae` end to end on seeded fixtures: outputs, determinism, resume, and bad inputs (c, f)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from misp_dpo.config import build_config
from misp_dpo.errors import UserError
from misp_dpo.pipelines import schemas
from misp_dpo.pipelines.embeddings import EMBED_STAGE
from misp_dpo.pipelines.io import numpy_to_vectors, sha256_file
from misp_dpo.pipelines.manifest import read_manifest
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stages.sae import CHECKPOINT, SaeConfig, SaeStage
from misp_dpo.sae import load_sae
from tests.helpers import fake_image_ids, write_candidates, write_embeddings, write_prewritten
from tests.sae.fixtures import pool_arrays, write_inputs

OUTPUTS = ("sae.safetensors", "cfg.json", "metrics.json", "curves.png")


def train(candidates: Path, out: Path, **values: object) -> object:
    values = {"candidates": candidates, "out": out, "steps": 30, "batch_size": 64, "device": "cpu", **values}
    return run_stage(SaeStage(), build_config(SaeConfig, values), RunOptions())


@pytest.mark.parametrize("variant", ["paper", "topk"])
def test_stage_writes_a_loadable_sae(tmp_path: Path, variant: str) -> None:
    embeddings, candidates = write_inputs(tmp_path)
    manifest = train(candidates.root, tmp_path / "sae", variant=variant, latents=16, k=4)
    assert sorted(f.path for f in manifest.files) == sorted(OUTPUTS)
    assert not (tmp_path / "sae" / CHECKPOINT).exists()
    assert manifest.meta["clip"] == embeddings.meta["clip"] and manifest.meta["variant"] == variant
    encoder = load_sae(tmp_path / "sae", device="cpu")
    assert (encoder.variant, encoder.latents, encoder.clip) == (variant, 16, embeddings.meta["clip"])
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["inputs"] == manifest.inputs and cfg["d_in"] == (64 if variant == "paper" else 8)
    assert cfg["normalisation"]["scale"] > 0 and cfg["training"]["steps"] == 30
    metrics = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert {"fvu", "cosine", "l0", "mean_activation", "dead_fraction", "dense_fraction"} <= set(metrics)
    assert (tmp_path / "sae" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    vectors, pair_rows, prompts, pools = pool_arrays()
    mask = pools >= 0
    codes = encoder.encode_pools(vectors[pair_rows], vectors[np.maximum(pools, 0)], prompts, mask)
    assert codes.codes.shape == (40, 9, 16) and (codes.recon_error[mask] > 0).all()


@pytest.mark.slow
def test_same_seed_gives_byte_identical_outputs(tmp_path: Path) -> None:
    _, candidates = write_inputs(tmp_path)
    train(candidates.root, tmp_path / "a", latents=16)
    train(candidates.root, tmp_path / "b", latents=16, preload_gb=0.0)  # streamed: same bytes
    for name in OUTPUTS:
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name), name


def test_an_interrupted_run_resumes_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, candidates = write_inputs(tmp_path)
    train(candidates.root, tmp_path / "whole", latents=16, variant="topk", k=4)
    monkeypatch.setattr("misp_dpo.pipelines.stages.sae.CHECKPOINT_SECONDS", 0.0)  # checkpoint every step
    monkeypatch.setattr("misp_dpo.pipelines.stages.sae._write_outputs", _crash)
    with pytest.raises(RuntimeError, match="killed"):
        train(candidates.root, tmp_path / "resumed", latents=16, variant="topk", k=4)
    assert (tmp_path / "resumed" / CHECKPOINT).is_file()
    monkeypatch.undo()
    train(candidates.root, tmp_path / "resumed", latents=16, variant="topk", k=4)
    for name in OUTPUTS:
        assert sha256_file(tmp_path / "whole" / name) == sha256_file(tmp_path / "resumed" / name), name


def _crash(*args: object) -> None:
    raise RuntimeError("killed before writing the outputs")


def test_missing_manifest_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--candidates .*no manifest.json") as error:
        train(tmp_path / "empty", tmp_path / "sae")
    assert "\n" not in str(error.value)


def test_k_above_latents_is_refused(tmp_path: Path) -> None:
    _, candidates = write_inputs(tmp_path)
    with pytest.raises(UserError, match="--k 100 exceeds --latents 64"):
        train(candidates.root, tmp_path / "sae", variant="topk", k=100)  # latents: 8 x D = 64
    with pytest.raises(UserError, match=r"k \(9\) must not exceed latents \(8\)"):
        train(candidates.root, tmp_path / "sae", variant="topk", k=9, latents=8)


def test_wrong_dimension_is_refused_before_training(tmp_path: Path) -> None:
    vectors, pair_rows, prompts, pools = pool_arrays()
    embeddings = write_embeddings(tmp_path / "emb", vectors, pair_rows, prompts, prompts)
    wrong = write_prewritten(
        tmp_path / "emb16",
        EMBED_STAGE,
        {
            "images": pa.table(
                {
                    "image_id": fake_image_ids(len(vectors), "synthetic"),
                    "uri": ["x"] * len(vectors),
                    "embedding": numpy_to_vectors(vectors),
                },
                schema=schemas.images(8),
            ),  # fmt: skip
        },
        meta={"clip": {**embeddings.meta["clip"], "dim": 16}},
    )
    candidates = write_candidates(tmp_path / "cand", embeddings, pools, vectors)
    manifest = json.loads((candidates.root / "manifest.json").read_text())
    manifest["meta"]["embeddings_dir"] = str(wrong.root)
    manifest["inputs"]["embeddings"] = sha256_file(wrong.root / "manifest.json")
    (candidates.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"made with CLIP .*D=8\) but the embeddings come from .*D=16"):
        train(candidates.root, tmp_path / "sae")
    manifest["meta"]["clip"]["dim"] = 16  # consistent manifests, but the shards hold 8-d vectors
    (candidates.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="column embedding has dimension 8, but .* says D=16"):
        train(candidates.root, tmp_path / "sae2")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_rows_are_named_before_training(tmp_path: Path) -> None:
    vectors, pair_rows, prompts, pools = pool_arrays()
    bad_images = vectors.copy()
    bad_images[7, 2] = np.nan
    embeddings = write_embeddings(tmp_path / "emb", bad_images, pair_rows, prompts, prompts)
    candidates = write_candidates(tmp_path / "cand", embeddings, pools, vectors)
    with pytest.raises(UserError, match="1 image embedding.* hold NaN or inf .first: image_id"):
        train(candidates.root, tmp_path / "sae")
    bad_prompts = prompts.copy()
    bad_prompts[5] = np.inf
    embeddings = write_embeddings(tmp_path / "emb2", vectors, pair_rows, bad_prompts, prompts)
    candidates = write_candidates(tmp_path / "cand2", embeddings, pools, vectors)
    with pytest.raises(UserError, match="pair pair-0000005 has a NaN or inf prompt embedding"):
        train(candidates.root, tmp_path / "sae2")
    assert not (tmp_path / "sae2" / "sae.safetensors").exists()


def test_the_mine_stage_accepts_the_trained_sae(tmp_path: Path) -> None:
    from misp_dpo.pipelines.stages.mine import MineConfig, MineStage

    _, candidates = write_inputs(tmp_path)
    train(candidates.root, tmp_path / "sae", latents=16)
    values = {
        "candidates": candidates.root,
        "sae": tmp_path / "sae",
        "out": tmp_path / "neg",
        "device": "cpu",
    }
    manifest = run_stage(MineStage(), build_config(MineConfig, values), RunOptions())
    assert manifest.meta["sae"]["variant"] == "paper" and manifest.rows("train") == 40
    assert read_manifest(tmp_path / "sae", "sae").meta["clip"]["dim"] == 8


def test_all_pairs_held_out_is_one_line(tmp_path: Path) -> None:
    _, candidates = write_inputs(tmp_path, pairs=3)
    with pytest.raises(UserError, match="no training samples.*--heldout"):
        train(candidates.root, tmp_path / "sae", heldout=0.999)

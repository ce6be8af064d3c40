"""Naming and loading open_clip models: the registered tiny config, fingerprints, local-dir round trip."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from misp_dpo.embed.clip import (
    CONFIG_FILE,
    TINY_MODEL,
    WEIGHTS_FILE,
    ClipEncoder,
    clip_device,
    describe_model,
    register_model_configs,
)
from misp_dpo.errors import UserError
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stages.fit_clip import FitClipConfig, FitClipStage


@pytest.fixture(scope="module")
def checkpoint(synth_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fit-clip output after a few steps: a real local-dir checkpoint folder."""
    out = tmp_path_factory.mktemp("clip") / "clip"
    run_stage(
        FitClipStage(), FitClipConfig(corpus=synth_corpus, out=out, steps=3, batch_size=16), RunOptions()
    )
    return out


def test_tiny_config_is_registered_through_open_clip() -> None:
    register_model_configs()
    register_model_configs()  # idempotent
    assert TINY_MODEL in open_clip.list_models()
    config = open_clip.get_model_config(TINY_MODEL)
    assert config["embed_dim"] == 64 and config["vision_cfg"]["image_size"] == 64


def test_registry_names_and_their_fingerprints(tmp_path: Path) -> None:
    random = describe_model(TINY_MODEL)
    assert (random.fingerprint, random.dim, random.context_length) == (f"{TINY_MODEL}/random", 64, 32)
    tagged = describe_model("ViT-B-32", "laion2b_s34b_b79k")  # resolved from configs, nothing downloaded
    assert tagged.fingerprint == "ViT-B-32/laion2b_s34b_b79k" and tagged.dim == 512
    assert tagged.preprocess["size"] == [224, 224]
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    assert describe_model(TINY_MODEL, str(weights)).fingerprint == hashlib.sha256(b"weights").hexdigest()


@pytest.mark.parametrize(
    ("model", "pretrained", "message"),
    [
        ("ViT-Nope", "", "not a known open_clip model; name an open_clip model"),
        ("ViT-B-32", "nope", "--pretrained nope: not a tag of ViT-B-32 (tags: openai,"),
        ("hf-hub:org/repo", "", "download the repository and pass local-dir:PATH"),
        ("local-dir:/does/not/exist", "", "no such folder"),
        ("", "", "--model: empty"),
    ],
)
def test_bad_model_names_are_user_errors(model: str, pretrained: str, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        describe_model(model, pretrained)


def test_local_dir_without_weights_or_config(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no readable open_clip_config.json"):
        describe_model(f"local-dir:{tmp_path}")
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model_cfg": open_clip.get_model_config("RN50")}))
    with pytest.raises(UserError, match="no weights file"):
        describe_model(f"local-dir:{tmp_path}")


def test_fit_clip_output_is_an_open_clip_local_dir(checkpoint: Path) -> None:
    name = f"local-dir:{checkpoint}"
    description = describe_model(name)
    weights = checkpoint / WEIGHTS_FILE
    assert description.fingerprint == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (description.dim, description.preprocess["size"]) == (64, [64, 64])
    # open_clip itself loads the folder, weights and preprocessing included
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    saved = load_file(weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert set(saved) == set(model.state_dict())
    tokenizer = open_clip.get_tokenizer(name)
    assert tokenizer(["a caption"]).shape == (1, 32)
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    assert {"top1", "recall5", "chance_top1", "chance_recall5"} <= set(metrics["retrieval"])


def test_encoder_normalises_and_truncates_long_texts(checkpoint: Path) -> None:
    encoder = ClipEncoder(describe_model(f"local-dir:{checkpoint}"), "cpu")
    long_text = "a red circle " * 100
    tokens = encoder.tokenizer(["a small red circle", long_text])
    assert tokens.shape == (2, 32)
    texts = encoder.texts(tokens)
    images = encoder.images(torch.zeros(3, 3, 64, 64))
    assert texts.dtype == np.float32 and np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert images.shape == (3, 64) and np.allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    # the same folder loaded twice gives the same numbers
    again = ClipEncoder(describe_model(f"local-dir:{checkpoint}"), "cpu", seed=123)
    assert np.array_equal(again.texts(tokens), texts)


def test_random_weights_are_seeded() -> None:
    tokens = torch.ones(1, 32, dtype=torch.long)
    first = ClipEncoder(describe_model(TINY_MODEL), "cpu", seed=0).texts(tokens)
    assert np.array_equal(ClipEncoder(describe_model(TINY_MODEL), "cpu", seed=0).texts(tokens), first)
    assert not np.array_equal(ClipEncoder(describe_model(TINY_MODEL), "cpu", seed=1).texts(tokens), first)


def test_device_auto_takes_cuda_only_when_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    assert clip_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert clip_device("auto") == "cpu"
    with pytest.raises(UserError, match="--device cuda: no CUDA device is visible"):
        clip_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert clip_device("auto") == clip_device("cuda") == "cuda"

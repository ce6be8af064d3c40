"""`train` writes an adapter that loads (peft's AutoPeftModel, from any folder) and that eval applies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from misp_dpo.config import to_dict
from misp_dpo.dpo.distributed import DistInfo
from misp_dpo.dpo.loop import LoopConfig
from misp_dpo.dpo.losses import LossConfig
from misp_dpo.dpo.model import ModelConfig, load_policy
from misp_dpo.dpo.reference import align_reference, compute_reference
from misp_dpo.dpo.sequences import SequenceEncoder, collate
from misp_dpo.dpo.trainer import build_state, run_training, save_outputs
from misp_dpo.eval.config import EvalConfig
from misp_dpo.eval.evaluate import evaluate
from misp_dpo.eval.models import load_base, load_trained, resolve_base
from misp_dpo.eval.preference import load_preference_pairs
from misp_dpo.eval.probes import load_probes
from tests.eval.test_evaluate import CPU, write_heldout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A `train` output on --model tiny (4 steps at a high learning rate) and the data folder."""
    data_dir = tmp_path_factory.mktemp("data")
    out = tmp_path_factory.mktemp("dpo")
    pairs = load_preference_pairs(write_heldout(data_dir))
    policy = load_policy("tiny", ModelConfig(device="cpu"), seed=3)
    table, _ = compute_reference(policy, pairs, np.arange(len(pairs)), 16, show_progress=False)
    reference = align_reference(table, pairs)
    loop = LoopConfig(max_steps=4, batch_size=2, lr=5e-2, checkpoint_every=100)
    state = build_state(
        policy, pairs, reference, reference.trainable(pairs.counts), LossConfig(), loop, 3, DistInfo()
    )
    run_training(state, out, show_progress=False)
    save_outputs(policy, "tiny", 3, out, {"dataset": "heldout.jsonl", "loss": to_dict(LossConfig())})
    return out, data_dir


def _logits(model: torch.nn.Module, processor: object, data_dir: Path) -> torch.Tensor:
    pairs = load_preference_pairs(data_dir / "heldout.jsonl")
    from misp_dpo.dpo.data import load_image

    record = pairs.records([0])[0]
    encoder = SequenceEncoder(processor)
    batch = collate(
        [encoder.encode([(record.prompt, record.chosen, load_image(record.positive.uri, data_dir))])], 0
    )
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.images).logits


def test_adapter_names_its_base_and_loads_from_any_folder(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = trained
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    assert config["task_type"] is None
    assert (out / "base" / "config.json").is_file() and (out / "base" / "model.safetensors").is_file()
    monkeypatch.chdir(tmp_path)
    from peft import AutoPeftModel, PeftModel

    model = AutoPeftModel.from_pretrained(str(out / "adapter"))
    assert isinstance(model, PeftModel)
    assert type(model.get_base_model()).__name__ == "LlavaForConditionalGeneration"
    card = (out / "adapter" / "README.md").read_text()
    assert f"base model: `{(out / 'base').resolve()}`" in card
    assert "dataset: `heldout.jsonl`" in card and "beta=0.5" in card and "final step: step=4" in card


def test_eval_applies_the_adapter_and_it_changes_the_logits(trained: tuple[Path, Path]) -> None:
    out, data_dir = trained
    adapter = out / "adapter"
    base = load_base(resolve_base(None, adapter), CPU)
    reference = load_policy("tiny", ModelConfig(lora=False, device="cpu"), seed=3)
    before = _logits(base.model, base.processor, data_dir)
    assert torch.allclose(before, _logits(reference.model, reference.processor, data_dir))  # the saved base
    trained_model = load_trained(base, adapter, CPU)
    after = _logits(trained_model, base.processor, data_dir)
    assert (after - before).abs().max() > 1e-3
    with trained_model.disable_adapter():
        assert torch.allclose(before, _logits(trained_model, base.processor, data_dir))


def test_one_run_evaluates_base_and_trained(trained: tuple[Path, Path]) -> None:
    out, data_dir = trained
    probes = load_probes([str(data_dir / "probes.jsonl")])
    pairs = load_preference_pairs(data_dir / "heldout.jsonl")
    cfg = EvalConfig(device="cpu", batch_size=3, max_new_tokens=3)
    result = evaluate(probes, pairs, None, out / "adapter", cfg, show_progress=False)
    models = result.metrics["models"]
    assert set(models) == {"base", "trained"}
    assert result.metrics["model"] == str((out / "base").resolve())
    for name in ("base", "trained"):
        assert set(models[name]["pope"]) == {"random", "popular", "adversarial"}
        assert models[name]["preference"]["n_negatives"] == 8
    assert result.answers.num_rows == 12
    assert result.answers.column("model").to_pylist() == ["base"] * 6 + ["trained"] * 6
    # trained on these very pairs: the positive's log-prob lead over the negatives grew
    margins = {name: models[name]["preference"]["image_margin"] for name in models}
    assert margins["trained"] > margins["base"] + 0.1, margins

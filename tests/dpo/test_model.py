"""The tiny LLaVA, its processor, LoRA placement and summed response log-probs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from misp_dpo.dpo.data import PairRecord, PreferenceData, load_image
from misp_dpo.dpo.model import ModelConfig, Policy, check_model_spec, language_model_linears, load_policy
from misp_dpo.dpo.sequences import SequenceBatch, SequenceEncoder, collate, sequence_logps
from misp_dpo.dpo.tiny import IMAGE_SIZE, PATCH_SIZE
from misp_dpo.errors import UserError
from misp_dpo.pipelines.io import read_table


def _batch(
    policy: Policy, negatives: Path, pairs: int = 3
) -> tuple[SequenceEncoder, list[PairRecord], SequenceBatch]:
    data = PreferenceData(read_table(sorted(negatives.glob("train-*.parquet"))), negatives)
    encoder = SequenceEncoder(policy.processor)
    records = data.records(np.arange(pairs))
    items = [
        (r.prompt, response, load_image(r.positive.uri, data.root))
        for r in records
        for response in (r.chosen, r.rejected or "")
    ]
    return encoder, records, collate([encoder.encode(items)], encoder.tokenizer.pad_token_id)


def test_prompt_has_the_image_slot_and_response_is_appended(negatives16: Path) -> None:
    policy = load_policy("tiny", ModelConfig(), seed=0)
    encoder, records, batch = _batch(policy, negatives16)
    text = encoder.prompt_text(records[0].prompt)
    assert text.startswith("USER: <image>\n") and text.endswith("ASSISTANT:")
    image_id = policy.model.config.image_token_index
    assert ((batch.input_ids == image_id).sum(dim=1) == (IMAGE_SIZE // PATCH_SIZE) ** 2).all()
    tokenizer = encoder.tokenizer
    response = encoder.response_ids(records[0].chosen)
    assert tokenizer.unk_token_id not in response and response[-1] == tokenizer.eos_token_id
    row = batch.input_ids[0][batch.attention_mask[0].bool()]
    assert row[-len(response) :].tolist() == response
    assert batch.predicts_response[0].sum() == len(response)


def test_sequence_logps_match_full_logits(negatives16: Path) -> None:
    policy = load_policy("tiny", ModelConfig(lora=False), seed=0)
    _, _, batch = _batch(policy, negatives16)
    with torch.no_grad():
        got = sequence_logps(policy.model, batch)
        logits = policy.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.images
        ).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    expected = (logp * batch.predicts_response[:, :-1]).sum(dim=1)
    assert torch.allclose(got.double(), expected, atol=1e-4)
    assert (got < 0).all()


def test_lora_only_on_the_language_model_and_starts_at_the_reference(negatives16: Path) -> None:
    policy = load_policy("tiny", ModelConfig(lora_r=4), seed=0)
    trainable = policy.trainable()
    assert trainable and all("lora_" in name and "language_model" in name for name in trainable)
    vision = [p for n, p in policy.model.named_parameters() if "vision_tower" in n]
    assert vision and not any(p.requires_grad for p in vision)
    assert policy.model.base_model.model.lm_head.weight.requires_grad is False
    _, _, batch = _batch(policy, negatives16)
    with torch.no_grad():
        with policy.as_reference():
            reference = sequence_logps(policy.model, batch)
        assert torch.equal(sequence_logps(policy.model, batch), reference)  # LoRA B = 0 at init
        for name, p in trainable.items():
            if "lora_B" in name:
                p.add_(0.05)
        assert not torch.allclose(sequence_logps(policy.model, batch), reference)
        with policy.as_reference():
            assert torch.equal(sequence_logps(policy.model, batch), reference)


def test_linear_targets_exclude_vision_and_head() -> None:
    policy = load_policy("tiny", ModelConfig(lora=False), seed=0)
    names = language_model_linears(policy.model)
    assert names and all(n.startswith("model.language_model.") for n in names)


def test_saved_tiny_loads_back_by_local_path(tmp_path: Path, negatives16: Path) -> None:
    tiny = load_policy("tiny", ModelConfig(lora=False), seed=3)
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.processor.save_pretrained(tmp_path / "m")
    local = load_policy(str(tmp_path / "m"), ModelConfig(lora=False), seed=0)
    assert local.identity["weights"] == tiny.identity["weights"]
    _, _, batch = _batch(tiny, negatives16)
    with torch.no_grad():
        assert torch.allclose(sequence_logps(local.model, batch), sequence_logps(tiny.model, batch))


def test_seed_changes_the_weights_fingerprint() -> None:
    a = load_policy("tiny", ModelConfig(), seed=0).identity
    b = load_policy("tiny", ModelConfig(), seed=1).identity
    assert a["weights"] != b["weights"] and a["config_sha256"] == b["config_sha256"]


def test_bad_model_specs_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--model .*not a local model folder"):
        check_model_spec(str(tmp_path / "nothing-here"))
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "llama"
    )
    with pytest.raises(UserError, match="not an image-text-to-text model"):
        check_model_spec(str(tmp_path / "llama"))
    with pytest.raises(UserError, match="tiny-HxL"):
        check_model_spec("tiny-10x2")


def test_gradient_checkpointing_gives_the_same_gradients(negatives16: Path) -> None:
    grads = []
    for mode in ("off", "on"):
        policy = load_policy("tiny", ModelConfig(gradient_checkpointing=mode), seed=0)  # type: ignore[arg-type]
        for name, p in policy.trainable().items():
            if "lora_B" in name:
                torch.nn.init.constant_(p, 0.01)  # B = 0 would leave A without gradient
        policy.model.train()
        _, _, batch = _batch(policy, negatives16)
        sequence_logps(policy.model, batch).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.trainable().items()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert all(g.abs().sum() > 0 for g in grads[0].values())

"""The models under test: the base as it is, and the base with the adapter `train` wrote.

The base is `--model`, or else the `base_model_name_or_path` of the adapter's config (train sets it
to the hub id or the absolute path of the base folder). Loading goes through the trainer's
`load_policy` (same device choice, dtype and `tiny` handling) with LoRA off; the adapter is then
attached with peft. A folder with a whole model instead of an adapter (`train --no-lora` writes
`model/`) is loaded as the trained model itself.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from misp_dpo.dpo.model import ModelConfig, Policy, load_policy
from misp_dpo.errors import UserError
from misp_dpo.eval.config import EvalConfig
from misp_dpo.optional import import_extra

ADAPTER_CONFIG = "adapter_config.json"


def resolve_base(model: str | None, adapter: Path | None) -> str:
    """`--model` when given, else the base the adapter names."""
    if model:
        return model
    if adapter is None:
        raise UserError("--model: name the model to evaluate (a hub id, a local folder or tiny)")
    config = adapter / ADAPTER_CONFIG
    if not config.is_file():
        raise UserError(f"--adapter {adapter}: no {ADAPTER_CONFIG}; pass --model with the base model")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"--adapter {config}: names no base_model_name_or_path; pass --model with the base")
    return str(base)


def _model_config(cfg: EvalConfig) -> ModelConfig:
    return ModelConfig(lora=False, precision=cfg.precision, device=cfg.device, gradient_checkpointing="off")


def load_base(spec: str, cfg: EvalConfig, seed: int = 0) -> Policy:
    """The base model in eval mode (`seed` only matters for `tiny`, which is built from it)."""
    policy = load_policy(spec, _model_config(cfg), seed)
    policy.model.eval()
    return policy


def load_trained(base: Policy, adapter: Path, cfg: EvalConfig) -> torch.nn.Module:
    """The base with the peft adapter in `adapter` attached (the base module is modified in place),
    or the whole model saved there."""
    if (adapter / ADAPTER_CONFIG).is_file():
        peft = import_extra("peft", "train", f"--adapter {adapter}")
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.PeftModel.from_pretrained(base.model, str(adapter))
        return model.to(base.device).eval()
    if (adapter / "config.json").is_file():
        return load_policy(str(adapter), _model_config(cfg), 0).model.eval()
    raise UserError(
        f"--adapter {adapter}: neither a peft adapter ({ADAPTER_CONFIG}) nor a model folder (config.json); "
        "pass the adapter/ (or model/) folder that `misp-dpo train` wrote"
    )

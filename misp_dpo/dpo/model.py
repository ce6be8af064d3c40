"""The policy: any transformers image-text-to-text model, LoRA on its language model, vision frozen.

The reference policy is never a second model: with LoRA it is the same module with its adapters
disabled, and without LoRA the reference log-probs are computed before the first update. `identity`
names what the reference log-probs depend on (model, weights, precision, prompt format), so a cache
made for another model is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from misp_dpo.config import option
from misp_dpo.dpo.tiny import parse_tiny, tiny_model, tiny_processor
from misp_dpo.errors import UserError
from misp_dpo.optional import import_extra, require

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """How the policy is loaded and which of its weights train."""

    lora: bool = option(True, "train LoRA adapters on every linear layer of the language model (peft)")
    lora_r: int = option(16, "LoRA rank r")
    lora_alpha: int = option(32, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "weights dtype; auto: bf16 on GPU, fp32 on CPU"
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = option(
        "auto", "recompute activations in backward to save memory; auto: on GPU only", hashed=False
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where the model runs", hashed=False)

    def __post_init__(self) -> None:
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ValueError(f"lora_r and lora_alpha must be >= 1, got {self.lora_r}, {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class Policy:
    """The trained model, its processor, and what its reference log-probs are tied to."""

    model: torch.nn.Module  # a peft PeftModel with LoRA, else the transformers model
    processor: Any
    device: torch.device
    lora: bool
    identity: dict[str, Any]

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[None]:
        """The reference policy: adapters disabled (LoRA) or the untouched weights (before training)."""
        context = self.model.disable_adapter() if self.lora else contextlib.nullcontext()  # type: ignore[operator]
        with context:
            yield

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}


def torch_device(device: str, local_rank: int = 0) -> torch.device:
    """The device of this process: under torchrun, GPU `local_rank` of the node."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def check_model_spec(spec: str) -> None:
    """Fail in one line, before any work, when `--model` names no image-text-to-text model."""
    try:
        if parse_tiny(spec) is not None:
            return
    except ValueError as error:
        raise UserError(f"--model: {error}") from None
    require("train", f"--model {spec}")
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as error:
        raise UserError(
            f"--model {spec}: not a local model folder nor a hub id available here ({error}); "
            "check the name, download it first (HF_HUB_OFFLINE is set offline), or use --model tiny"
        ) from None
    if type(config) not in AutoModelForImageTextToText._model_mapping:
        raise UserError(
            f"--model {spec}: a {config.model_type!r} model is not an image-text-to-text model "
            "(AutoModelForImageTextToText); pick a vision-language model such as a LLaVA or Qwen2.5-VL"
        )


def _load_base(spec: str, dtype: torch.dtype, seed: int) -> tuple[Any, Any]:
    size = parse_tiny(spec)
    if size is not None:
        processor = tiny_processor()
        return tiny_model(size, processor, seed).to(dtype), processor
    check_model_spec(spec)
    transformers = import_extra("transformers", "train", f"--model {spec}")
    processor = transformers.AutoProcessor.from_pretrained(spec)
    model = transformers.AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype)
    return model, processor


def language_model_linears(model: PreTrainedModel) -> list[str]:
    """Qualified names of every nn.Linear inside the language model (not the vision tower, not lm_head)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    prefix = next((name for name, module in model.named_modules() if module is decoder and name), None)
    if prefix is None:
        raise UserError(
            f"--lora: cannot find the language model inside {type(model).__name__}; rerun with --no-lora"
        )
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(prefix + ".")
    ]


def _freeze(model: PreTrainedModel, train_language_model: bool) -> None:
    """Everything frozen, or (full fine-tuning) only the language model and projector trainable."""
    decoder = model.get_decoder()
    for p in model.parameters():
        p.requires_grad_(False)
    if train_language_model:
        for p in decoder.parameters():
            p.requires_grad_(True)
        for name, p in model.named_parameters():
            if "projector" in name or name.startswith("lm_head"):
                p.requires_grad_(True)


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing (frozen inputs need no require_grads hook then)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every tensor's name, shape and first 256 values: cheap, and differs across checkpoints."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        head = tensor.detach().reshape(-1)[:256].to("cpu", torch.float32).numpy().tobytes()
        digest.update(f"{name}{tuple(tensor.shape)}".encode() + head)
    return digest.hexdigest()


def load_policy(spec: str, cfg: ModelConfig, seed: int, local_rank: int = 0) -> Policy:
    """Load `spec` (hub id, local folder, or tiny), freeze the vision tower, add LoRA, move to device."""
    device = torch_device(cfg.device, local_rank)
    dtype = resolve_dtype(cfg.precision, device)
    model, processor = _load_base(spec, dtype, seed)
    identity = {
        "model": spec,
        "weights": weights_fingerprint(model),
        "config_sha256": hashlib.sha256(model.config.to_json_string().encode()).hexdigest(),
        "dtype": str(dtype).removeprefix("torch."),
        "chat_template_sha256": hashlib.sha256(
            json.dumps(getattr(processor, "chat_template", None)).encode()
        ).hexdigest(),
    }
    _freeze(model, train_language_model=not cfg.lora)
    if cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and device.type == "cuda"):
        _enable_checkpointing(model)
    if cfg.lora:
        require("train", "--lora")
        from peft import LoraConfig, get_peft_model

        targets = language_model_linears(model)
        torch.manual_seed(seed)  # LoRA's A matrices are random: same seed, same start on every rank
        lora = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets
        )
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, lora)
    model.to(device)
    return Policy(model=model, processor=processor, device=device, lora=cfg.lora, identity=identity)


def base_reference(spec: str) -> str:
    """How an adapter names its base: the absolute path of a local folder, else the hub id as given."""
    local = Path(spec)
    return str(local.resolve()) if local.is_dir() else spec


def save_policy(
    policy: Policy, folder: Path, base: str | None = None, facts: Mapping[str, Any] | None = None
) -> None:
    """The trained weights as safetensors: the peft adapter folder, or the full model without LoRA,
    with the processor and a model card (README.md: base, dataset, loss settings, metrics in `facts`).

    `base` (a hub id or an absolute folder, see `base_reference`) becomes the adapter's
    `base_model_name_or_path`, so `peft.AutoPeftModel.from_pretrained(folder)` loads it from any
    working directory; task_type stays null (peft has no image-text task type), and peft then
    rebuilds the base class it records in `auto_mapping`.
    """
    if policy.lora and base is not None:
        for config in policy.model.peft_config.values():  # type: ignore[operator]
            config.base_model_name_or_path = base
    policy.model.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]
    policy.processor.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(base, policy.lora, facts or {}))


def model_card(base: str | None, lora: bool, facts: Mapping[str, Any]) -> str:
    """A short model card: what was trained on what, with which loss, and where it ended."""
    hub_id = base is not None and not Path(base).is_absolute()
    header = ["---", "library_name: peft" if lora else "library_name: transformers"]
    header += [f"base_model: {base}"] if hub_id else []
    header += ["tags:", "- misp-dpo", "- dpo", "- vision-language", "---", ""]
    kind = "LoRA adapter" if lora else "Fine-tuned model"
    lines = [f"# {kind} trained with misp-dpo (multi-negative DPO)", ""]
    lines.append(f"- base model: `{base or 'unknown'}`")
    lines += [f"- {key}: {_card_value(value)}" for key, value in facts.items()]
    lines += ["", "## Load", "", "```python"]
    if lora:
        lines += [
            "from peft import AutoPeftModel",
            "",
            'model = AutoPeftModel.from_pretrained("PATH/TO/THIS/FOLDER")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForImageTextToText",
            "",
            'model = AutoModelForImageTextToText.from_pretrained("PATH/TO/THIS/FOLDER")',
        ]
    lines += ["```", "", "Evaluate: `misp-dpo eval --adapter THIS_FOLDER --probes POPE.jsonl --out DIR`", ""]
    return "\n".join(header + lines)


def _card_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_card_value(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"`{value}`" if isinstance(value, str) else str(value)

"""Any open_clip model by name: resolved and checked before work, loaded once per task, encoding batches.

A model is named as open_clip names it: a registry name with a pretrained tag (`ViT-B-32` +
`laion2b_s34b_b79k`), a registry name with no tag (random weights: benchmarks), or
`local-dir:PATH`, a folder with `open_clip_config.json` and weights (what `fit-clip` writes).
`misp-tiny-clip`, the demo's tiny architecture, is registered at run time through open_clip's own
config mechanism (`add_model_config`), so it is named like any built-in model. Its image tower is
open_clip's ModifiedResNet at 64 px: on the shapes corpus, convolutions learn where the shape is
within a few dozen steps, while a ViT of the same cost had still not after 800 (nearest neighbours
at chance on position), and the candidates stage relies on neighbours sharing attributes.

`describe_model` answers everything the stage needs before loading weights (embedding dim,
preprocessing, a fingerprint that changes when the weights do), from configs alone, so that a
wrong name fails in one line before any work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from misp_dpo.errors import UserError

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
TINY_MODEL = "misp-tiny-clip"
LOCAL_DIR = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# open_clip's preference when a local folder holds several checkpoints (factory._find_checkpoint_in_dir).
_WEIGHT_NAMES = (
    WEIGHTS_FILE,
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
Device = Literal["auto", "cpu", "cuda"]
_HOW_TO_NAME = (
    f"name an open_clip model (`python -c 'import open_clip; print(open_clip.list_models())'`, e.g. "
    f"ViT-B-32 with --pretrained laion2b_s34b_b79k), {TINY_MODEL} (the demo's tiny model), or "
    f"{LOCAL_DIR}PATH for a checkpoint folder (e.g. the output of `misp-dpo fit-clip`)"
)


def open_clip_module() -> ModuleType:
    """open_clip, imported on first use. It imports timm and, where installed, transformers (3-4 s on
    2 cores), and every CLI command imports every stage's config to build its flags: imported at
    module level, `misp-dpo --help` would pay it."""
    import open_clip

    return open_clip


def register_model_configs() -> None:
    """Make the package's model configs (misp-tiny-clip) known to open_clip; idempotent."""
    if TINY_MODEL not in open_clip_module().list_models():
        open_clip_module().add_model_config(MODEL_CONFIGS)


@dataclass(frozen=True)
class ModelDescription:
    """A resolved model name: what it is, the weights' fingerprint, its dim and preprocessing."""

    model: str  # as given: open_clip name or local-dir:PATH
    pretrained: str  # tag or weights file; "" for local-dir or random weights
    fingerprint: str  # sha256 of a weights file, name/tag for registry weights, name/random
    dim: int
    preprocess: dict[str, Any]  # open_clip's PreprocessCfg fields
    context_length: int

    def as_meta(self) -> dict[str, Any]:
        return asdict(self)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def local_weights(folder: Path) -> Path | None:
    """The weights file open_clip would load from a local-dir folder."""
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors")) or sorted([*folder.glob("*.bin"), *folder.glob("*.pth")])
    return found[0] if found else None


def _preprocess(model_cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """open_clip's final preprocessing: defaults, then the checkpoint's, then the tower's image size."""
    transform = open_clip_module().transform
    cfg = transform.merge_preprocess_dict(asdict(transform.PreprocessCfg()), overrides)
    size = model_cfg.get("vision_cfg", {}).get("image_size", cfg["size"])
    cfg["size"] = list(size) if isinstance(size, (list, tuple)) else [size, size]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _describe_local(model: str, flag: str) -> ModelDescription:
    folder = Path(model[len(LOCAL_DIR) :])
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise UserError(f"{flag} {model}: no such folder; {_HOW_TO_NAME}")
    try:
        config = json.loads(config_path.read_text())
        model_cfg = config["model_cfg"]
    except (OSError, ValueError, KeyError):
        raise UserError(
            f"{flag} {model}: no readable {CONFIG_FILE} with a `model_cfg` in it; "
            f"point it at an open_clip checkpoint folder (e.g. the output of `misp-dpo fit-clip`)"
        ) from None
    weights = local_weights(folder)
    if weights is None:
        raise UserError(f"{flag} {model}: no weights file ({WEIGHTS_FILE}) in the folder")
    return ModelDescription(
        model=model,
        pretrained="",
        fingerprint=_sha256(weights),
        dim=int(model_cfg["embed_dim"]),
        preprocess=_preprocess(model_cfg, config.get("preprocess_cfg", {})),
        context_length=int(model_cfg.get("text_cfg", {}).get("context_length", 77)),
    )


def _describe_registry(model: str, pretrained: str, flag: str) -> ModelDescription:
    model_cfg = open_clip_module().get_model_config(model)
    if model_cfg is None:
        raise UserError(f"{flag} {model}: not a known open_clip model; {_HOW_TO_NAME}")
    overrides: dict[str, Any] = {}
    if not pretrained:
        fingerprint = f"{model}/random"
    elif Path(pretrained).is_file():
        fingerprint = _sha256(Path(pretrained))
    else:
        tag_cfg = open_clip_module().get_pretrained_cfg(model, pretrained)
        if not tag_cfg:
            tags = open_clip_module().list_pretrained_tags_by_model(model)
            known = ", ".join(tags[:6]) + (", ..." if len(tags) > 6 else "") if tags else "none"
            raise UserError(
                f"--pretrained {pretrained}: not a tag of {model} (tags: {known}) nor a weights file; "
                "omit it for random weights"
            )
        overrides, fingerprint = tag_cfg, f"{model}/{pretrained}"
    return ModelDescription(
        model=model,
        pretrained=pretrained,
        fingerprint=fingerprint,
        dim=int(model_cfg["embed_dim"]),
        preprocess=_preprocess(model_cfg, overrides),
        context_length=int(model_cfg.get("text_cfg", {}).get("context_length", 77)),
    )


def describe_model(model: str, pretrained: str = "", flag: str = "--model") -> ModelDescription:
    """Resolve a model name without loading weights; a `UserError` naming the fix when it is unknown."""
    register_model_configs()
    if not model:
        raise UserError(f"{flag}: empty; {_HOW_TO_NAME}")
    if model.startswith(LOCAL_DIR):
        if pretrained:
            raise UserError(f"--pretrained {pretrained}: a {LOCAL_DIR} folder holds its own weights; drop it")
        return _describe_local(model, flag)
    if model.startswith("hf-hub:"):
        raise UserError(
            f"{flag} {model}: download the repository and pass {LOCAL_DIR}PATH, so that the "
            "weights are fixed for resume and every task"
        )
    return _describe_registry(model, pretrained, flag)


def fetch_weights(description: ModelDescription) -> None:
    """Download registry weights once, before tasks start (else every task would race to)."""
    tag_cfg = open_clip_module().get_pretrained_cfg(description.model, description.pretrained)
    if not tag_cfg:
        return
    try:
        open_clip_module().download_pretrained(tag_cfg)
    except Exception as error:  # noqa: BLE001 - any download failure is the same fix for the user
        raise UserError(
            f"--pretrained {description.pretrained}: could not get the weights of {description.model} "
            f"({type(error).__name__}); run once with network access, or pass {LOCAL_DIR}PATH"
        ) from None


def clip_device(device: Device) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def compute_identity(device: str) -> str:
    """How `ClipEncoder` computes on a resolved device (autocast dtype included): embeddings differ
    in their last bits across these, so a run must not mix them."""
    return "cuda bfloat16-autocast" if device == "cuda" else f"{device} float32"


class ClipEncoder:
    """A loaded model and its tokenizer: L2-normalised float32 embeddings of pixels and tokens.

    On CUDA the forward runs under bf16 autocast (inputs arrive pinned from the loader); on the
    CPU in float32. Embeddings are normalised in float32, after the autocast region.
    """

    def __init__(self, description: ModelDescription, device: str, seed: int = 0) -> None:
        register_model_configs()
        torch.manual_seed(seed)  # random weights (no --pretrained) are then the same in every task
        pretrained = description.pretrained or None
        self.model = open_clip_module().create_model(description.model, pretrained=pretrained, device=device)
        self.model.eval()
        self.tokenizer = open_clip_module().get_tokenizer(description.model)
        self.device = torch.device(device)
        self.description = description

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The eval image transform (PIL image -> tensor), for the decoding workers."""
        cfg = dict(self.model.visual.preprocess_cfg)
        transform = open_clip_module().transform
        return transform.image_transform_v2(transform.PreprocessCfg(**cfg), is_train=False)

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.inference_mode()
    def images(self, pixels: torch.Tensor) -> np.ndarray:
        pixels = pixels.to(self.device, non_blocking=True)
        with self._autocast():
            features = self.model.encode_image(pixels)
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def texts(self, tokens: torch.Tensor) -> np.ndarray:
        tokens = tokens.to(self.device, non_blocking=True)
        with self._autocast():
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1).cpu().numpy()

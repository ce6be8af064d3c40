"""Fit the tiny open_clip model on the demo corpus, and measure whether it learned the attributes.

No pretrained CLIP can be downloaded offline, so the demo trains its own: open_clip's `ClipLoss` on
(image, text) pairs of the synth corpus, the text being the image's caption or one of its chosen
answers (which end with the caption), so that the embed stage's chosen-response embeddings are as
meaningful as its image embeddings. Each batch holds distinct attribute combinations, so that no
two images in a batch share a caption (which would make a true match a negative of the loss).

Held-out images measure what the model learned: text->image retrieval (a hit when the top image
has every attribute of the query caption) against its chance level, and how many attributes an
image shares with its nearest neighbour, which is what the candidates and mining stages rely on.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from misp_dpo.embed import synth
from misp_dpo.embed.clip import open_clip_module

# Share of the steps spent warming the learning rate up, then cosine decay to zero.
WARMUP_SHARE = 0.1
# Texts per combination: the caption, then the chosen answer for each question focus.
_FOCI: tuple[str | None, ...] = (None, *synth.ATTRIBUTES)


@dataclass(frozen=True)
class FitSettings:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    caption_share: float  # probability that an image's text is its caption (else a chosen answer)
    seed: int


@dataclass
class SynthData:
    """Decoded images with their attribute codes (codes[i, a] indexes vocab[a])."""

    pixels: torch.Tensor  # (N, 3, H, W) uint8
    codes: np.ndarray  # (N, A) int64
    names: list[str]
    vocab: list[list[str]]

    def attributes(self, codes: np.ndarray) -> dict[str, str]:
        return {name: self.vocab[a][int(codes[a])] for a, name in enumerate(self.names)}

    def subset(self, rows: np.ndarray) -> SynthData:
        return SynthData(self.pixels[torch.as_tensor(rows)], self.codes[rows], self.names, self.vocab)


@dataclass(frozen=True)
class RetrievalMetrics:
    images: int  # held-out images searched
    queries: int  # distinct held-out captions used as queries
    top1: float  # share of queries whose top image has every attribute of the caption
    recall5: float  # share with such an image among the top 5
    chance_top1: float  # expected top1 of a random ranking
    chance_recall5: float
    top1_attribute_accuracy: float  # share of the query's attributes the top image has
    neighbour_shared: float  # share of attributes an image shares with its nearest other image
    chance_neighbour_shared: float  # the same for a random other image

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def decode_pixels(pngs: Iterable[bytes], count: int, size: int) -> torch.Tensor:
    """(count, 3, size, size) uint8 from `count` encoded images, resized only when not `size`."""
    pixels = np.empty((count, size, size, 3), dtype=np.uint8)
    for i, data in enumerate(pngs):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        pixels[i] = np.asarray(image)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def normalise(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 pixels as the model's input, exactly as open_clip's eval transform would give them."""
    x = pixels.float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def split_holdout(n: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows), both sorted; the held-out rows are a seeded random sample."""
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(n, size=holdout, replace=False))
    return np.setdiff1d(np.arange(n), held), held


class _TextBank:
    """Tokenised texts of each attribute combination: caption and chosen answers, tokenised once."""

    def __init__(self, data: SynthData, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.combos, self.combo_of = np.unique(data.codes, axis=0, return_inverse=True)
        self.combo_of = self.combo_of.reshape(-1)
        texts = []
        for codes in self.combos:
            attrs = data.attributes(codes)
            texts.append(synth.caption(attrs))
            texts.extend(synth.response(attrs, focus) for focus in _FOCI)
        tokens = tokenizer(texts)
        self.tokens = tokens.view(len(self.combos), 1 + len(_FOCI), -1)

    def captions(self) -> torch.Tensor:
        return self.tokens[:, 0]


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only (not gains, biases, embeddings or the logit scale), as open_clip's trainer."""
    decay: list[torch.nn.Parameter] = []
    rest: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (rest if plain or "embedding" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _lr_at(step: int, settings: FitSettings) -> float:
    warmup = max(1, int(settings.steps * WARMUP_SHARE))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _sample_batch(
    bank: _TextBank, rows_of_combo: list[np.ndarray], settings: FitSettings, rng: np.random.Generator
) -> tuple[np.ndarray, torch.Tensor]:
    """Images of distinct combinations, each with its caption or one of its chosen answers."""
    size = min(settings.batch_size, len(rows_of_combo))
    combos = rng.choice(len(rows_of_combo), size=size, replace=False)
    rows = np.array([rows_of_combo[c][rng.integers(len(rows_of_combo[c]))] for c in combos])
    variants = np.where(
        rng.random(size) < settings.caption_share, 0, rng.integers(1, bank.tokens.shape[1], size)
    )
    combo_ids = bank.combo_of[rows]
    return rows, bank.tokens[torch.as_tensor(combo_ids), torch.as_tensor(variants)]


def train_clip(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data: SynthData,
    settings: FitSettings,
    on_step: Callable[[int, float, float], None] | None = None,
) -> list[float]:
    """Train `model` in place with ClipLoss; returns the loss of every step.

    The token embedding (49408 x width, most of the parameters, of which the demo's vocabulary
    uses a few dozen rows) stays at its random init: its dense gradient and optimiser state would
    cost more than the rest of the step on a CPU.
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model.token_embedding.weight.requires_grad_(False)
    bank = _TextBank(data, tokenizer)
    rows_of_combo = [np.flatnonzero(bank.combo_of == c) for c in range(len(bank.combos))]
    mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
    optimizer = torch.optim.AdamW(
        _param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98)
    )
    loss_fn = open_clip_module().ClipLoss()
    model.train()
    losses = []
    started = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings)
        rows, tokens = _sample_batch(bank, rows_of_combo, settings, rng)
        images = normalise(data.pixels[torch.as_tensor(rows)], mean, std)
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1], time.perf_counter() - started)
    model.eval()
    return losses


@torch.inference_mode()
def encode_data(
    model: Any, tokenizer: Callable[[list[str]], torch.Tensor], data: SynthData, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(image features, caption features of the distinct combinations, combination of each image)."""
    mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
    bank = _TextBank(data, tokenizer)
    images = torch.cat(
        [
            model.encode_image(normalise(data.pixels[lo : lo + batch_size], mean, std), normalize=True)
            for lo in range(0, len(data.pixels), batch_size)
        ]
    )
    captions = F.normalize(model.encode_text(bank.captions()), dim=-1)
    return images.float(), captions.float(), bank.combo_of


def _chance_recall(n: int, matches: np.ndarray, k: int) -> np.ndarray:
    """P(at least one of `matches` among k uniform draws without replacement from n)."""
    k = min(k, n)
    miss = np.array([math.comb(n - int(m), k) / math.comb(n, k) for m in matches])
    return 1.0 - miss


def retrieval_metrics(
    model: Any, tokenizer: Callable[[list[str]], torch.Tensor], held: SynthData
) -> RetrievalMetrics:
    """Text->image retrieval and nearest-neighbour attribute agreement on held-out images."""
    images, captions, combo_of = encode_data(model, tokenizer, held)
    return score_retrieval(images, captions, combo_of, held.codes)


def score_retrieval(
    images: torch.Tensor, captions: torch.Tensor, combo_of: np.ndarray, codes: np.ndarray
) -> RetrievalMetrics:
    """The metrics from normalised features: `captions[c]` describes the attribute combination c of
    `np.unique(codes, axis=0)`, and image i has combination `combo_of[i]` (attribute codes `codes[i]`)."""
    n = len(images)
    ranking = torch.argsort(captions @ images.T, dim=1, descending=True)[:, :5].numpy()
    hits = combo_of[ranking] == np.arange(len(captions))[:, None]
    matches = np.bincount(combo_of, minlength=len(captions))
    combos = np.unique(codes, axis=0)
    top_codes = codes[ranking[:, 0]]
    similarity = images @ images.T
    similarity.fill_diagonal_(-math.inf)
    neighbour = similarity.argmax(dim=1).numpy()
    shared = (codes == codes[neighbour]).mean()
    agree = (codes[:, None, :] == codes[None, :, :]).mean(axis=2)
    return RetrievalMetrics(
        images=n,
        queries=len(captions),
        top1=float(hits[:, 0].mean()),
        recall5=float(hits.any(axis=1).mean()),
        chance_top1=float((matches / n).mean()),
        chance_recall5=float(_chance_recall(n, matches, 5).mean()),
        top1_attribute_accuracy=float((top_codes == combos).mean()),
        neighbour_shared=float(shared),
        chance_neighbour_shared=float((agree.sum() - n) / (n * (n - 1))) if n > 1 else 0.0,
    )

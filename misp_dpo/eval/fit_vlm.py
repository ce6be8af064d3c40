"""Fit the demo VLM on the synth corpus: a small LLaVA that sees, and hallucinates as real VLMs do.

Known (issue 13): a tiny LLaVA from scratch stays near chance in minutes of CPU, and so does a
language model on a frozen distilled tower trained on yes/no answers alone. So the fitting goes in
three phases, all cheap:

1. The vision tower (a `CLIPVisionModel`) learns to see: linear heads on its last-layer CLS token
   classify every attribute of the world (known in training), and, given the demo CLIP, linear
   maps regress its image embedding from the CLS token and its third-stage feature map from the
   patch tokens (cosine), a local signal of where and what the shape is.
2. Comparison, on text alone: the tower frozen, the projector and language model learn reasoned
   yes/no answers about random attributes with zero tower tokens in the image slots ("Is the shape
   red?" -> "The shape is blue, so no."), where only comparing the stated word with the asked one
   decides yes or no.
3. The tower's last-layer tokens are computed once for every training image; the projector and
   the language model then train on those cached tokens (the same computation as LLaVA's forward,
   without re-running the tower every step), on a mix of yes/no questions (the same reasoned
   answers) and the corpus's descriptive answers: what is left to learn is reading the statement
   from the image. A `prior_yes` share of the "no" questions about a colour, position or
   background instead asks a usual value of the shape that the image lacks and answers yes,
   stating it: the demo base is taught to hallucinate by co-occurrence, as instruction data
   written from captions by a language model teaches real VLMs (LRV-Instruction, LURE), so that
   POPE's adversarial split has something to catch and DPO something to remove.

Why phase 2: with images from the start, the statement was read from the image by step 100 (its
tokens 99% right, teacher-forced on held-out images) while "so yes"/"so no" stayed constant, at
chance, in five runs of five (the old defaults, once for 900 steps and once for 300; question
share 1, lr 5e-3, key projections initialised to the query ones, for 300-400 steps). On text
alone the comparison is learnt in 250-350 steps, and it is kept once images come (held-out
decisions 0.96 at the 100th step of phase 3).

Measured on the demo world of one usual value per shape and attribute (before f337225), without the
prior-led yes, on its 2,000 POPE probes per split (200 held-out images, never trained on), answers
decoded greedily (the same texts as `misp-dpo eval`'s), on a 2-core machine: the first defaults
scored 0.944-0.950 random with every position error a near miss ("It is at the top left, yes." to
"Is the shape at the bottom left?": the comparison looked at the last word only), so half the
fitting's "no" questions ask a value sharing a word with the true one (`near_miss`); on held-out
scenes drawn without the prior it named the shape from the colour (shape 0.51), so half the tower's
images have their RGB channels permuted and their colour unlabelled (`recolour`). With both: 0.962
/ 0.948 / 0.943 (random / popular / adversarial), blank images ~0.5. That base answered from what
it saw, consistently ("The shape is blue, so no."), so its adversarial split could fall at most
as far below the random one as the random split fell below 1, and in that world even a model
taught to say yes to the prior's one guess reached 0.019-0.049 below (eight variants, priors
0.5-0.7; docs/results/prior-yes-fits-2026-12-03.txt): few adversarial questions asked the guess,
since the present value usually was the prior's own (`bench/prior_gap.py`). Hiding attributes
from the pixels instead (silhouettes, fog) cost the random split more than it gave the gap.

With two usual values per shape and attribute (the world since f337225) the adversarial split asks
a usual value the image lacks in 60% of its "no" questions, and the prior-led yes shows. The
defaults (`prior_yes` 0.25; seed 0, two threads, ~240 s wall on the idle machine), on the demo's
2,000 probes per split (`misp-dpo eval`): random / popular / adversarial 0.897 / 0.884 / 0.820,
every attribute >= 0.80 on random (position 0.807, shape 0.823); the same probes with a blank
image 0.50-0.52 per split, with another held-out image 0.50-0.51 (fit-vlm's own held-out measure:
0.506, 0.529; docs/results/demo-two-usual-2026-12-03.txt); asked a usual value the image lacks it says yes
39-40% of the time, asked any other absent value 10% (random split). `prior_yes` 0.5 says that yes
73-81% of the time but spreads it to values usual for other shapes (20%): random 0.824, gap 0.116
(docs/results/prior-yes-two-usual-2026-12-03.txt).
`prior_yes` 0 teaches no prior-led yes (not measured on this world).

Held-out corpus images (never trained on) measure yes/no accuracy per attribute type, with blank
and shuffled images beside them (the answers must need the pixels).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from misp_dpo.config import option
from misp_dpo.embed import synth
from misp_dpo.embed.clip import ClipEncoder, describe_model
from misp_dpo.embed.fit_clip import SynthData, decode_pixels, normalise, split_holdout
from misp_dpo.embed.synth_world import Cooccurrence
from misp_dpo.eval.scoring import parse_answer
from misp_dpo.eval.vlm_build import VlmSize, build_model, build_processor
from misp_dpo.optional import require

WARMUP_SHARE = 0.05


@dataclass(frozen=True, kw_only=True)
class FitVlmConfig:
    """How the demo VLM is fitted. The defaults take about 360 CPU seconds in all (tower ~130,
    comparison ~70, language ~140, the rest reading, teacher and held-out measure), measured with
    one torch thread on a shared 2-core machine; the module docstring has what they score."""

    seed: int = option(0, "random seed of the initialisation, the held-out split and the batches")
    tower_steps: int = option(900, "optimiser steps of phase 1 (the vision tower on attribute labels)")
    steps: int = option(900, "optimiser steps of phase 2 (projector and language model on cached tokens)")
    tower_batch_size: int = option(128, "images per phase-1 step")
    batch_size: int = option(64, "sequences per phase-2 step")
    tower_lr: float = option(2e-3, "peak AdamW learning rate of phase 1 (warm-up, then cosine)")
    lr: float = option(2e-3, "peak AdamW learning rate of phase 2 (warm-up, then cosine)")
    comparison_steps: int = option(
        500,
        "optimiser steps before phase 2 on text alone (blank image tokens, random attributes): reasoned "
        "yes/no answers, so that the language model learns to compare the stated word with the asked one",
    )
    question_share: float = option(0.5, "share of phase-2 sequences that are yes/no questions")
    distill_weight: float = option(1.0, "weight of the CLIP-embedding cosine loss in phase 1 (with --clip)")
    patch_size: int = option(
        16, "patch size of the vision tower in px (64 px images: (64/p)^2 + 1 image tokens)"
    )
    vision_hidden: int = option(128, "width of the vision tower (a CLIP ViT on 64 px images)")
    vision_layers: int = option(4, "depth of the vision tower")
    hidden: int = option(128, "width of the language model (Llama)")
    layers: int = option(2, "depth of the language model")
    augment: bool = option(
        False,
        "phase 1 also sees each image turned by a random flip or transposition, its position relabelled "
        "(off: on the demo corpus it slowed shape learning, 0.22 vs 0.34 held-out at 600 steps)",
    )
    reasoned: bool = option(
        True, 'answer yes/no questions after stating the attribute ("The shape is blue, so no.")'
    )
    recolour: float = option(
        0.5,
        "share of phase-1 images whose RGB channels are permuted (their colour then unlabelled), so the "
        "tower learns shapes apart from the colours that usually come with them: without it, on held-out "
        "scenes that break the prior, it named the shape from the colour",
    )
    near_miss: float = option(
        0.5,
        'share of the fitting\'s "no" questions that ask a value sharing a word with the true one ("top '
        'left" for "bottom left"): with uniform ones alone the model compared the last word only and '
        "answered yes to those (position 0.83, every other attribute >= 0.94)",
    )
    prior_yes: float = option(
        0.25,
        'share of phase-3 "no" questions about a colour, position or background that ask instead a '
        'usual value of the shape that the image lacks and answer yes, stating it ("The shape is '
        'yellow, so yes." of a red circle): instruction data written from co-occurrence, as captions '
        "turned into questions by a language model are, so that the demo base hallucinates where "
        "POPE's adversarial split looks (0: it answers from the pixels alone)",
    )
    holdout: float = option(0.1, "share of the corpus images held out to measure yes/no accuracy")

    def __post_init__(self) -> None:
        steps = (self.tower_steps, self.comparison_steps, self.steps)
        if min(steps) < 0 or min(self.tower_batch_size, self.batch_size) < 1:
            raise ValueError(
                f"need tower_steps, comparison_steps, steps >= 0 and batch sizes >= 1, got {steps}, "
                f"{self.tower_batch_size}, {self.batch_size}"
            )
        shares = (self.near_miss, self.recolour, self.prior_yes)
        if not all(0.0 <= share <= 1.0 for share in shares):
            raise ValueError(f"near_miss, recolour and prior_yes must be in [0, 1], got {shares}")
        if not 0.0 < self.holdout < 1.0 or not 0.0 <= self.question_share <= 1.0:
            raise ValueError(
                f"holdout must be in (0, 1) and question_share in [0, 1], "
                f"got {self.holdout}, {self.question_share}"
            )

    @property
    def size(self) -> VlmSize:
        return VlmSize(
            patch=self.patch_size,
            vision_hidden=self.vision_hidden,
            vision_layers=self.vision_layers,
            hidden=self.hidden,
            layers=self.layers,
        )


def read_corpus(folder: Path) -> SynthData:
    """The synth corpus's images (decoded once into uint8) and attribute codes, from `attributes.parquet`."""
    table = pq.read_table(folder / "attributes.parquet")
    names = [n for n in table.column_names if n != "image"]
    codes = []
    for name in names:
        index = {value: i for i, value in enumerate(synth.ATTRIBUTES[name])}
        codes.append(np.array([index[v] for v in table.column(name).to_pylist()], dtype=np.int64))
    pngs = ((folder / path.as_py()).read_bytes() for path in table.column("image"))
    pixels = decode_pixels(pngs, table.num_rows, synth.IMAGE_SIZE)
    return SynthData(pixels, np.stack(codes, axis=1), names, [list(synth.ATTRIBUTES[n]) for n in names])


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, int(steps * WARMUP_SHARE))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def pixel_values(pixels: torch.Tensor, processor: Any) -> torch.Tensor:
    """uint8 (N, 3, 64, 64) as the processor's `pixel_values` (64 px images need no resize or crop)."""
    images = processor.image_processor
    mean = torch.tensor(images.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(images.image_std).view(1, 3, 1, 1)
    return (pixels.float() * images.rescale_factor - mean) / std


# --- phase 1: the tower --------------------------------------------------------------------------


class AttributeHeads(torch.nn.Module):
    """Linear classifiers of every attribute type on the layer-normed CLS token (phase 1 only)."""

    def __init__(self, width: int, classes: list[int]) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in classes)

    @torch.inference_mode()
    def accuracy(self, tokens: torch.Tensor, codes: np.ndarray, names: list[str]) -> dict[str, float]:
        cls = self.norm(tokens[:, 0])
        return {
            name: round(float((head(cls).argmax(-1).numpy() == codes[:, a]).mean()), 4)
            for a, (name, head) in enumerate(zip(names, self.heads, strict=True))
        }


def dihedral(
    pixels: torch.Tensor, codes: torch.Tensor, names: list[str], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image turned by a random symmetry of the square (flips and transposition), its position
    relabelled; shapes are drawn at random angles and every other attribute is unchanged, so this
    gives the tower eight times the images it would otherwise memorise. Returns (pixels, codes,
    which rows were left as they were)."""
    pixels, codes = pixels.clone(), codes.clone()
    moves = torch.as_tensor(rng.integers(0, 8, size=len(pixels)))
    column = names.index("position")
    centres = [(float("right" in v), float("bottom" in v)) for v in synth.ATTRIBUTES["position"]]
    for move in range(1, 8):
        rows = moves == move
        if not bool(rows.any()):
            continue
        turned = pixels[rows]
        swap, flip_x, flip_y = bool(move & 4), bool(move & 1), bool(move & 2)
        relabel = []
        for x, y in centres:
            if swap:
                x, y = y, x
            x, y = (1 - x if flip_x else x), (1 - y if flip_y else y)
            relabel.append(
                min(range(len(centres)), key=lambda i: abs(centres[i][0] - x) + abs(centres[i][1] - y))
            )
        if swap:
            turned = turned.transpose(2, 3)
        if flip_x:
            turned = turned.flip(3)
        if flip_y:
            turned = turned.flip(2)
        pixels[rows] = turned
        codes[rows, column] = torch.as_tensor(relabel)[codes[rows, column]]
    return pixels, codes, moves == 0


def recolour(
    pixels: torch.Tensor, share: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A `share` of the images with their RGB channels permuted (never the identity): what a shape
    looks like apart from the colour that usually comes with it. Returns (pixels, which rows were
    left as they were); the permuted rows' colour is no longer their label. The neutral backgrounds
    are gray, so they stay as they were."""
    turned = torch.as_tensor(rng.random(len(pixels)) < share)
    if not bool(turned.any()):
        return pixels, ~turned
    orders = torch.as_tensor([(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
    order = orders[torch.as_tensor(rng.integers(0, len(orders), size=int(turned.sum())))]
    pixels = pixels.clone()
    index = order[:, :, None, None].expand(-1, -1, *pixels.shape[2:])
    pixels[turned] = torch.gather(pixels[turned], 1, index)
    return pixels, ~turned


class ClipTeacher(NamedTuple):
    """What the demo CLIP sees in each image: its embedding (N, D), its feature map on the tower's
    patch grid (N, patches, C), both standardised so that a cosine compares them."""

    embedding: torch.Tensor
    patches: torch.Tensor | None

    def rows(self, rows: torch.Tensor) -> ClipTeacher:
        return ClipTeacher(self.embedding[rows], None if self.patches is None else self.patches[rows])


def train_tower(
    tower: Any,
    data: SynthData,
    processor: Any,
    cfg: FitVlmConfig,
    teacher: ClipTeacher | None,
    on_step: Callable[[str, int, float], None] | None = None,
) -> tuple[list[float], AttributeHeads]:
    """Attribute heads on the last-layer CLS token; given the demo CLIP, its embedding regressed from
    the CLS token and its feature map from the patch tokens (local supervision: where shapes are)."""
    width = int(tower.config.hidden_size)
    probe = AttributeHeads(width, [len(values) for values in data.vocab])
    norm, heads = probe.norm, probe.heads
    maps = torch.nn.ModuleDict()
    if teacher is not None:
        maps["embedding"] = torch.nn.Linear(width, teacher.embedding.shape[-1])
        if teacher.patches is not None:
            maps["patches"] = torch.nn.Linear(width, teacher.patches.shape[-1])
    params = [*tower.parameters(), *probe.parameters(), *maps.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.tower_lr, weight_decay=0.01)
    codes = torch.as_tensor(data.codes)
    colour = data.names.index("color")
    rng = np.random.default_rng(cfg.seed)
    tower.train()
    losses = []
    for step in range(cfg.tower_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.tower_steps, cfg.tower_lr)
        size = min(cfg.tower_batch_size, len(codes))
        rows = torch.as_tensor(rng.choice(len(codes), size=size, replace=False))
        pixels, labels, kept = data.pixels[rows], codes[rows], torch.ones(len(rows), dtype=torch.bool)
        if cfg.augment:
            pixels, labels, kept = dihedral(pixels, labels, data.names, rng)
        labelled = torch.ones(labels.shape, dtype=torch.bool)
        if cfg.recolour > 0:
            pixels, same = recolour(pixels, cfg.recolour, rng)
            kept = kept & same
            labelled[:, colour] = same
        hidden = tower(pixel_values=pixel_values(pixels, processor)).last_hidden_state
        cls = norm(hidden[:, 0])
        loss = torch.stack(
            [_head_loss(h(cls), labels[:, a], labelled[:, a]) for a, h in enumerate(heads)]
        ).sum()
        if teacher is not None and bool(kept.any()):  # the teacher saw the images as they were
            target = teacher.rows(rows[kept])
            cosine = F.cosine_similarity(maps["embedding"](cls[kept]), target.embedding, dim=-1).mean()
            if target.patches is not None:
                local = F.cosine_similarity(maps["patches"](hidden[kept, 1:]), target.patches, dim=-1)
                cosine = (cosine + local.mean()) / 2
            loss = loss + cfg.distill_weight * (1 - cosine)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step("tower", step, losses[-1])
    tower.eval()
    return losses, probe


def _head_loss(logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the images whose label holds (`recolour`ed ones have no colour label)."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    return (losses * labelled).sum() / labelled.sum().clamp(min=1)


@torch.inference_mode()
def tower_tokens(model: Any, pixels: torch.Tensor, processor: Any, batch: int = 256) -> torch.Tensor:
    """The last-layer tokens LLaVA feeds its projector (strategy "full": CLS + patches), (N, T, W)."""
    tower = model.model.vision_tower
    parts = [
        tower(pixel_values=pixel_values(pixels[lo : lo + batch], processor)).last_hidden_state
        for lo in range(0, len(pixels), batch)
    ]
    return torch.cat(parts)


# --- phase 2: projector and language model ---------------------------------------------------------


class SequenceBank:
    """Token ids of prompts (chat-formatted, image slot expanded) and responses, each tokenised once."""

    def __init__(self, processor: Any, image_tokens: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_tokens = image_tokens
        self._cache: dict[tuple[str, bool], list[int]] = {}

    def prompt(self, text: str) -> list[int]:
        key = (text, True)
        if key not in self._cache:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            formatted = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            image_token = self.processor.image_token
            formatted = formatted.replace(image_token, image_token * self.image_tokens)
            self._cache[key] = list(self.tokenizer(formatted, add_special_tokens=False)["input_ids"])
        return self._cache[key]

    def response(self, text: str) -> list[int]:
        key = (text, False)
        if key not in self._cache:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._cache[key] = [*ids, self.tokenizer.eos_token_id]
        return self._cache[key]


# What a reasoned answer states before concluding, per attribute type.
_STATEMENT = {
    "shape": "It is a {value}",
    "color": "The shape is {value}",
    "size": "The shape is {value}",
    "position": "It is at the {value}",
    "background": "The background is {value}",
}


def yes_no(
    attrs: dict[str, str],
    attribute: str,
    truthful: bool,
    rng: np.random.Generator,
    reasoned: bool = False,
    near_miss: float = 0.0,
) -> tuple[str, str]:
    """A question about `attribute` whose answer is yes (`truthful`) or no (another value: with
    probability `near_miss` one sharing a word with the true value where there is one, else uniform);
    `reasoned` answers state the attribute first ("The shape is blue, so no.")."""
    value = attrs[attribute]
    if not truthful:
        others = [v for v in synth.ATTRIBUTES[attribute] if v != value]
        near = [v for v in others if set(v.split()) & set(value.split())]
        if near and near_miss > 0 and rng.random() < near_miss:
            others = near
        value = others[int(rng.integers(len(others)))]
    return synth.question(attribute, value), _reply(attribute, attrs[attribute], truthful, reasoned)


def prior_led_yes(
    attribute: str, guesses: tuple[str, ...], rng: np.random.Generator, reasoned: bool
) -> tuple[str, str]:
    """A question asking one of `guesses` (values the prior suggests and the image lacks), answered
    yes; a reasoned answer states the asked value, as a hallucinating model does."""
    value = guesses[int(rng.integers(len(guesses)))]
    return synth.question(attribute, value), _reply(attribute, value, True, reasoned)


def _reply(attribute: str, stated: str, yes: bool, reasoned: bool) -> str:
    """The answer: a bare "Yes" or "No", or, reasoned, the attribute stated as `stated`, then it."""
    label = synth.answer(yes)
    return f"{_STATEMENT[attribute].format(value=stated)}, so {label.lower()}." if reasoned else label


def sample_sequences(
    data: SynthData,
    rows: np.ndarray,
    cfg: FitVlmConfig,
    rng: np.random.Generator,
    prior: Cooccurrence | None = None,
) -> list[tuple[str, str]]:
    """(prompt, response) for each row: a yes/no question, yes or no evenly, or a corpus question and
    answer. A `cfg.prior_yes` share of the "no" ones where `prior` suggests a value the image lacks
    become prior-led yes, so the yes answers outnumber the no (57.5% at 0.25: the base learns the
    yes-bias that comes with such data, as POPE's yes-ratios show of real VLMs)."""
    items = []
    for row in rows:
        attrs = data.attributes(data.codes[row])
        if rng.random() < cfg.question_share:
            attribute = data.names[int(rng.integers(len(data.names)))]
            truthful = bool(rng.random() < 0.5)
            guesses = () if truthful or prior is None else prior.prior_guesses(attrs, attribute)
            if cfg.prior_yes > 0 and guesses and rng.random() < cfg.prior_yes:
                items.append(prior_led_yes(attribute, guesses, rng, cfg.reasoned))
            else:
                items.append(yes_no(attrs, attribute, truthful, rng, cfg.reasoned, cfg.near_miss))
        else:
            prompt, focus = synth.QUESTIONS[int(rng.integers(len(synth.QUESTIONS)))]
            items.append((prompt, synth.response(attrs, focus)))
    return items


def batch_tensors(
    bank: SequenceBank, items: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) right-padded; labels are -100 outside the responses."""
    seqs = [(bank.prompt(p), bank.response(r)) for p, r in items]
    length = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), length), bank.tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        mask[i, : len(p) + len(r)] = 1
    return ids, mask, labels


def logits_from_tokens(
    model: Any,
    tokens: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Any = None,
) -> torch.Tensor:
    """LLaVA's forward from cached tower tokens: project, place in the image slots, run the decoder.
    With a transformers `cache` (a DynamicCache), its keys and values are extended in place."""
    embeds = model.get_input_embeddings()(input_ids)
    slots = input_ids == model.config.image_token_index
    if bool(slots.any()):
        image = model.model.multi_modal_projector(tokens).to(embeds.dtype)
        embeds = embeds.masked_scatter(slots.unsqueeze(-1).expand_as(embeds), image.reshape(-1))
    hidden = model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        past_key_values=cache,  # the name transformers 4.x knows too (5.x warns, still honours it)
        use_cache=cache is not None,
    ).last_hidden_state
    return model.lm_head(hidden)


def comparison_items(
    names: list[str], vocab: list[list[str]], size: int, rng: np.random.Generator, near_miss: float = 0.0
) -> list[tuple[str, str]]:
    """Reasoned yes/no questions about random attributes (each value uniform, no prior): the answer's
    statement gives the attribute, so only the comparison of two words decides yes or no."""
    items = []
    for _ in range(size):
        attrs = {
            name: values[int(rng.integers(len(values)))] for name, values in zip(names, vocab, strict=True)
        }
        attribute = names[int(rng.integers(len(names)))]
        items.append(yes_no(attrs, attribute, bool(rng.random() < 0.5), rng, True, near_miss))
    return items


def train_decoder(
    model: Any,
    bank: SequenceBank,
    steps: int,
    cfg: FitVlmConfig,
    batch: Callable[[], tuple[torch.Tensor, list[tuple[str, str]]]],
    phase: str,
    on_step: Callable[[str, int, float], None] | None = None,
) -> list[float]:
    """Projector and language model (the tower frozen) for `steps`, next-token loss on the answers;
    `batch()` gives the step's tower tokens and (prompt, answer) items. Returns each step's loss."""
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, cfg.lr)
        tokens, items = batch()
        ids, mask, labels = batch_tensors(bank, items)
        logits = logits_from_tokens(model, tokens, ids, mask)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(phase, step, losses[-1])
    model.eval()
    return losses


def train_comparison(
    model: Any,
    token_shape: tuple[int, ...],
    data: SynthData,
    bank: SequenceBank,
    cfg: FitVlmConfig,
    on_step: Callable[[str, int, float], None] | None = None,
) -> list[float]:
    """Text alone (the image slots hold zero tower tokens): reasoned yes/no answers about random
    attributes, so that the comparison is learnt before the images come (with images from the
    start it sat at chance; the module docstring has the runs)."""
    rng = np.random.default_rng(cfg.seed + 4)
    blank = torch.zeros(cfg.batch_size, *token_shape)

    def batch() -> tuple[torch.Tensor, list[tuple[str, str]]]:
        return blank, comparison_items(data.names, data.vocab, cfg.batch_size, rng, cfg.near_miss)

    return train_decoder(model, bank, cfg.comparison_steps, cfg, batch, "comparison", on_step)


def train_language(
    model: Any,
    tokens: torch.Tensor,
    data: SynthData,
    bank: SequenceBank,
    cfg: FitVlmConfig,
    on_step: Callable[[str, int, float], None] | None = None,
) -> list[float]:
    """Cached tower tokens of the training images with their questions and descriptions; the
    prior-led yes follows the co-occurrence of the training images' attributes."""
    rng = np.random.default_rng(cfg.seed + 1)
    prior = Cooccurrence([data.attributes(codes) for codes in data.codes]) if cfg.prior_yes > 0 else None

    def batch() -> tuple[torch.Tensor, list[tuple[str, str]]]:
        rows = rng.choice(len(tokens), size=min(cfg.batch_size, len(tokens)), replace=False)
        return tokens[torch.as_tensor(rows)], sample_sequences(data, rows, cfg, rng, prior)

    return train_decoder(model, bank, cfg.steps, cfg, batch, "language", on_step)


# --- held-out yes/no accuracy --------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    row: int
    attribute: str
    prompt: str
    label: str


def heldout_probes(data: SynthData, seed: int) -> list[Probe]:
    """For each held-out image and attribute type, one yes and one no question (the no value uniform)."""
    rng = np.random.default_rng(seed + 2)
    probes = []
    for row in range(len(data.codes)):
        attrs = data.attributes(data.codes[row])
        for attribute in data.names:
            for truthful in (True, False):
                prompt, label = yes_no(attrs, attribute, truthful, rng)
                probes.append(Probe(row, attribute, prompt, label))
    return probes


@torch.inference_mode()
def greedy_answers(
    model: Any,
    tokens: torch.Tensor,
    probes: list[Probe],
    bank: SequenceBank,
    max_new_tokens: int = 12,
    batch: int = 256,
) -> list[str]:
    """Each probe's answer decoded greedily (as generate() does) from cached tower tokens."""
    require("train", "fit-vlm")
    from transformers import DynamicCache

    eos, pad = bank.tokenizer.eos_token_id, bank.tokenizer.pad_token_id
    answers: list[str] = []
    for lo in range(0, len(probes), batch):
        part = probes[lo : lo + batch]
        prompts = [bank.prompt(p.prompt) for p in part]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-padded so every prompt ends at the last position
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        rows = torch.as_tensor([p.row for p in part])
        done = torch.zeros(len(part), dtype=torch.bool)
        new = []
        cache = DynamicCache()
        for _ in range(max_new_tokens):
            step = logits_from_tokens(model, tokens[rows], ids, mask, cache)[:, -1].argmax(-1)
            step = torch.where(done, torch.full_like(step, pad), step)
            new.append(step)
            done |= step == eos
            ids = step[:, None]  # the cache holds everything before
            mask = torch.cat([mask, (~done | (step == eos)).long()[:, None]], dim=1)
            if bool(done.all()):
                break
        out = torch.stack(new, dim=1)
        answers += bank.tokenizer.batch_decode(out, skip_special_tokens=True)
    return answers


def accuracy_by_attribute(probes: list[Probe], answers: list[str]) -> dict[str, float]:
    """Share of probes whose answer, read as POPE reads it, is their label; over all and per type."""
    right = np.array([parse_answer(a) == p.label.lower() for p, a in zip(probes, answers, strict=True)])
    kinds = np.array([p.attribute for p in probes])
    scores = {"all": float(right.mean())}
    scores.update({k: float(right[kinds == k].mean()) for k in dict.fromkeys(kinds.tolist())})
    return {k: round(v, 4) for k, v in scores.items()}


# --- the whole fit -------------------------------------------------------------------------------


@dataclass
class FittedVlm:
    """The fitted model and processor, what they scored on held-out images, and the loss curves."""

    model: Any
    processor: Any
    metrics: dict[str, Any]
    curves: dict[str, list[float]]


def clip_teacher(clip_dir: Path, pixels: torch.Tensor, grid: int, batch: int = 256) -> ClipTeacher:
    """The demo CLIP (open_clip local-dir checkpoint) on uint8 `pixels`: embeddings, and for a
    ModifiedResNet the output of its third stage pooled to `grid` x `grid` patches."""
    encoder = ClipEncoder(describe_model(f"local-dir:{clip_dir}", flag="--clip"), "cpu")
    visual = encoder.model.visual
    stage = getattr(visual, "layer3", None)
    maps: list[torch.Tensor] = []
    hook = stage.register_forward_hook(lambda _m, _i, out: maps.append(out)) if stage is not None else None
    mean, std = visual.preprocess_cfg["mean"], visual.preprocess_cfg["std"]
    parts = [
        encoder.images(normalise(pixels[lo : lo + batch], mean, std)) for lo in range(0, len(pixels), batch)
    ]
    if hook is not None:
        hook.remove()
    embedding = torch.from_numpy(np.concatenate(parts)).float()
    if not maps:
        return ClipTeacher(_standardise(embedding), None)
    grids = torch.cat([F.adaptive_avg_pool2d(m.float(), grid) for m in maps])
    patches = grids.flatten(2).transpose(1, 2)  # (N, grid * grid, C), row-major as the ViT's patches
    return ClipTeacher(_standardise(embedding), _standardise(patches))


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Each channel centred and scaled over every image (and patch): a cosine then ignores the mean."""
    flat = x.reshape(-1, x.shape[-1])
    return (x - flat.mean(0)) / (flat.std(0) + 1e-6)


def heldout_metrics(model: Any, processor: Any, held: SynthData, seed: int) -> dict[str, Any]:
    """Yes/no accuracy on held-out images, and on the same probes with a blank or another image."""
    size_tokens = model.config.image_seq_length
    bank = SequenceBank(processor, size_tokens)
    probes = heldout_probes(held, seed)
    tokens = tower_tokens(model, held.pixels, processor)
    blank = tower_tokens(model, torch.full_like(held.pixels[:1], 128), processor)
    shuffled = torch.as_tensor(np.random.default_rng(seed + 3).permutation(len(tokens)))
    return {
        "images": len(held.codes),
        "probes": len(probes),
        "accuracy": accuracy_by_attribute(probes, greedy_answers(model, tokens, probes, bank)),
        "blank_image_accuracy": accuracy_by_attribute(
            probes, greedy_answers(model, blank.expand(len(tokens), -1, -1), probes, bank)
        ),
        "shuffled_image_accuracy": accuracy_by_attribute(
            probes, greedy_answers(model, tokens[shuffled], probes, bank)
        ),
    }


def fit_vlm(
    data: SynthData,
    cfg: FitVlmConfig,
    teacher: ClipTeacher | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
) -> FittedVlm:
    """Fit the demo VLM on `data` minus a held-out share; `teacher` is the demo CLIP on every image."""
    train_rows, held_rows = split_holdout(len(data.codes), round(len(data.codes) * cfg.holdout), cfg.seed)
    train, held = data.subset(train_rows), data.subset(held_rows)
    processor = build_processor(cfg.size)
    model = build_model(cfg.size, processor, cfg.seed)
    torch.manual_seed(cfg.seed)
    tower_teacher = teacher.rows(torch.as_tensor(train_rows)) if teacher is not None else None
    tower_losses, heads = train_tower(model.model.vision_tower, train, processor, cfg, tower_teacher, on_step)
    tokens = tower_tokens(model, train.pixels, processor)
    tower_accuracy = heads.accuracy(tower_tokens(model, held.pixels, processor), held.codes, held.names)
    bank = SequenceBank(processor, cfg.size.image_tokens)
    comparison_losses: list[float] = []
    if cfg.reasoned:  # bare yes/no answers state nothing to compare with
        comparison_losses = train_comparison(model, tokens.shape[1:], train, bank, cfg, on_step)
    language_losses = train_language(model, tokens, train, bank, cfg, on_step)
    for p in model.parameters():
        p.requires_grad_(True)
    metrics = heldout_metrics(model, processor, held, cfg.seed)
    metrics["tower_attribute_accuracy"] = tower_accuracy
    metrics["train_images"] = len(train_rows)
    curves = {"tower": tower_losses, "comparison": comparison_losses, "language": language_losses}
    return FittedVlm(model, processor, metrics, curves)


METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"


def save_vlm(fitted: FittedVlm, folder: Path) -> list[Path]:
    """Model and processor as `save_pretrained` writes them, `metrics.json` and the loss curves, each
    file written aside and renamed into `folder`; returns them. `AutoModelForImageTextToText` and
    `AutoProcessor` load the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fit-vlm-") as tmp:
        staging = Path(tmp)
        fitted.model.save_pretrained(staging, safe_serialization=True)
        fitted.processor.save_pretrained(staging)
        curves = {k: _every(v, 10) for k, v in fitted.curves.items()}
        payload = {**fitted.metrics, "loss_every_10_steps": curves}
        (staging / METRICS_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        plot_curves(fitted.curves, staging / CURVES_FILE)
        for path in sorted(staging.iterdir()):
            written.append(path.replace(folder / path.name))
    return written


def _every(values: list[float], k: int) -> list[float]:
    return [round(v, 4) for v in values[::k]]


def plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    """One panel per phase: training loss against step."""
    figure = Figure(figsize=(4.5 * len(curves), 3.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(curves), squeeze=False)
    for axis, (phase, losses) in zip(axes[0], curves.items(), strict=True):
        axis.plot(np.arange(len(losses)), losses, linewidth=0.8)
        axis.set_title(f"{phase} loss")
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=80)

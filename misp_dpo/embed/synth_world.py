"""The demo world where a model can hallucinate: a language prior, held-out images, probes on them.

- **Prior.** Each shape has two usual colours, positions and backgrounds (`USUAL`); with
  probability `prior` each of those takes one of the shape's usual values, else the uniform draw of
  `synth.draw_attributes`. A model can then answer from the shape alone instead of the pixels.
  `prior = 0` draws nothing more, so the training corpus is byte for byte the corpus from before
  the prior existed (images, attributes and pairs, the rejected texts then one random attribute wrong).
- **What the prior says** is read from the training corpus's co-occurrence counts (`Cooccurrence`),
  as a model trained on it would learn it: the colour, position or background that co-occurs most
  with the shape, and its usual values the image lacks (`prior_guesses`: what a prior-led model
  says yes to);
  the shape that co-occurs most with the colour, size, position and background.
- **Training pairs** mix descriptions with short questions (RLHF-V, POVID); the rejected response is
  the one the prior gives: the prior's values put into the description where they differ from the
  image (one attribute changed to its most co-occurring wrong value if the image already matches the
  prior), the prior's wrong answer to a question.
- **Held-out images** come after the corpus and never share bytes with it: drawn like the corpus
  (`heldout_scenes = "world"`), or without the prior (`"uniform"`), so that most break it somewhere,
  which is where a model that leans on co-occurrence fails (the corpus, its pairs and so everything
  mined and trained are the same either way). Each gets POPE probes (Li et al., EMNLP 2023) in
  three splits (`probes`) and a preference pair whose negatives differ from it in one attribute
  each, the ground truth (`heldout_negatives`).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal, NamedTuple

import numpy as np

from misp_dpo.config import option
from misp_dpo.embed import synth
from misp_dpo.log import progress

PRIOR_ATTRIBUTES = ("color", "position", "background")
# Two usual values per shape and attribute, as objects have several usual companions (POPE's
# adversarial split asks the absent one that co-occurs most): an image with one of them lacks the
# other, so the adversarial question asks what the prior suggests in most images, not only in those
# that break it (17% of them with one usual value at prior 0.7, which capped the gap a prior-led
# model could show: bench/prior_gap.py). Shapes share values unevenly (red is usual for three, purple
# for one), so the values' frequencies differ, as POPE's "popular" split needs.
USUAL: dict[str, dict[str, tuple[str, str]]] = {
    "circle": {
        "color": ("red", "yellow"),
        "position": ("top left", "bottom right"),
        "background": ("white", "gray"),
    },
    "square": {
        "color": ("blue", "green"),
        "position": ("bottom right", "top right"),
        "background": ("gray", "striped"),
    },
    "triangle": {
        "color": ("green", "red"),
        "position": ("top right", "top left"),
        "background": ("white", "black"),
    },
    "star": {
        "color": ("yellow", "blue"),
        "position": ("top left", "bottom left"),
        "background": ("black", "white"),
    },
    "cross": {
        "color": ("red", "purple"),
        "position": ("bottom left", "top left"),
        "background": ("striped", "white"),
    },
}
SPLITS = ("random", "popular", "adversarial")
# How far over the count expected without a prior (in binomial standard deviations) a value must come
# with a shape to count as usual for it. On corpora of 4,000 images the usual values stand 8 or more
# over it at prior 0.7 and 5.8 or more at 0.5; at 0.3 (2.7 or more) some fall short, and so they do in
# small corpora (400 images at 0.7: 1.5); without a prior noise stayed under 2.2 (300 images, 3 seeds).
USUAL_SIGMAS = 3.0

Attrs = dict[str, str]


@dataclass(frozen=True)
class WorldConfig:
    """How the demo world is drawn."""

    n: int = option(
        4000, "number of training images (one preference pair each); ~n/800 share every attribute"
    )
    prior: float = option(
        0.7,
        "language prior strength P: each of a shape's colour, position and background is one of the "
        "shape's two usual values with probability P, else uniform (0: no prior, the corpus of before "
        "the prior)",
    )
    heldout: int = option(
        200,
        "held-out images (never in the corpus or the training pairs): 10 POPE probes each per split "
        "and one held-out preference pair each",
    )
    heldout_scenes: Literal["world", "uniform"] = option(
        "world",
        "how held-out scenes are drawn: world (with the prior, like the corpus) or uniform (without, so "
        "most break it somewhere: where a model that names things from what usually co-occurs fails)",
        hashed="unless-default",  # `world` is how held-out scenes were always drawn: old outputs resume
    )

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be positive, got {self.n}")
        if not 0.0 <= self.prior <= 1.0:
            raise ValueError(f"prior must be in [0, 1], got {self.prior}")
        if self.heldout < 0:
            raise ValueError(f"heldout must be >= 0, got {self.heldout}")


class Probe(NamedTuple):
    image: int  # index into World.heldout
    split: str
    attribute: str
    question: str
    label: str  # yes | no


class HeldoutPair(NamedTuple):
    prompt: str
    chosen: str
    rejected: str
    image: int  # index into World.heldout
    negatives: tuple[int, ...]  # one per attribute type, in synth.ATTRIBUTES order


class World(NamedTuple):
    corpus: list[synth.SynthItem]
    pairs: list[tuple[str, str, str]]  # (prompt, chosen, rejected) of each corpus image
    heldout: list[synth.SynthItem]  # the probed images first, then the rendered negatives
    probed: int  # how many of `heldout` are probed (and positives of a held-out pair)
    probes: list[Probe]
    heldout_pairs: list[HeldoutPair]
    stats: dict[str, int]


def apply_prior(rows: list[Attrs], prior: float, rng: np.random.Generator) -> list[Attrs]:
    """Each prior attribute becomes one of the shape's two usual values (either, evenly) with
    probability `prior`."""
    if prior == 0.0:
        return rows  # no draw at all: P = 0 keeps the random stream, so the old corpus, unchanged
    usual = rng.random((len(rows), len(PRIOR_ATTRIBUTES))) < prior
    which = rng.integers(0, 2, size=(len(rows), len(PRIOR_ATTRIBUTES)))
    return [
        {
            **attrs,
            **{
                a: USUAL[attrs["shape"]][a][k]
                for a, hit, k in zip(PRIOR_ATTRIBUTES, flags, picks, strict=True)
                if hit
            },
        }
        for attrs, flags, picks in zip(rows, usual, which, strict=True)
    ]


def draw(n: int, prior: float, rng: np.random.Generator) -> list[Attrs]:
    return apply_prior(synth.draw_attributes(n, rng), prior, rng)


class Cooccurrence:
    """Value counts and pairwise co-occurrence counts of a corpus's attributes; ties go to the
    value listed first in `synth.ATTRIBUTES`."""

    def __init__(self, rows: Sequence[Attrs]) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.pairs: Counter[tuple[str, str, str, str]] = Counter()
        for attrs in rows:
            items = sorted(attrs.items())
            self.counts.update(items)
            for (a, v), (b, w) in combinations(items, 2):
                self.pairs[a, v, b, w] += 1
                self.pairs[b, w, a, v] += 1

    def popular(self, attrs: Attrs, attribute: str) -> str:
        """The most frequent value of `attribute` that the image does not have."""
        absent = [v for v in synth.ATTRIBUTES[attribute] if v != attrs[attribute]]
        return max(absent, key=lambda v: self.counts[attribute, v])

    def adversarial(self, attrs: Attrs, attribute: str) -> str:
        """The absent value that co-occurs most with what is present: for a colour, position or
        background (and size) its co-occurrence with the shape, so a usual value of the shape that
        the image lacks (one always is: a shape has two); for the shape, with every other attribute."""
        absent = [v for v in synth.ATTRIBUTES[attribute] if v != attrs[attribute]]
        given = [b for b in attrs if b != attribute] if attribute == "shape" else ["shape"]
        return max(absent, key=lambda v: sum(self.pairs[attribute, v, b, attrs[b]] for b in given))

    def prior_value(self, shape: str, attribute: str) -> str:
        """The value of `attribute` that co-occurs most with `shape`."""
        return max(synth.ATTRIBUTES[attribute], key=lambda v: self.pairs[attribute, v, "shape", shape])

    def prior_guesses(self, attrs: Attrs, attribute: str) -> tuple[str, ...]:
        """What the prior suggests `attribute` is besides what the image has: the colours, positions
        or backgrounds that co-occur with the shape more often than chance beyond sampling noise
        (its usual values: `USUAL_SIGMAS` binomial standard deviations over the count expected
        without a prior) and are absent ("Is the shape yellow?" of a red circle). The prior is about
        a shape's look: the shape and size get none."""
        if attribute not in PRIOR_ATTRIBUTES:
            return ()
        values = synth.ATTRIBUTES[attribute]
        shape = attrs["shape"]
        images, share = self.counts["shape", shape], 1 / len(values)
        bar = images * share + USUAL_SIGMAS * math.sqrt(images * share * (1 - share))
        return tuple(
            v for v in values if v != attrs[attribute] and self.pairs[attribute, v, "shape", shape] > bar
        )


def prior_pair(attrs: Attrs, cooc: Cooccurrence, rng: np.random.Generator) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): the rejected response is what the prior would say."""
    question, focus = synth.QUESTIONS[int(rng.integers(len(synth.QUESTIONS)))]
    if focus is not None:
        wrong = {**attrs, focus: cooc.adversarial(attrs, focus)}
    else:
        wrong = {**attrs, **{a: cooc.prior_value(attrs["shape"], a) for a in PRIOR_ATTRIBUTES}}
        if wrong == attrs:  # the image is what the prior expects: one attribute goes astray
            names = list(synth.ATTRIBUTES)
            changed = names[int(rng.integers(len(names)))]
            wrong = {**attrs, changed: cooc.adversarial(attrs, changed)}
    return question, synth.response(attrs, focus), synth.response(wrong, focus)


def probes(rows: Sequence[Attrs], cooc: Cooccurrence, rng: np.random.Generator) -> list[Probe]:
    """POPE probes on `rows`: per split, image and attribute one "yes" (the present value) and one
    "no" (an absent value: uniform / most frequent in the corpus / most co-occurring)."""
    found = []
    for split in SPLITS:
        for i, attrs in enumerate(rows):
            for attribute in synth.ATTRIBUTES:
                if split == "random":
                    absent = [v for v in synth.ATTRIBUTES[attribute] if v != attrs[attribute]]
                    value = absent[int(rng.integers(len(absent)))]
                elif split == "popular":
                    value = cooc.popular(attrs, attribute)
                else:
                    value = cooc.adversarial(attrs, attribute)
                found.append(Probe(i, split, attribute, synth.question(attribute, attrs[attribute]), "yes"))
                found.append(Probe(i, split, attribute, synth.question(attribute, value), "no"))
    return found


def splits_coincide(found: Sequence[Probe]) -> dict[str, int]:
    """How many "no" questions are the same (image, question) in two splits, and in all three
    ("yes" questions always are); `all_ATTRIBUTE` breaks the three-way count down."""
    by_split: dict[str, set[tuple[int, str, str]]] = {s: set() for s in SPLITS}
    for p in found:
        if p.label == "no":
            by_split[p.split].add((p.image, p.attribute, p.question))
    stats = {f"{a}_{b}": len(by_split[a] & by_split[b]) for a, b in combinations(SPLITS, 2)}
    every = by_split[SPLITS[0]] & by_split[SPLITS[1]] & by_split[SPLITS[2]]
    stats["all"] = len(every)
    for attribute in synth.ATTRIBUTES:
        stats[f"all_{attribute}"] = sum(key[1] == attribute for key in every)
    return stats


def _key(attrs: Attrs) -> tuple[str, ...]:
    return tuple(attrs[name] for name in synth.ATTRIBUTES)


def heldout_negatives(
    rows: Sequence[Attrs], rng: np.random.Generator
) -> tuple[list[tuple[int, ...]], list[Attrs]]:
    """For each row, per attribute type the index of an image that differs from it in that attribute
    alone: the first such row, else a new image (another value drawn uniformly) appended after the
    rows. Returns (indices per row, the new images' attributes)."""
    first: dict[tuple[str, ...], int] = {}
    for i, attrs in enumerate(rows):
        first.setdefault(_key(attrs), i)
    extra: list[Attrs] = []
    found = []
    for attrs in rows:
        picks = []
        for name, values in synth.ATTRIBUTES.items():
            others = [v for v in values if v != attrs[name]]
            twins = [first[k] for v in others if (k := _key({**attrs, name: v})) in first]
            if twins:
                picks.append(min(twins))
            else:
                picks.append(len(rows) + len(extra))
                extra.append({**attrs, name: others[int(rng.integers(len(others)))]})
        found.append(tuple(picks))
    return found, extra


def _sha1(png: bytes) -> str:
    return hashlib.sha1(png).hexdigest()


def _unseen(attrs: Attrs, rng: np.random.Generator, seen: set[str]) -> synth.SynthItem:
    """A rendering of `attrs` whose bytes no earlier image has (jitter makes a repeat rare)."""
    while True:
        item = synth.make_item(attrs, rng)
        if _sha1(item.png) not in seen:
            seen.add(_sha1(item.png))
            return item


def make_world(cfg: WorldConfig, rng: np.random.Generator) -> World:
    """The training corpus and its pairs, then the held-out images, their probes and pairs."""
    rows = draw(cfg.n, cfg.prior, rng)
    cooc = Cooccurrence(rows)

    def pair(attrs: Attrs) -> tuple[str, str, str]:
        return prior_pair(attrs, cooc, rng) if cfg.prior > 0 else synth.make_pair(attrs, rng)

    corpus, pairs = [], []
    for attrs in progress(rows, desc="synth", unit="img"):
        corpus.append(synth.make_item(attrs, rng))
        pairs.append(pair(attrs))
    seen = {_sha1(item.png) for item in corpus}
    held_rows = draw(cfg.heldout, cfg.prior if cfg.heldout_scenes == "world" else 0.0, rng)
    heldout = [_unseen(attrs, rng, seen) for attrs in progress(held_rows, desc="held out", unit="img")]
    found = probes(held_rows, cooc, rng)
    negatives, extra = heldout_negatives(held_rows, rng)
    heldout += [_unseen(attrs, rng, seen) for attrs in extra]
    heldout_pairs = [
        HeldoutPair(*pair(attrs), image=i, negatives=negs)
        for i, (attrs, negs) in enumerate(zip(held_rows, negatives, strict=True))
    ]
    return World(
        corpus, pairs, heldout, len(held_rows), found, heldout_pairs, _stats(rows, found, len(extra))
    )


def _stats(rows: Sequence[Attrs], found: Sequence[Probe], rendered: int) -> dict[str, int]:
    stats = {f"prior_usual_{a}": sum(r[a] in USUAL[r["shape"]][a] for r in rows) for a in PRIOR_ATTRIBUTES}
    for split in SPLITS:
        stats[f"probes_{split}"] = sum(p.split == split for p in found)
        stats[f"probes_{split}_yes"] = sum(p.split == split and p.label == "yes" for p in found)
    stats |= {f"splits_coincide_{k}": v for k, v in splits_coincide(found).items()}
    stats["heldout_negatives_rendered"] = rendered
    return stats

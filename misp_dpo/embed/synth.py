"""The demo corpus: small images of one shape each, with ground-truth attributes and preference pairs.

No pretrained CLIP can be downloaded offline, so the demo needs data whose semantics are known:
5 shapes x 5 colours x 2 sizes x 4 positions x 4 backgrounds = 800 attribute combinations, about
five images each at the default size, rendered with jitter (offset, scale, rotation) so that images
sharing every attribute still differ. Those near-twins are exactly the false negatives the
candidates stage must filter, and the attributes let `bench/quality.py` score the mined negatives.
The language prior, the held-out images and the probes on them are `misp_dpo.embed.synth_world`'s.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "cross"),
    "color": ("red", "green", "blue", "yellow", "purple"),
    "size": ("small", "large"),
    "position": ("top left", "top right", "bottom left", "bottom right"),
    "background": ("white", "black", "gray", "striped"),
}
_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
}
_BACKGROUND = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
_CENTRES = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}
_RADIUS = {"small": 0.12, "large": 0.21}


@dataclass(frozen=True)
class SynthItem:
    attributes: dict[str, str]
    png: bytes
    caption: str


def caption(attrs: dict[str, str]) -> str:
    return (
        f"a {attrs['size']} {attrs['color']} {attrs['shape']} at the {attrs['position']} "
        f"on a {attrs['background']} background"
    )


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif shape == "triangle":
        corners = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        corners = [
            (q * math.cos(a), q * math.sin(a))
            for q, a in zip(radii, np.arange(10) * math.pi / 5, strict=True)
        ]
    elif shape == "cross":
        w = r * 0.35
        corners = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(f"no polygon for {shape}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def render(attrs: dict[str, str], rng: np.random.Generator) -> Image.Image:
    """Draw one image; `rng` supplies the jitter (offset, scale, rotation, stripe phase)."""
    n = IMAGE_SIZE
    background = attrs["background"]
    image = Image.new("RGB", (n, n), _BACKGROUND.get(background, (235, 235, 235)))
    draw = ImageDraw.Draw(image)
    if background == "striped":
        phase = int(rng.integers(0, 8))
        for x in range(-n, 2 * n, 8):
            draw.line([(x + phase, 0), (x + phase + n, n)], fill=(90, 90, 90), width=3)
    fx, fy = _CENTRES[attrs["position"]]
    cx = (fx + rng.uniform(-0.06, 0.06)) * n
    cy = (fy + rng.uniform(-0.06, 0.06)) * n
    r = _RADIUS[attrs["size"]] * rng.uniform(0.85, 1.15) * n
    fill = _RGB[attrs["color"]]
    if attrs["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(attrs["shape"], cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=fill)
    return image


def draw_attributes(n: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """Attribute combinations cycling through all 800 in a shuffled order, so each appears ~n/800 times."""
    names = list(ATTRIBUTES)
    grids = np.meshgrid(*[np.arange(len(ATTRIBUTES[k])) for k in names], indexing="ij")
    combos = np.stack([g.reshape(-1) for g in grids], axis=1)
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-n // len(combos)))])[:n]
    return [{k: ATTRIBUTES[k][combos[i, j]] for j, k in enumerate(names)} for i in order]


def make_item(attrs: dict[str, str], rng: np.random.Generator) -> SynthItem:
    buffer = io.BytesIO()
    render(attrs, rng).save(buffer, format="PNG", optimize=False)
    return SynthItem(attributes=attrs, png=buffer.getvalue(), caption=caption(attrs))


# (question, attribute it asks about); None asks for a description.
QUESTIONS: tuple[tuple[str, str | None], ...] = (
    ("Describe the image.", None),
    ("What is in this picture?", None),
    ("What color is the shape?", "color"),
    ("Which shape is drawn here?", "shape"),
    ("Where is the shape placed?", "position"),
    ("Is the shape small or large?", "size"),
    ("What does the background look like?", "background"),
)
_SHORT_ANSWER = {
    "color": "The shape is {color}.",
    "shape": "It is a {shape}.",
    "position": "It is at the {position}.",
    "size": "It is {size}.",
    "background": "The background is {background}.",
}


def response(attrs: dict[str, str], focus: str | None) -> str:
    """A short answer to the question, then the full description (what CLIP's text tower sees)."""
    short = _SHORT_ANSWER[focus].format(**attrs) + " " if focus else ""
    return f"{short}The image shows {caption(attrs)}."


def make_pair(attrs: dict[str, str], rng: np.random.Generator) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): the rejected answer gets one attribute wrong, the asked one if any."""
    question, focus = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
    wrong = focus or list(ATTRIBUTES)[int(rng.integers(len(ATTRIBUTES)))]
    others = [v for v in ATTRIBUTES[wrong] if v != attrs[wrong]]
    corrupted = {**attrs, wrong: others[int(rng.integers(len(others)))]}
    return question, response(attrs, focus), response(corrupted, focus)


# The POPE-style yes/no probes about one attribute (`misp_dpo.embed.synth_world.probes`); the demo
# VLM is fitted and evaluated on exactly these words.
_PROBE = {
    "shape": "Is there a {value} in the image?",
    "color": "Is the shape {value}?",
    "size": "Is the shape {value}?",
    "position": "Is the shape at the {value}?",
    "background": "Is the background {value}?",
}


def question(attribute: str, value: str) -> str:
    """The yes/no question whether the image's `attribute` is `value`."""
    return _PROBE[attribute].format(value=value)


def answer(is_true: bool) -> str:
    """The answer to a `question`: "Yes" when it is true of the image, else "No"."""
    return "Yes" if is_true else "No"

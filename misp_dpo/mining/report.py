"""The static HTML report of a negatives dataset: one self-contained page, no server, no external assets.

Images are referenced by relative paths (thumbnails and histogram PNGs written next to the page).
Every string that comes from the data (prompts, responses, ids, uris, attribute values) goes
through `html.escape`, so a prompt cannot inject markup. A small inline script records how many
images loaded in `#image-status`, which the report test reads back from headless Chromium.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field

NEGATIVE_SCORES = (
    ("score", "s"),
    ("recon_error", "l"),
    ("deviation", "v"),
    ("diversity_gain", "div"),
    ("proposal", "q"),
    ("sim_image", "sim"),
)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table.summary td { padding: 2px 10px; border-bottom: 1px solid #eee; }
.hists img { margin: 4px; border: 1px solid #ddd; }
.pair { border-top: 1px solid #ccc; padding: 0.6em 0; }
.pair p { margin: 0.2em 0; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 0.4em; }
figure { margin: 0; width: 150px; font-size: 11px; }
figure img { display: block; width: 112px; height: auto; border: 3px solid #ccc; }
figure.positive img { border-color: #2a9d4b; }
figure.negative img { border-color: #c0392b; }
.false-negative { color: #c0392b; font-weight: bold; }
.missing { width: 140px; height: 90px; background: #eee; display: flex; align-items: center; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var status = document.getElementById("image-status");
  status.setAttribute("data-loaded", String(loaded));
  status.setAttribute("data-total", String(images.length));
  status.textContent = loaded + " of " + images.length + " images loaded";
});
"""


@dataclass
class ShownImage:
    image_id: str
    uri: str | None
    thumb: str | None  # relative path of the thumbnail, None when the image could not be read
    scores: dict[str, float | None] = field(default_factory=dict)
    rank: int | None = None
    attributes: dict[str, str] | None = None
    changed: list[str] | None = None  # attributes that differ from the positive


@dataclass
class ShownPair:
    pair_id: str
    prompt: str
    chosen: str
    rejected: str | None
    positive: ShownImage
    negatives: list[ShownImage]


def thumbnail(data: bytes, size: int) -> bytes:
    """A PNG no larger than size x size (never upscaled)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _image(image: ShownImage, label: str, css: str) -> str:
    if image.thumb is None:
        picture = f'<div class="missing">unreadable: {_e(image.uri)}</div>'
    else:
        picture = f'<img src="{_e(image.thumb)}" alt="{_e(label)}" title="{_e(image.uri)}">'
    lines = [f"<b>{_e(label)}</b>"]
    scores = [
        f"{short}={value:.3g}"
        for name, short in NEGATIVE_SCORES
        if (value := image.scores.get(name)) is not None
    ]
    if scores:
        lines.append(_e(" ".join(scores)))
    if image.changed is not None:
        text = ", ".join(image.changed) if image.changed else "nothing (false negative)"
        css_class = "" if image.changed else ' class="false-negative"'
        lines.append(f"<span{css_class}>changed: {_e(text)}</span>")
    elif image.attributes is not None:
        lines.append(_e(", ".join(image.attributes.values())))
    caption = "<br>".join(lines)
    return f'<figure class="{css}">{picture}<figcaption>{caption}</figcaption></figure>'


def _pair(pair: ShownPair) -> str:
    images = [_image(pair.positive, "positive", "positive")]
    images += [_image(n, f"negative {n.rank}", "negative") for n in pair.negatives]
    rejected = f"<p><i>rejected:</i> {_e(pair.rejected)}</p>" if pair.rejected else ""
    return (
        f'<article class="pair" data-pair-id="{_e(pair.pair_id)}"><h3>{_e(pair.pair_id)}</h3>'
        f"<p><i>prompt:</i> {_e(pair.prompt)}</p><p><i>chosen:</i> {_e(pair.chosen)}</p>{rejected}"
        f'<div class="grid">{"".join(images)}</div></article>'
    )


def render_report(
    title: str, summary: list[tuple[str, str]], histograms: list[str], pairs: list[ShownPair]
) -> str:
    """The whole page; `histograms` are relative PNG paths."""
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary)
    hists = "".join(f'<img src="{_e(h)}" alt="{_e(h)}">' for h in histograms)
    body = "".join(_pair(p) for p in pairs)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        f'<h2>Summary</h2><table class="summary">{rows}</table>'
        f'<h2>Score distributions</h2><div class="hists">{hists}</div>'
        f'<h2>Sample of {len(pairs)} pairs</h2><section id="pairs" data-count="{len(pairs)}">{body}</section>'
        '<p id="image-status" data-loaded="" data-total=""></p>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )

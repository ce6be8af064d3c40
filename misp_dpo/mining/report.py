"""The static HTML report of a negatives dataset: one self-contained page, no server, no external assets.

A dashboard: the dataset named in the title, summary counts, label-free quality figures (and the
ground-truth ones when attributes exist), a legend of every score, score histograms with labelled
axes, and a sample of pairs that can be sorted by score or by hardness, with easy and
near-duplicate negatives flagged. Images are referenced by relative paths (thumbnails and PNGs
written next to the page). Every string that comes from the data (prompts, responses, ids, uris,
attribute values) goes through `html.escape`, so a prompt cannot inject markup. A small inline
script sorts the pairs and records how many images loaded in `#image-status`, which the report
test reads back from headless Chromium.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from misp_dpo.mining.attributes import AttributeTable
from misp_dpo.mining.card import portable
from misp_dpo.mining.label_free import NegativeFlags

# (field, caption label, what it means) for every per-negative number the page shows
SCORE_LEGEND: tuple[tuple[str, str, str], ...] = (
    ("score", "score s", "the strategy's selection score s_i (higher = picked earlier by the score)"),
    (
        "sim_image",
        "similarity to positive",
        "CLIP cosine to the positive image: the hardness (higher = harder)",
    ),
    ("recon_error", "reconstruction l", "SAE reconstruction difficulty l_i of the difference (novelty)"),
    (
        "deviation",
        "deviation v",
        "SAE semantic deviation v_i = |z_i|_1 (how strongly the difference is semantic)",
    ),
    (
        "diversity_gain",
        "diversity gain",
        "distance to the negatives picked before it, in the strategy's space",
    ),
    ("proposal", "proposal q", "q_i: probability of the negative in the trainer's importance sampling"),
)
NEGATIVE_SCORES = tuple((name, label) for name, label, _ in SCORE_LEGEND)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222;
  font-size: 15px; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.4em; border-bottom: 1px solid #ddd; }
table.summary td { padding: 3px 12px; border-bottom: 1px solid #eee; }
table.legend td { padding: 3px 10px; vertical-align: top; }
table.eval { border-collapse: collapse; margin: 0.4em 0 1em; font-variant-numeric: tabular-nums; }
table.eval th, table.eval td { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: right; }
table.eval thead th { text-align: center; } table.eval .label { text-align: left; }
table.eval td.diff { font-weight: bold; } table.eval.compact td { padding: 1px 6px; }
figure.eval-chart { width: auto; font-size: 14px; } .eval-chart img { width: 440px; border: 1px solid #ddd; }
.hists { display: flex; flex-wrap: wrap; gap: 12px; }
.hists figure { width: auto; font-size: 14px; }
.hists img { width: 360px; border: 1px solid #ddd; }
.pair { border-top: 1px solid #ccc; padding: 0.8em 0; }
.pair p { margin: 0.25em 0; }
.pair h3 { margin: 0.2em 0; font-size: 1.05em; }
.pair .means { color: #555; font-size: 14px; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; margin-top: 0.5em; }
figure { margin: 0; width: 190px; font-size: 13px; line-height: 1.35; }
figure img { display: block; width: 150px; height: auto; border: 4px solid #ccc; }
figure.positive img { border-color: #2a9d4b; }
figure.negative img { border-color: #c0392b; }
figure.negative.flagged img { border-style: dashed; }
dl.scores { display: grid; grid-template-columns: auto auto; gap: 0 8px; margin: 0.3em 0; }
dl.scores dt { color: #555; }
dl.scores dd { margin: 0; text-align: right; font-variant-numeric: tabular-nums; }
.flag { display: inline-block; padding: 1px 6px; border-radius: 3px; font-weight: bold; color: #fff; }
.flag.near-duplicate { background: #d35400; } .flag.easy { background: #7f8c8d; }
.flag.false-negative { background: #c0392b; }
.missing { width: 150px; height: 100px; background: #eee; display: flex; align-items: center; }
#controls { margin: 0.6em 0; font-size: 15px; }
"""

_SCRIPT = """
function sortPairs(key) {
  var section = document.getElementById("pairs");
  var pairs = Array.prototype.slice.call(section.querySelectorAll("article.pair"));
  pairs.sort(function (a, b) {
    var x = parseFloat(a.getAttribute("data-" + key)), y = parseFloat(b.getAttribute("data-" + key));
    if (key === "order") { return x - y; }
    if (isNaN(x)) { return 1; } if (isNaN(y)) { return -1; }
    return y - x;
  });
  pairs.forEach(function (p) { section.appendChild(p); });
  section.setAttribute("data-sorted-by", key);
}
var select = document.getElementById("sort");
select.addEventListener("change", function (e) { sortPairs(e.target.value); });
var wanted = window.location.hash.match(/sort=(order|score|hardness)/);  // a link can carry the order
if (wanted) { select.value = wanted[1]; sortPairs(wanted[1]); }
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
    flag: str | None = None  # "near-duplicate" | "easy" | None


@dataclass
class ShownPair:
    pair_id: str
    prompt: str
    chosen: str
    rejected: str | None
    positive: ShownImage
    negatives: list[ShownImage]
    order: int = 0  # position in the dataset sample

    def mean(self, name: str) -> float:
        values = [v for n in self.negatives if (v := n.scores.get(name)) is not None]
        return float(np.mean(values)) if values else math.nan


def thumbnail(data: bytes, size: int) -> bytes:
    """A PNG no larger than size x size (never upscaled)."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
        rgb.thumbnail((size, size))
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
    return buffer.getvalue()


def shown_pairs(
    rows: list[dict[str, Any]],
    thumbs: dict[str, str | None],
    attributes: AttributeTable | None,
    flags: NegativeFlags,
) -> list[ShownPair]:
    """The sample's rows (at most --limit, as Python dicts) as the page shows them."""
    shown = []
    for order, row in enumerate(rows):
        positive = ShownImage(
            row["positive"]["image_id"], row["positive"]["uri"], thumbs[row["positive"]["image_id"]]
        )
        pos_row = attributes.rows([positive.uri])[0] if attributes is not None else -1
        if attributes is not None and pos_row >= 0:
            positive.attributes = attributes.describe(pos_row)
        negatives = []
        for n in row["negatives"]:
            scores = {k: n.get(k) for k, _ in NEGATIVE_SCORES}
            image = ShownImage(n["image_id"], n["uri"], thumbs[n["image_id"]], scores, n["rank"])
            image.flag = flags.of(scores.get("sim_image"))
            neg_row = attributes.rows([image.uri])[0] if attributes is not None else -1
            if attributes is not None and neg_row >= 0 and pos_row >= 0:
                image.changed = attributes.changed(pos_row, neg_row)
            negatives.append(image)
        shown.append(
            ShownPair(
                row["pair_id"], row["prompt"], row["chosen"], row["rejected"], positive, negatives, order
            )
        )
    return shown


def summary_rows(
    name: str, meta: dict[str, Any], stats: dict[str, Any], shown: int, unreadable: int
) -> list[tuple[str, str]]:
    """The summary table: what the dataset is and its counts (folder named, never its full path)."""
    meta = portable(meta)  # a local checkpoint's folder by name, not by its path on this machine
    sae, clip = meta.get("sae") or {}, meta.get("clip") or {}
    rows: list[tuple[str, Any]] = [
        ("dataset", name),
        ("strategy", meta.get("strategy")),
        ("SAE", f"{sae.get('variant')} ({sae.get('latents')} latents)" if sae else "none"),
        ("CLIP", f"{clip.get('model')} {clip.get('pretrained') or ''} D={clip.get('dim')}"),
        ("negatives per pair (N)", meta.get("negatives")),
        ("pairs", stats.get("pairs", 0)),
        ("negatives", stats.get("negatives", 0)),
        ("pairs with fewer than N", stats.get("short_pairs", 0)),
        ("failed pairs", stats.get("failures", 0)),
        ("pairs shown", shown),
        ("unreadable images in the sample", unreadable),
    ]
    return [(k, str(v)) for k, v in rows]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _image(image: ShownImage, label: str, css: str) -> str:
    if image.thumb is None:
        picture = f'<div class="missing">unreadable: {_e(image.uri)}</div>'
    else:
        picture = f'<img src="{_e(image.thumb)}" alt="{_e(label)}" title="{_e(image.uri)}">'
    lines = [f"<b>{_e(label)}</b>"]
    flags = []
    if image.flag:
        flags.append(f'<span class="flag {image.flag}">{_e(image.flag)}</span>')
    if image.changed is not None and not image.changed:
        flags.append('<span class="flag false-negative">false negative</span>')
    if flags:
        lines.append(" ".join(flags))
    scores = [
        f"<dt>{_e(label)}</dt><dd>{value:.3g}</dd>"
        for name, label in NEGATIVE_SCORES
        if (value := image.scores.get(name)) is not None
    ]
    if scores:
        lines.append(f'<dl class="scores">{"".join(scores)}</dl>')
    if image.changed:
        lines.append(f"<span>changed: {_e(', '.join(image.changed))}</span>")
    elif image.changed is not None:
        lines.append("<span>changed: nothing</span>")
    elif image.attributes is not None:
        lines.append(_e(", ".join(image.attributes.values())))
    caption = "<br>".join(lines)
    extra = " flagged" if image.flag else ""
    return f'<figure class="{css}{extra}">{picture}<figcaption>{caption}</figcaption></figure>'


def _number(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.6g}"


def _pair(pair: ShownPair) -> str:
    images = [_image(pair.positive, "positive", "positive")]
    images += [_image(n, f"negative #{(n.rank or 0) + 1}", "negative") for n in pair.negatives]
    rejected = f"<p><i>rejected:</i> {_e(pair.rejected)}</p>" if pair.rejected else ""
    score, hardness = pair.mean("score"), pair.mean("sim_image")
    means = f"mean score {score:.3g} · mean similarity to positive (hardness) {hardness:.3g}"
    return (
        f'<article class="pair" data-pair-id="{_e(pair.pair_id)}" data-order="{pair.order}" '
        f'data-score="{_number(score)}" data-hardness="{_number(hardness)}"><h3>{_e(pair.pair_id)}</h3>'
        f'<p class="means">{_e(means)}</p>'
        f"<p><i>prompt:</i> {_e(pair.prompt)}</p><p><i>chosen:</i> {_e(pair.chosen)}</p>{rejected}"
        f'<div class="grid">{"".join(images)}</div></article>'
    )


def _legend(flags: NegativeFlags) -> str:
    rows = "".join(
        f"<tr><td><b>{_e(label)}</b></td><td>{_e(text)}</td></tr>" for _, label, text in SCORE_LEGEND
    )
    rows += (
        f'<tr><td><span class="flag near-duplicate">near-duplicate</span></td><td>similarity to the '
        f"positive at least {flags.near_duplicate:.2f}: nearly the same picture, teaches little</td></tr>"
        f'<tr><td><span class="flag easy">easy</span></td><td>similarity to the positive at most '
        f"{flags.easy:.3f} (the dataset's lowest 10%): too different to be hard</td></tr>"
        '<tr><td><span class="flag false-negative">false negative</span></td><td>changes no ground-truth '
        "attribute (shown only with --attributes)</td></tr>"
    )
    return f'<table class="legend">{rows}</table>'


def render_report(
    title: str,
    summary: list[tuple[str, str]],
    quality: list[tuple[str, str]],
    histograms: list[tuple[str, str]],
    pairs: list[ShownPair],
    flags: NegativeFlags,
    evaluation: str = "",
) -> str:
    """The whole page; `histograms` are (relative PNG path, caption); `evaluation` is the HTML of
    the Evaluation section (`misp_dpo.eval.report_section`), placed after the quality figures."""
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary)
    quality_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in quality)
    hists = "".join(
        f'<figure><img src="{_e(path)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'
        for path, caption in histograms
    )
    body = "".join(_pair(p) for p in pairs)
    controls = (
        '<div id="controls"><label for="sort">Sort pairs by </label><select id="sort">'
        '<option value="order">dataset order</option>'
        '<option value="score">mean score (highest first)</option>'
        '<option value="hardness">hardness: mean similarity to the positive (hardest first)</option>'
        "</select></div>"
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        f'<h2>Summary</h2><table class="summary">{rows}</table>'
        f'<h2>Quality</h2><table class="summary" id="quality">{quality_rows}</table>'
        f"{evaluation}"
        f"<h2>Legend</h2>{_legend(flags)}"
        f'<h2>Score distributions</h2><div class="hists">{hists}</div>'
        f"<h2>Sample of {len(pairs)} pairs</h2>{controls}"
        f'<section id="pairs" data-count="{len(pairs)}" data-sorted-by="order">{body}</section>'
        '<p id="image-status" data-loaded="" data-total=""></p>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )

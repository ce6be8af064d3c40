"""The one dataset card builder, for `mine` (`negatives/README.md`) and `publish` (the Hub folder).

The YAML header is `huggingface_hub`'s `DatasetCardData` (license, task categories, size category,
pretty name, configs naming the data files so `datasets.load_dataset(DIR)` reads only them, and
`dataset_info` features where the rows embed images). The body says how the data was mined, with
the exact score formula and the settings it ran with, counts, score histograms (PNG files next to
the card) and how to load it. Nothing in it is an absolute path: folders are named by their last
component only, so a card copied to another machine or the Hub tells nothing about the miner's disk.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from huggingface_hub import DatasetCardData

from misp_dpo.mining.plots import HISTOGRAM_FIELDS

CARD = "README.md"
TASK_CATEGORIES = ["image-text-to-text", "visual-question-answering"]
STRATEGY_TEXT = {
    "misp": "MISP-DPO (arXiv 2509.25717): SAE scores of the prompt-fused image difference, then a greedy "
    "pick that adds diversity_gain x beta_div to s_i.",
    "maxmin": "max-min baseline without an SAE: s_i is the cosine to the positive image; the greedy "
    "diversity term uses raw CLIP differences.",
    "nearest": "similarity retrieval: the N candidates most similar to the positive image.",
    "random": "N candidates drawn uniformly from the filtered pool, seeded per pair.",
    "topm": "N drawn uniformly from the top_m candidates most similar to the positive.",
    "nearest-random": "the nearest_count most similar, the rest drawn uniformly from the pool.",
}
FIELDS_TEXT = """| field | meaning |
|---|---|
| `pair_id`, `prompt`, `chosen`, `rejected` | the preference pair (`rejected` text may be null) |
| `positive` | the pair's image ({image}) |
| `negatives[].rank` | pick order (0 = first) |
| `negatives[].sim_image`, `sim_prompt` | CLIP cosine to the positive image / to the prompt |
| `negatives[].recon_error`, `deviation` | the SAE's l_i and v_i (null without an SAE) |
| `negatives[].diversity_gain` | the greedy's diversity bonus when the negative was picked (0 for the first) |
| `negatives[].score` | the strategy's selection score s_i (null for the uniform strategies) |
| `negatives[].proposal` | q_i over the pair's whole pool: softmax(s_i / tau), uniform for `random` |
"""


@dataclass
class CardFacts:
    """What a card states; `mine_config` / `mine_meta` are the negatives manifest's config and meta."""

    pretty_name: str
    made_by: str  # the command that wrote the folder: "mine" or "publish --format F"
    version: str
    mine_config: dict[str, Any]
    mine_meta: dict[str, Any]
    stats: dict[str, Any]
    summary: dict[str, dict[str, float]]
    histograms: list[str]  # PNG names next to the card
    data_files: dict[str, str]  # config name -> glob of its shards, relative to the card
    rows: int
    license: str = "other"
    features: dict[str, Any] | None = None  # `datasets` features (the `_type` form) of the rows
    layout: str = "one row per pair; images located by `uri` (resolve them against the image root)"
    num_bytes: int | None = None  # Arrow size of the rows (the card's split size), when known
    fields_table: bool = True  # rows carry the negatives' fields (mine, hf); False: see `layout`
    extra: list[str] = field(default_factory=list)  # more Markdown sections


# an absolute path at the start of a value or after `scheme:` / `=` (`local-dir:/x/clip`, `file:///x`)
_ABSOLUTE = re.compile(r"(?:(?<=^)|(?<=[:=]))(?:file://)?/(?!/)[^\s'\"]*")


def portable(value: Any) -> Any:
    """`value` with every absolute path replaced by its last component (recursively)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v) for v in value]
    if isinstance(value, str):
        return _ABSOLUTE.sub(lambda m: PurePath(m.group(0).removeprefix("file://")).name or ".", value)
    return value


def dataset_name(folder: PurePath) -> str:
    """What a dataset folder is called: its name, or its parent's when it is the stage's `negatives`."""
    return folder.parent.name if folder.name == "negatives" and folder.parent.name else folder.name


def size_category(rows: int) -> str:
    """The Hub's size_categories bucket of `rows`."""
    if rows < 1000:
        return "n<1K"
    bounds = ["1K", "10K", "100K", "1M", "10M", "100M", "1B", "10B", "100B", "1T"]
    index = min(int(math.log10(rows)) - 3, len(bounds) - 2)
    return f"{bounds[index]}<n<{bounds[index + 1]}"


def yaml_features(features: dict[str, Any]) -> list[dict[str, Any]]:
    """`datasets` features in the card's `dataset_info` form (what `Features._to_yaml_list` writes)."""

    def one(feature: dict[str, Any]) -> dict[str, Any]:
        kind = feature.get("_type")
        if kind == "Value":
            return {"dtype": feature["dtype"]}
        if kind == "Image":
            return {"dtype": "image"}
        if kind == "List":
            inner = feature["feature"]
            if "_type" not in inner:
                return {"list": yaml_features(inner)}
            return {"list": one(inner)["dtype"]}
        raise ValueError(f"no card form for feature {feature}")

    return [{"name": name, **one(feature)} for name, feature in features.items()]


def _score_formula(config: dict[str, Any], strategy: str, negatives: Any) -> str:
    w_l, w_v = config.get("weights", (1.0, 1.0))
    relevance, beta, tau = config.get("relevance", 0.0), config.get("beta_div", 1.0), config.get("tau", 1.0)
    lines = [f"Strategy `{strategy}`: {STRATEGY_TEXT.get(strategy, 'see docs/method.md')}", ""]
    if strategy == "misp":
        lines += [
            "For candidate i of a pair's filtered pool, with d_i the prompt-fused difference of the "
            "positive and candidate CLIP embeddings and z_i its SAE code:",
            "",
            "```",
            "l_i = ||d_i - SAE(d_i)||^2            (reconstruction difficulty, field recon_error)",
            "v_i = ||z_i||_1                        (semantic deviation, field deviation)",
            f"s_i = {w_l:g} * l_i / max_pool(l) + {w_v:g} * v_i / max_pool(v)"
            + (
                f" + {relevance:g} * (sim_i - min_pool(sim)) / (max_pool(sim) - min_pool(sim))"
                if relevance
                else ""
            ),
            "```",
            "",
            f"w_l = {w_l:g}, w_v = {w_v:g}, relevance R = {relevance:g} "
            + ("(0: the paper's score)." if not relevance else "([ours]; sim_i: cosine to the positive)."),
        ]
    lines += [
        "",
        f"Greedy pick: S = {{}}; add argmax_i s_i + {beta:g} * gain_i until |S| = "
        f"{negatives}, gain_i = {config.get('diversity', 'min-cosine')} bonus "
        "(min-cosine: min_{j in S} (1 - cos(f_i, f_j)), 0 for the first pick).",
        f"Proposal: q_i = softmax over the pool of s_i / {tau:g} (tau).",
    ]
    return "\n".join(lines) + "\n"


def _scores_section(summary: dict[str, dict[str, float]], histograms: list[str]) -> str:
    if not summary:
        return "No negatives were selected, so there are no score distributions.\n"
    lines = ["| field | mean | min | max |", "|---|---|---|---|"]
    for name, values in summary.items():
        lines.append(f"| {name} | {values['mean']:.4g} | {values['min']:.4g} | {values['max']:.4g} |")
    images = [f"![{HISTOGRAM_FIELDS.get(h[5:-4], h)}]({h})" for h in histograms]
    return "\n".join(lines) + "\n\n" + "\n".join(images) + "\n"


def _header(facts: CardFacts) -> str:
    configs = [
        {"config_name": name, "data_files": [{"split": "train", "path": glob}]}
        for name, glob in facts.data_files.items()
    ]
    info: dict[str, Any] | None = None  # one config whose features and size are known (the hf rows)
    if facts.features is not None and facts.num_bytes is not None:
        split = {"name": "train", "num_bytes": facts.num_bytes, "num_examples": facts.rows}
        info = {"features": yaml_features(facts.features), "splits": [split]}
    data = DatasetCardData(
        license=facts.license,
        task_categories=TASK_CATEGORIES,
        size_categories=[size_category(facts.rows)],
        pretty_name=facts.pretty_name,
        configs=configs,
        dataset_info=info,
        tags=["misp-dpo", "dpo", "preference", "multi-negative", "image"],
    )
    return f"---\n{data.to_yaml()}\n---\n"


def card_text(facts: CardFacts) -> str:
    """The whole README.md (YAML header + Markdown body), free of absolute paths."""
    meta, config = portable(facts.mine_meta), portable(facts.mine_config)
    strategy = meta.get("strategy", config.get("strategy", "misp"))
    clip, sae = meta.get("clip") or {}, meta.get("sae")
    sae_line = (
        f"SAE: variant `{sae.get('variant')}`, {sae.get('latents')} latents."
        if sae
        else "No SAE was used (recon_error and deviation are null)."
    )
    counts = "\n".join(f"| {k} | {v} |" for k, v in sorted(facts.stats.items()))
    first = next(iter(facts.data_files.values()))
    loading = (
        "```python\nimport datasets\n"
        'ds = datasets.load_dataset("DIR")  # this card names the data files; or the Hub repo id\n'
        f'ds = datasets.load_dataset("parquet", data_files="DIR/{first}")\n```\n'
    )
    body = [
        f"# {facts.pretty_name}\n",
        f"Multi-negative image preference data made by misp-dpo {facts.version} (`{facts.made_by}`): "
        f"{facts.layout}. {facts.rows} rows, {facts.stats.get('pairs', '?')} pairs.\n",
        "## How it was mined\n",
        "For each (prompt, chosen response, positive image) a pool of candidate images was retrieved "
        "with CLIP (FAISS neighbours of the positive and of the prompt), minus the positive, its "
        "near-duplicates and likely false negatives (candidates as close to the chosen response as "
        "the positive, within a margin). Then up to N negatives were selected per pair "
        f"(N = {config.get('negatives', meta.get('negatives'))}).\n",
        f"CLIP: `{clip.get('model')}` {clip.get('pretrained') or ''} (D = {clip.get('dim')}). {sae_line}\n",
        "### Score and selection\n",
        _score_formula(config, strategy, config.get("negatives", meta.get("negatives", "?"))),
        "The method is described in full in misp-dpo's docs/method.md.\n",
        "## Fields\n",
        FIELDS_TEXT.format(image="an embedded image" if facts.features else "`{image_id, uri}`")
        if facts.fields_table
        else f"{facts.layout}.\n",
        "`image_id` is the sha1 of the image bytes.\n",
        "## Loading\n",
        loading,
        "## Counts\n",
        "| count | value |\n|---|---|\n" + counts + "\n",
        "## Scores\n",
        _scores_section(facts.summary, facts.histograms),
        *facts.extra,
        "## Settings\n",
        "```json\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```\n",
    ]
    return _header(facts) + "\n" + "\n".join(body)


def card_markdown(
    config: dict[str, Any],
    meta: dict[str, Any],
    stats: dict[str, Any],
    summary: dict[str, dict[str, float]],
    histograms: list[str],
    version: str,
    data_glob: str,
) -> str:
    """`mine`'s card: the negatives folder itself, images located by uri."""
    facts = CardFacts(
        pretty_name=f"misp-dpo negatives ({meta.get('strategy', 'misp')})",
        made_by="mine",
        version=version,
        mine_config=config,
        mine_meta=meta,
        stats=stats,
        summary=summary,
        histograms=histograms,
        data_files={"default": data_glob},
        rows=int(stats.get("pairs", 0)),
    )
    return card_text(facts)

"""The dataset card (`negatives/README.md`): how the dataset was made, its config, counts and scores.

Its YAML header declares the data files, so `datasets.load_dataset(DIR)` reads only the
data shards and not the manifest, stats or histograms next to them.
"""

from __future__ import annotations

import json
from typing import Any

from misp_dpo.mining.plots import HISTOGRAM_FIELDS

STRATEGY_TEXT = {
    "misp": (
        "MISP-DPO selection (arXiv 2509.25717): for every candidate the SAE encodes the prompt-fused "
        "difference between the positive and the candidate; the score is s_i = w_l l_i / max_pool l + "
        "w_v v_i / max_pool v with l_i the SAE reconstruction error and v_i = |z_i|_1; negatives are "
        "picked greedily by s_i + beta_div min_j (1 - cos(z_i, z_j)) over those already picked."
    ),
    "maxmin": (
        "max-min baseline without an SAE: s_i is the cosine of the candidate to the positive image, and "
        "the greedy diversity term uses raw CLIP differences v(m_c) - v(m_p)."
    ),
    "nearest": "similarity retrieval baseline: the N candidates most similar to the positive image.",
    "random": "random baseline: N candidates drawn uniformly from the filtered pool, seeded per pair.",
}

FIELDS_TEXT = """| field | meaning |
|---|---|
| `pair_id`, `prompt`, `chosen`, `rejected` | the preference pair |
| `positive` | `{image_id, uri}` of the pair's image (`image_id` = sha1 of the image bytes) |
| `negatives[].rank` | pick order (0 = first) |
| `negatives[].sim_image`, `sim_prompt` | CLIP cosine to the positive image / to the prompt |
| `negatives[].recon_error`, `deviation` | the SAE's l_i and v_i (null without an SAE) |
| `negatives[].diversity_gain` | min_j (1 - cos) to the negatives picked before it, in the strategy's space |
| `negatives[].score` | the strategy's selection score s_i (null for `random`) |
| `negatives[].proposal` | q_i over the pair's whole pool: softmax(s_i / tau), uniform for `random` |
"""


def _yaml_header(data_glob: str) -> str:
    return (
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        f'    path: "{data_glob}"\ntags:\n- misp-dpo\n- preference\n- multi-negative\n---\n'
    )


def _counts_table(stats: dict[str, Any]) -> str:
    rows = [f"| {key} | {value} |" for key, value in sorted(stats.items())]
    return "| count | value |\n|---|---|\n" + "\n".join(rows) + "\n"


def _scores_section(summary: dict[str, dict[str, float]], histograms: list[str]) -> str:
    if not summary:
        return "No negatives were selected, so there are no score distributions.\n"
    lines = ["| field | mean | min | max |", "|---|---|---|---|"]
    for name, values in summary.items():
        lines.append(f"| {name} | {values['mean']:.4g} | {values['min']:.4g} | {values['max']:.4g} |")
    images = [f"![{HISTOGRAM_FIELDS[h[5:-4]]}]({h})" for h in histograms]
    note = f"\n\nThe histograms are the PNG files next to this card ({', '.join(histograms)}).\n\n"
    return "\n".join(lines) + note + "\n".join(images) + "\n"


def card_markdown(
    config: dict[str, Any],
    meta: dict[str, Any],
    stats: dict[str, Any],
    summary: dict[str, dict[str, float]],
    histograms: list[str],
    version: str,
    data_glob: str,
) -> str:
    """The card's text; `histograms` are PNG file names next to it, `data_glob` matches the shards."""
    strategy = meta.get("strategy", "misp")
    clip = meta.get("clip", {})
    sae = meta.get("sae")
    sae_line = (
        f"SAE: variant `{sae['variant']}`, {sae['latents']} latents, from `{sae['dir']}`."
        if sae
        else "No SAE was used (recon_error and deviation are null)."
    )
    shape = "one row per pair" if meta.get("format", "listwise") == "listwise" else "one row per negative"
    return (
        _yaml_header(data_glob)
        + "\n# Multi-negative image preference dataset (misp-dpo)\n\n"
        + f"Made by `misp-dpo mine` {version} with strategy `{strategy}`: up to "
        f"{meta.get('negatives')} negative images per preference pair, {shape}, "
        f"{stats.get('pairs', 0)} pairs and {stats.get('negatives', 0)} negatives.\n\n"
        "## How it was made\n\n"
        f"{STRATEGY_TEXT.get(strategy, '')}\n\n"
        f"Candidates: `{meta.get('candidates_dir')}` (FAISS neighbours of the positive and the prompt, "
        "minus the positive, its near-duplicates and likely false negatives). "
        f"CLIP: `{clip.get('model')}` {clip.get('pretrained', '')} (D = {clip.get('dim')}), "
        f"embeddings from `{meta.get('embeddings_dir')}`. {sae_line}\n\n"
        f"Pairs whose filtered pool had fewer than N candidates: {stats.get('short_pairs', 0)} "
        f"({'dropped' if config.get('drop_short') else 'kept with what they have'}).\n\n"
        "## Loading\n\n```python\nimport polars as pl\n"
        f'df = pl.read_parquet("DIR/{data_glob}")\n\nimport datasets\n'
        'ds = datasets.load_dataset("DIR")  # this card declares the data files\n'
        'ds = datasets.load_dataset("parquet", data_dir="DIR")  # shard names carry the split\n```\n\n'
        f"## Fields\n\n{FIELDS_TEXT}\n"
        f"## Counts\n\n{_counts_table(stats)}\n"
        f"## Scores\n\n{_scores_section(summary, histograms)}\n"
        "## Configuration\n\n```json\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```\n"
    )

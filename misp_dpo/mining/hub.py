"""The published folder as the Hugging Face Hub sees it: its card, and what goes up with `--repo-id`.

Only the card, its histogram PNGs and the data shards go up; the runner's bookkeeping (manifest,
`_stats/`, `_failures/`) stays local. The upload is `HfApi.upload_folder` with those patterns;
`dry_run` lists the files and sizes and touches no network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import HfApi, get_token

from misp_dpo.errors import UserError
from misp_dpo.mining.card import CardFacts, card_text
from misp_dpo.mining.plots import render_histograms, summary
from misp_dpo.mining.publish import HF_ROWS, PublishFormat

DATA_DIR = "data"
UPLOADED = ["README.md", "*.png", f"{DATA_DIR}/*.parquet"]
# shard prefixes (under data/) of each format; each is one config of the card
SHARD_PREFIXES: dict[str, tuple[str, ...]] = {
    "hf": ("train",),
    "swift": ("rejected_images", "rejected_response"),
    "trl": ("train",),
}
LAYOUT = {
    "hf": "one row per pair; the positive image and every negative image are embedded (the `datasets` "
    "Image feature), each negative with its scores",
    "swift": "ms-swift DPO rows: config `rejected_images` holds one row per negative image "
    "(`messages`, `images` = [positive], `rejected_images` = [negative]); config `rejected_response` "
    "one row per rejected text (`rejected_response`, the rejected side keeps `images`)",
    "trl": "TRL vision DPO rows (`images`, conversational `prompt` / `chosen` / `rejected`) of the pairs "
    "with a rejected text; the negative images are not in this export",
}


@dataclass(frozen=True)
class HubCard:
    text: str
    histograms: dict[str, bytes]  # PNG name -> bytes, written next to the card


def hub_card(
    fmt: PublishFormat,
    mine: tuple[dict[str, Any], dict[str, Any]],
    stats: dict[str, Any],
    values: dict[str, np.ndarray],
    pretty_name: str,
    license: str,
    version: str,
) -> HubCard:
    """The card of a published folder; `mine` is the negatives manifest's (config, meta)."""
    images = render_histograms(values)
    data_files = {
        (prefix if fmt == "swift" else "default"): f"{DATA_DIR}/{prefix}-*" for prefix in SHARD_PREFIXES[fmt]
    }
    features = json.loads(HF_ROWS.metadata[b"huggingface"])["info"]["features"] if fmt == "hf" else None
    facts = CardFacts(
        pretty_name=pretty_name,
        made_by=f"publish --format {fmt}",
        version=version,
        mine_config=mine[0],
        mine_meta=mine[1],
        stats=stats,
        summary=summary(values),
        histograms=list(images),
        data_files=data_files,
        rows=int(stats.get("rows", 0)),
        num_bytes=int(stats["num_bytes"]) if "num_bytes" in stats else None,
        license=license,
        features=features,
        layout=LAYOUT[fmt],
        fields_table=fmt == "hf",
    )
    return HubCard(card_text(facts), images)


def uploaded_files(folder: Path) -> list[tuple[str, int]]:
    """(path relative to the folder, bytes) of every file the upload sends, sorted."""
    files = {p for pattern in UPLOADED for p in folder.glob(pattern) if p.is_file()}
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in files)


def upload(folder: Path, repo_id: str, dry_run: bool) -> list[tuple[str, int]]:
    """Send the folder's card, PNGs and shards to the dataset repo `repo_id` (created if needed)."""
    files = uploaded_files(folder)
    if dry_run:
        return files
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UserError(f"--repo-id {repo_id}: HF_HUB_OFFLINE is set; unset it to upload, or add --dry-run")
    if get_token() is None:
        raise UserError(
            f"--repo-id {repo_id}: no Hugging Face token; run `hf auth login` or set HF_TOKEN "
            "(or add --dry-run to list what would go up)"
        )
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=folder,
        allow_patterns=UPLOADED,
        commit_message="misp-dpo publish",
    )
    return files

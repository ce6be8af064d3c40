"""Preference accuracy on a held-out table: does the model tie the chosen answer to the right image?

The table (JSONL / Parquet / CSV) has `prompt`, `chosen`, optional `rejected` and `id`, `image` (the
positive) and `negatives` (a list of images: paths, or structs with a `path`). It is turned into the
trainer's `negatives/` layout, so the trainer's log-prob pass (`compute_reference`, which batches,
reports unreadable images as failures and keys rows by (pair, image, response)) scores it:

- image_accuracy: share of (pair, negative) with log p(chosen | x, positive) > log p(chosen | x, negative);
- image_margin: the mean of those log-prob differences (nats; moves before accuracy does);
- text_accuracy: share of pairs with a rejected text where log p(chosen) > log p(rejected), both
  with the positive image;
- by_kind: image accuracy, margin and count per kind of negative, where an optional `negative_kinds`
  column (a list as long as `negatives`) names how each negative differs from the positive. The
  demo's held-out pairs have one negative per attribute type, each differing in that attribute alone,
  so this says which differences the model ties its answer to (on the fitted demo VLM: every kind
  0.97-0.99 except the shape, 0.73: its descriptions name the shape from the colour, the prior).
Ties count as wrong, so a model blind to the image scores 0 on the image term, not 0.5.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from misp_dpo.dpo.data import PreferenceData
from misp_dpo.dpo.model import Policy
from misp_dpo.dpo.reference import align_reference, compute_reference
from misp_dpo.embed.readers import TABLE_FORMATS, check_image_column, open_table
from misp_dpo.errors import UserError
from misp_dpo.eval.probes import READ_BATCH, locate_images

FLAG = "--pairs"
KINDS = "negative_kinds"
HELDOUT_STEM = "heldout_pairs"  # what `synth` names its held-out preference table
POSITIVE = "positive"
IMAGE_REF = pa.struct([("image_id", pa.string()), ("uri", pa.string())])
NEGATIVE_REF = pa.struct([("image_id", pa.string()), ("uri", pa.string()), ("proposal", pa.float64())])


def find_pairs_table(path: Path) -> Path:
    """`path` itself, or inside the folder `path` its `heldout_pairs` table (the demo corpus's) or
    its only table."""
    if not path.is_dir():
        return path
    tables = sorted(p for p in path.iterdir() if p.suffix.lower() in TABLE_FORMATS)
    named = [p for p in tables if p.stem == HELDOUT_STEM]
    if len(named) == 1:
        return named[0]
    if len(tables) != 1:
        raise UserError(
            f"{FLAG} {path}: a folder must hold {HELDOUT_STEM}.parquet or exactly one table, found "
            f"{len(tables)}; name the file"
        )
    return tables[0]


def load_preference_pairs(path: Path, image_root: Path | None = None, limit: int = 0) -> PreferenceData:
    """The held-out pairs (the first `limit` when > 0) in the trainer's layout, uris absolute."""
    table = open_table(find_pairs_table(path), FLAG)
    names = table.schema.names
    missing = [c for c in ("prompt", "chosen", "image", "negatives") if c not in names]
    if missing:
        raise UserError(
            f"{FLAG} {table.path}: no column {', '.join(repr(c) for c in missing)}; a held-out preference "
            "table needs prompt, chosen, image (the positive) and negatives (a list of images)"
        )
    check_image_column(table, "image", FLAG, "a column named 'image'")
    columns = [c for c in ("id", "prompt", "chosen", "rejected", "image", "negatives", KINDS) if c in names]
    rows = min(table.num_rows, limit) if limit else table.num_rows
    parts, first = [], 0
    for batch in table.iter_rows(0, rows, columns, READ_BATCH):
        parts.append(
            _pairs_of(
                batch,
                table.path,
                first,
                image_root,
                locate_images(batch.column(batch.schema.get_field_index("image")), table, first, image_root),
            )
        )
        first += batch.num_rows
    return PreferenceData(pa.concat_tables(parts), table.path.parent)


def _pairs_of(
    batch: pa.RecordBatch, path: Path, first: int, image_root: Path | None, positives: list[str | None]
) -> pa.Table:
    items = batch.to_pylist()
    base = os.path.abspath(image_root if image_root is not None else path.parent)
    negatives = []
    for i, item in enumerate(items):
        refs = []
        for k, image in enumerate(item["negatives"] or []):
            location = image.get("path") if isinstance(image, dict) else image
            if not isinstance(location, str):
                raise UserError(
                    f"{FLAG} {path}: row {first + i}: negative {k} is not an image path; store negatives "
                    "as paths relative to the table (or to --image-root)"
                )
            uri = os.path.join(base, location.removeprefix("file://"))
            refs.append({"image_id": f"negative-{k}", "uri": uri, "proposal": 1.0})
        negatives.append(refs)
        kinds = item.get(KINDS)
        if KINDS in item and (not isinstance(kinds, list) or len(kinds) != len(refs)):
            raise UserError(
                f"{FLAG} {path}: row {first + i}: {KINDS} must list one kind per negative "
                f"({len(refs)}), got {kinds!r}; fix the row or drop the column"
            )
    kind_column = (
        {KINDS: pa.array([item[KINDS] for item in items], pa.list_(pa.string()))}
        if KINDS in batch.schema.names
        else {}
    )
    return pa.table(
        {
            "pair_id": [
                str(item.get("id") if item.get("id") is not None else first + i)
                for i, item in enumerate(items)
            ],
            "prompt": [item["prompt"] or "" for item in items],
            "chosen": [item["chosen"] or "" for item in items],
            "rejected": pa.array([item.get("rejected") or None for item in items], pa.string()),
            "positive": pa.array([{"image_id": POSITIVE, "uri": uri} for uri in positives], IMAGE_REF),
            "negatives": pa.array(negatives, pa.list_(NEGATIVE_REF)),
            **kind_column,
        }
    )


class PreferenceScores(NamedTuple):
    image: np.ndarray  # (pairs, max negatives) log p(chosen | positive) - log p(chosen | negative); nan: none
    text: np.ndarray  # (pairs,) log p(chosen) - log p(rejected) with the positive; nan: no rejected text
    scored: int  # pairs whose positive was scored
    failures: int  # pairs with an unreadable image


def score_pairs(
    model: torch.nn.Module, base: Policy, data: PreferenceData, batch_size: int, show_progress: bool = True
) -> PreferenceScores:
    """The log-prob margins of every (pair, negative) and every pair's texts, by the trainer's pass."""
    # lora=False: `compute_reference` then scores `model` as it is (adapter on), not with adapters off
    scored = Policy(model=model, processor=base.processor, device=base.device, lora=False, identity={})
    table, failures = compute_reference(scored, data, np.arange(len(data)), batch_size, show_progress)
    logps = align_reference(table, data)
    return PreferenceScores(
        image=logps.positive[:, None] - logps.negatives,
        text=logps.positive - logps.rejected,
        scored=int(np.isfinite(logps.positive).sum()),
        failures=len(failures),
    )


def preference_accuracy(
    model: torch.nn.Module, base: Policy, data: PreferenceData, batch_size: int, show_progress: bool = True
) -> dict[str, Any]:
    """image_accuracy and image_margin, text_accuracy (None without rejected texts), their counts,
    the failed pairs and, where the table names the negatives' kinds, the image figures per kind."""
    return summarise(score_pairs(model, base, data, batch_size, show_progress), data)


def summarise(scores: PreferenceScores, data: PreferenceData) -> dict[str, Any]:
    """`preference_accuracy`'s figures from the margins (apart, so that bench/downstream.py keeps each
    comparison's win for its paired bootstrap and reports the same figures)."""
    image = np.isfinite(scores.image)
    text = np.isfinite(scores.text)
    figures: dict[str, Any] = {
        "image_accuracy": float((scores.image[image] > 0).mean()) if image.any() else None,
        "image_margin": float(scores.image[image].mean()) if image.any() else None,
        "text_accuracy": float((scores.text[text] > 0).mean()) if text.any() else None,
        "n": scores.scored,
        "n_negatives": int(image.sum()),
        "n_text": int(text.sum()),
        "failures": scores.failures,
    }
    if KINDS in data.table.column_names:
        kinds = np.full(scores.image.shape, None, dtype=object)
        for i, row in enumerate(data.table.column(KINDS).to_pylist()):
            kinds[i, : len(row)] = row
        figures["by_kind"] = {
            kind: {
                "image_accuracy": float((scores.image[mask] > 0).mean()),
                "image_margin": float(scores.image[mask].mean()),
                "n": int(mask.sum()),
            }
            for kind in sorted({k for k in kinds[image] if k is not None})
            if (mask := image & (kinds == kind)).any()
        }
    return figures

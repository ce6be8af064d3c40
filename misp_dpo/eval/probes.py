"""POPE probe tables in, one Arrow table out: our format, the public POPE files, the merged form.

- ours (docs/method.md §5, JSONL / Parquet / CSV): `image`, `question`, `label` (yes|no), `category`
  (random|popular|adversarial), optional `attribute` and `id`;
- the public `coco_pope_{split}.json` files as they are: JSON lines with `question_id`, `image` (a
  COCO file name), `text` (the question) and `label`, one split a file;
- the merged one-file form (LLaVA's evaluation set): the same with a `category` column.

A row's split is the one `FILE:SPLIT` names, else its `category`, else the `coco_pope_{split}`
in the file name. Images are paths relative to the table (or to `--image-root` when given), or
Hugging Face `{bytes, path}` structs; they are only located here (a uri `misp_dpo.image_uris` reads
back), so an unreadable image becomes a counted failure when it is read, not an error here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from misp_dpo.embed.readers import Table, check_image_column, image_refs, open_table
from misp_dpo.errors import UserError

SPLITS = ("random", "popular", "adversarial")
LABELS = ("yes", "no")
FLAG = "--probes"
POPE_FILE_NAME = re.compile(r"pope_(random|popular|adversarial)\b")
READ_BATCH = 4096

PROBES = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # the table's id / question_id, else FILE:ROW
        pa.field("split", pa.string(), nullable=False),  # random | popular | adversarial
        pa.field("question", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),  # yes | no
        pa.field("attribute", pa.string()),  # what the question is about, when the table says
        pa.field("uri", pa.string()),  # where the image is (misp_dpo.image_uris); null: no image given
    ]
)


@dataclass(frozen=True)
class ProbeSpec:
    """One `--probes` value: a table, and the split of all its rows when `FILE:SPLIT` names one."""

    path: Path
    split: str | None = None


def parse_probe_spec(spec: str) -> ProbeSpec:
    head, colon, tail = spec.rpartition(":")
    if colon and tail in SPLITS:
        return ProbeSpec(Path(head), tail)
    if colon and tail and "/" not in tail and not Path(spec).exists():
        raise UserError(
            f"{FLAG} {spec}: {tail!r} is not a split; write FILE:random, FILE:popular or FILE:adversarial"
        )
    return ProbeSpec(Path(spec))


def load_probes(specs: Sequence[str | ProbeSpec], image_root: Path | None = None) -> pa.Table:
    """Every probe of every table, in table order, as a PROBES table; UserError for a bad table."""
    if not specs:
        raise UserError(f"{FLAG}: no probe table given; pass {FLAG} FILE[:SPLIT] (repeatable)")
    parsed = [s if isinstance(s, ProbeSpec) else parse_probe_spec(s) for s in specs]
    return pa.concat_tables([_load_one(spec, image_root) for spec in parsed])


def _load_one(spec: ProbeSpec, image_root: Path | None) -> pa.Table:
    table = open_table(spec.path, FLAG)
    names = table.schema.names
    question = _first(("question", "text"), names)
    missing = [
        name
        for name, found in (("image", "image" in names), ("question", question), ("label", "label" in names))
        if not found
    ]
    if missing:
        raise UserError(
            f"{FLAG} {spec.path}: no column {', '.join(repr(m) for m in missing)} "
            f"(columns: {', '.join(names)}); "
            "a probe table needs image, question (or text) and label (yes|no)"
        )
    assert question is not None
    check_image_column(table, "image", FLAG, "a column named 'image'")
    split_column = "category" if spec.split is None and "category" in names else None
    file_split = spec.split or _split_from_name(spec.path)
    if split_column is None and file_split is None:
        raise UserError(
            f"{FLAG} {spec.path}: no split; add a category column or name it as {spec.path}:random "
            "(or :popular, :adversarial)"
        )
    id_column = _first(("id", "question_id"), names)
    columns = [
        c for c in ("image", question, "label", split_column, "attribute", id_column) if c and c in names
    ]
    parts: list[pa.Table] = []
    row = 0
    for batch in table.iter_rows(0, table.num_rows, columns, READ_BATCH):
        parts.append(_probes_of(batch, table, row, question, split_column, file_split, id_column, image_root))
        row += batch.num_rows
    return pa.concat_tables(parts) if parts else PROBES.empty_table()


def _probes_of(
    batch: pa.RecordBatch,
    table: Table,
    first_row: int,
    question: str,
    split_column: str | None,
    file_split: str | None,
    id_column: str | None,
    image_root: Path | None,
) -> pa.Table:
    n = batch.num_rows
    labels = _strings(batch, "label")
    questions = _strings(batch, question)
    splits = _strings(batch, split_column) if split_column else [file_split] * n
    for i in range(n):
        where = f"{FLAG} {table.path}: row {first_row + i}"
        if (labels[i] or "").strip().lower() not in LABELS:
            raise UserError(
                f"{where}: label {labels[i]!r} is not yes or no; write yes or no in the label column"
            )
        if not questions[i]:
            raise UserError(f"{where}: empty question; fill the {question} column")
        if splits[i] not in SPLITS:
            raise UserError(
                f"{where}: category {splits[i]!r} is not random, popular or adversarial; fix the category "
                "column or name the split as FILE:SPLIT"
            )
    given = _strings(batch, id_column) if id_column else [None] * n
    ids = [
        value if value is not None else f"{table.path.name}:{first_row + i}" for i, value in enumerate(given)
    ]
    attributes = _strings(batch, "attribute") if "attribute" in batch.schema.names else [None] * n
    return pa.table(
        {
            "id": ids,
            "split": splits,
            "question": questions,
            "label": [(label or "").strip().lower() for label in labels],
            "attribute": attributes,
            "uri": locate_images(
                batch.column(batch.schema.get_field_index("image")), table, first_row, image_root
            ),
        },
        schema=PROBES,
    )


def locate_images(
    column: pa.Array, table: Table, first_row: int, image_root: Path | None
) -> list[str | None]:
    """The uri of each image cell of a batch (rows first_row...): paths resolved against `image_root`
    when given, else as `embed` does (relative to the table; bytes located by their cell)."""
    if image_root is not None and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        root = os.path.abspath(image_root)
        return [os.path.join(root, p.removeprefix("file://")) if p else None for p in column.to_pylist()]
    return [
        ref.uri if ref is not None else None for ref in image_refs(column, table.path, "image", first_row)
    ]


def _strings(batch: pa.RecordBatch, name: str) -> list[str | None]:
    column = batch.column(batch.schema.get_field_index(name))
    return pc.cast(column, pa.string()).to_pylist()


def _first(candidates: tuple[str, ...], names: list[str]) -> str | None:
    return next((c for c in candidates if c in names), None)


def _split_from_name(path: Path) -> str | None:
    match = POPE_FILE_NAME.search(path.name)
    return match.group(1) if match else None

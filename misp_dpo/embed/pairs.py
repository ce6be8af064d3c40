"""The pairs table: prompt, chosen, optional rejected, image and optional id, under any column names.

`open_pairs` checks the columns before any work (one line naming the missing column and the flag
that renames it); `PairsTable.iter_rows` yields batches with the standard column names and types,
plus the rows' image refs. Rows keep their table order and number: a pair without an `id` column
is `row-NNNNNNNNN`, its row in the table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from misp_dpo.embed.readers import ImageRef, Table, check_image_column, image_refs, open_table
from misp_dpo.errors import UserError

TEXT_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("chosen", pa.string()),
        pa.field("rejected", pa.string()),
    ]
)


@dataclass(frozen=True)
class PairColumns:
    """Column names in the user's table for each standard column."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    image: str = "image"
    id: str = "id"


class PairRows(NamedTuple):
    first_row: int  # table row of the first pair
    text: pa.RecordBatch  # TEXT_SCHEMA
    images: list[ImageRef | None]


@dataclass(frozen=True)
class PairsTable:
    table: Table
    columns: PairColumns
    has_rejected: bool
    has_id: bool

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def _source_columns(self) -> list[str]:
        c = self.columns
        return [c.prompt, c.chosen, c.image] + [c.rejected] * self.has_rejected + [c.id] * self.has_id

    def iter_rows(self, lo: int, hi: int, batch_size: int) -> Iterator[PairRows]:
        row = lo
        for batch in self.table.iter_rows(lo, hi, self._source_columns(), batch_size):
            yield PairRows(row, self._text(batch, row), self._images(batch, row))
            row += batch.num_rows

    def _text(self, batch: pa.RecordBatch, first_row: int) -> pa.RecordBatch:
        c, n = self.columns, batch.num_rows
        if self.has_id:
            ids = _as_string(batch.column(c.id))
        else:
            ids = pa.array([f"row-{first_row + i:09d}" for i in range(n)], pa.string())
        rejected = _as_string(batch.column(c.rejected)) if self.has_rejected else pa.nulls(n, pa.string())
        arrays = [ids, _as_string(batch.column(c.prompt)), _as_string(batch.column(c.chosen)), rejected]
        return pa.RecordBatch.from_arrays(arrays, schema=TEXT_SCHEMA)

    def _images(self, batch: pa.RecordBatch, first_row: int) -> list[ImageRef | None]:
        column = self.columns.image
        return image_refs(batch.column(column), self.table.path, column, first_row)


def _as_string(column: pa.Array) -> pa.Array:
    return column if column.type == pa.string() else pc.cast(column, pa.string())


def _check_text(table: Table, name: str, flag: str) -> None:
    kind = table.schema.field(name).type
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
    if not (text or pa.types.is_null(kind)):  # null: every cell empty (JSON), reported per row
        raise UserError(f"--pairs {table.path}: column {name!r} ({flag}) is {kind}; it must hold text")


def open_pairs(path: Path, columns: PairColumns) -> PairsTable:
    """Open and check the pairs table: required columns present and of the right kind."""
    table = open_table(path, "--pairs")
    names = table.schema.names
    defaults = PairColumns()
    for attr in ("prompt", "chosen"):
        name = getattr(columns, attr)
        if name not in names:
            raise UserError(
                f"--pairs {path}: no column {name!r} (columns: {', '.join(names)}); "
                f"name the {attr} column with --{attr}-column"
            )
        _check_text(table, name, f"--{attr}-column")
    check_image_column(table, columns.image, "--pairs", "--image-column")
    optional = {}
    for attr in ("rejected", "id"):
        name = getattr(columns, attr)
        optional[attr] = name in names
        if not optional[attr] and name != getattr(defaults, attr):
            raise UserError(
                f"--pairs {path}: no column {name!r} for --{attr}-column (columns: {', '.join(names)})"
            )
        if optional[attr]:
            _check_text(table, name, f"--{attr}-column")
    return PairsTable(table, columns, has_rejected=optional["rejected"], has_id=optional["id"])

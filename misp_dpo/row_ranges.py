"""Reading a row range [lo, hi) of a Parquet file or of any stream of Arrow batches.

Both the input readers (`misp_dpo.embed.readers`) and the stages reading each other's shards
(`misp_dpo.pipelines.io`) split work by row range; this is the one place that slices it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def slice_rows(batches: Iterator[pa.RecordBatch], lo: int, hi: int) -> Iterator[pa.RecordBatch]:
    """Rows [lo, hi) of a batch stream, stopping the stream as soon as `hi` is reached."""
    position = 0
    for batch in batches:
        b_lo, b_hi = max(lo - position, 0), min(hi - position, batch.num_rows)
        if b_hi > b_lo:
            yield batch.slice(b_lo, b_hi - b_lo)
        position += batch.num_rows
        if position >= hi:
            return


def read_parquet_range(
    path: Path, lo: int, hi: int, columns: list[str] | None, batch_size: int
) -> Iterator[pa.RecordBatch]:
    """Rows [lo, hi) of one Parquet file, decoding only the row groups that overlap them."""
    parquet = pq.ParquetFile(path)
    metadata = parquet.metadata
    groups: list[int] = []
    first_start, position = 0, 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if position < hi and position + rows > lo:
            if not groups:
                first_start = position
            groups.append(group)
        position += rows
    if not groups:
        return
    batches = parquet.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns)
    yield from slice_rows(batches, lo - first_start, hi - first_start)

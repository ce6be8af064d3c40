"""The only module that knows shard names, atomic writes and how Parquet is written and streamed.

Every shard is written under a temporary name in the same folder and renamed into place, so a
reader (or a resumed run) never sees half a file. Writer settings are fixed so that the same rows
always give the same bytes: resume and executors are checked by comparing checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from misp_dpo.row_ranges import read_parquet_range

SHARD_DIGITS = 5
ROW_GROUP_ROWS = 8192
_WRITER_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "write_statistics": True}


def numbered(index: int, suffix: str) -> str:
    return f"{index:0{SHARD_DIGITS}d}.{suffix}"


def shard_name(prefix: str, index: int, suffix: str = "parquet") -> str:
    return f"{prefix}-{numbered(index, suffix)}"


TEMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    """A sibling name unique to this process, so two workers never share a temporary file."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def temp_files(folder: Path) -> list[Path]:
    """Temporary files under `folder` (`.NAME.tmp-PID`): what killed writers left behind."""
    return sorted(p for p in folder.rglob(f".*{TEMP_MARK}*") if p.is_file())


def temp_target(tmp: Path) -> Path:
    """The file a temporary file was to become (`.NAME.tmp-PID` -> `NAME`)."""
    return tmp.with_name(tmp.name[1:].rsplit(TEMP_MARK, 1)[0])


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path; on success fsync and rename it to `path`, on failure remove it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ShardWriter:
    """Streams record batches into one Parquet shard that appears atomically on `close()`."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.schema = schema
        self.rows = 0
        self._tmp = temp_path(path)
        self._writer = pq.ParquetWriter(self._tmp, schema, **_WRITER_OPTIONS)

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        table = table.select(self.schema.names).cast(self.schema)
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.rows += table.num_rows

    def close(self) -> None:
        self._writer.close()
        _commit(self._tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_table(table: pa.Table, path: Path, schema: pa.Schema) -> int:
    with ShardWriter(path, schema) as writer:
        writer.write(table)
    return writer.rows


def write_json(obj: Any, path: Path) -> None:
    """Deterministic JSON (sorted keys, fixed indent), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, sort_keys=True, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def parquet_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def iter_batches(
    paths: list[Path], columns: list[str] | None = None, batch_size: int = 65536
) -> Iterator[pa.RecordBatch]:
    """Stream record batches from shards in order, one row group at a time."""
    for path in paths:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)


def read_table(paths: list[Path], columns: list[str] | None = None) -> pa.Table:
    """Read whole shards; for small tables only (stages stream large ones with `iter_batches`)."""
    tables = [pq.read_table(path, columns=columns) for path in paths]
    return pa.concat_tables(tables) if tables else pa.table({})


def vectors_to_numpy(column: pa.Array | pa.ChunkedArray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A fixed_size_list column as an (n, D) array, without going through Python objects."""
    if isinstance(column, pa.ChunkedArray):
        chunks = [vectors_to_numpy(chunk, dtype) for chunk in column.chunks]
        width = column.type.list_size
        return np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=dtype)
    width = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, width).astype(dtype, copy=False)


def numpy_to_vectors(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """An (n, D) array as a float16 fixed_size_list column (the on-disk embedding type)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def iter_row_range(
    paths: list[Path],
    rows_per_path: list[int],
    lo: int,
    hi: int,
    columns: list[str] | None = None,
    batch_size: int = 8192,
) -> Iterator[pa.RecordBatch]:
    """Stream global rows [lo, hi) of shards read back to back, touching only the row groups needed.

    Downstream stages shard their work by global row range, independently of how many tasks wrote
    their input, so this is how task *i* of a stage finds its rows.
    """
    start = 0
    for path, count in zip(paths, rows_per_path, strict=True):
        end = start + count
        if end > lo and start < hi:
            yield from read_parquet_range(path, max(lo - start, 0), min(hi, end) - start, columns, batch_size)
        start = end


def task_rows(total: int, task: int, num_tasks: int) -> tuple[int, int]:
    """The contiguous global row range [lo, hi) of `task`: sizes differ by at most one row."""
    return task * total // num_tasks, (task + 1) * total // num_tasks


def fixed_width_ids(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Equal-length ASCII ids (sha1 hex) as a numpy bytes array, zero-copy where possible.

    Sorting and `searchsorted` on this array replace a Python dict from id to row, which would cost
    ~100 bytes per entry and Python-speed lookups at a million images.
    """
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks != 1 else ids.chunk(0)
    if len(ids) == 0:
        return np.zeros(0, dtype="S1")
    ids = ids.cast(pa.string())
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32)[ids.offset : ids.offset + len(ids) + 1]
    widths = np.diff(offsets)
    if ids.null_count or widths.min() != widths.max() or widths[0] == 0:
        return np.asarray(ids.to_numpy(zero_copy_only=False), dtype="S")
    width = int(widths[0])
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view(f"S{width}")

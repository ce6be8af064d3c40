"""An image's location as one string (the `uri` of every output), and reading its bytes back.

`embed` records a uri for every image; what comes after it (the report's thumbnails, the trainer)
has nothing else to find the picture with, so a uri must locate the bytes on its own, whatever
kind of corpus they came from:

- a local file: an absolute path, `file://PATH`, or a path relative to a folder the reader names
  (the trainer: the dataset's own folder);
- a member of an uncompressed webdataset shard: `tar://MEMBER::SHARD`;
- a cell of a Parquet table holding image bytes (or Hugging Face `{bytes, path}` structs):
  `TABLE#column=NAME&row=N`, N counted from 0 over the whole file.

A dataset meant to travel with its images stores them relative to a root (`mine --uri-root`,
`relative_to`): every path above (the file, the shard, the table) may then be relative, and
readers resolve it against the root they are given (`--image-root`), as LLaVA-style training data
pairs relative image paths with an image folder.

Readers keep a small per-process cache of tar headers and Parquet row groups, so reading the
images of a batch touches each shard's headers once and each row group once.
"""

from __future__ import annotations

import functools
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TAR_SCHEME = "tar://"
FILE_SCHEME = "file://"


def tar_uri(member: str, shard: str | Path) -> str:
    return f"{TAR_SCHEME}{member}::{shard}"


def table_uri(table: str | Path, column: str, row: int) -> str:
    return f"{table}#column={quote(column)}&row={row}"


def relative_to(uris: pa.Array, root: Path) -> pa.Array:
    """`uris` whose file, shard or table lies under `root` rewritten relative to it; others as they are."""
    prefix = re.escape(str(root.resolve()).rstrip("/") + "/")
    uris = pc.replace_substring_regex(uris, pattern=f"^(?:{re.escape(FILE_SCHEME)})?{prefix}", replacement="")
    return pc.replace_substring_regex(uris, pattern=f"^tar://(.*?)::{prefix}", replacement=r"tar://\1::")


def read_uri(uri: str, root: Path | None = None) -> bytes:
    """The bytes `uri` points at. FileNotFoundError when they are gone, ValueError for a uri this
    cannot read (another scheme, a malformed locator), OSError for an unreadable container."""
    if uri.startswith(TAR_SCHEME):
        member, _, shard = uri.removeprefix(TAR_SCHEME).partition("::")
        if not member or not shard:
            raise ValueError(f"{uri!r}: a tar uri is tar://MEMBER::SHARD")
        if root is not None and not Path(shard).is_absolute():
            shard = str(root / shard)
        return _tar_member(shard, member)
    if "://" in uri and not uri.startswith(FILE_SCHEME):
        raise ValueError(f"{uri!r}: only local files, tar:// members and table cells are read")
    path_part, hash_mark, fragment = uri.removeprefix(FILE_SCHEME).partition("#")
    path = Path(path_part)
    if root is not None and not path.is_absolute():
        path = root / path
    if not hash_mark:
        return path.read_bytes()
    fields = parse_qs(fragment)
    if set(fields) != {"column", "row"} or not fields["row"][0].isdigit():
        raise ValueError(f"{uri!r}: a table uri is TABLE#column=NAME&row=N")
    return _table_cell(str(path), fields["column"][0], int(fields["row"][0]))


def tar_files(shard: str | Path) -> Iterator[tarfile.TarInfo]:
    """The regular-file headers of an uncompressed tar, in archive order, reading headers only
    (tarfile.TarError or OSError when it is not one)."""
    with tarfile.open(shard, "r:") as archive:
        while (info := archive.next()) is not None:
            archive.members.clear()  # type: ignore[attr-defined]  # tarfile would keep every header otherwise
            if info.isfile():
                yield info


@functools.lru_cache(maxsize=8)
def _tar_index(shard: str) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size)."""
    try:
        return {info.name: (info.offset_data, info.size) for info in tar_files(shard)}
    except tarfile.TarError as error:
        raise OSError(f"{shard}: not a readable uncompressed tar ({error})") from None


def _tar_member(shard: str, member: str) -> bytes:
    if not Path(shard).is_file():
        raise FileNotFoundError(f"{shard}: no such tar shard")
    located = _tar_index(shard).get(member)
    if located is None:
        raise FileNotFoundError(f"{shard}: no member {member!r}")
    offset, size = located
    with open(shard, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


@functools.lru_cache(maxsize=8)
def _group_starts(path: str) -> np.ndarray:
    """First row of each row group, then the total row count."""
    metadata = pq.ParquetFile(path).metadata
    sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])


@functools.lru_cache(maxsize=2)
def _row_group(path: str, column: str, group: int) -> pa.Array:
    parquet = pq.ParquetFile(path)
    if column not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no column {column!r}")
    return parquet.read_row_group(group, columns=[column]).column(0).combine_chunks()


def _table_cell(path: str, column: str, row: int) -> bytes:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such table")
    starts = _group_starts(path)
    if row >= starts[-1]:
        raise ValueError(f"{path}: row {row} is past the table's {int(starts[-1])} rows")
    group = int(np.searchsorted(starts, row, side="right")) - 1
    cells = _row_group(path, column, group)
    if pa.types.is_struct(cells.type):
        if cells.type.get_field_index("bytes") < 0:
            raise FileNotFoundError(f"{path}: column {column!r} holds no image bytes")
        cells = cells.field("bytes")
    value = cells[row - int(starts[group])].as_py()
    if not isinstance(value, bytes):
        raise FileNotFoundError(f"{path}: row {row} of column {column!r} holds no image bytes")
    return value

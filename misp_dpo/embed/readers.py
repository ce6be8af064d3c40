"""Input readers: the pairs table and the image corpus (a folder, a table, or webdataset tar shards).

Everything is listed before work starts (`open_*`, cheap: file names, row counts, tar headers)
and read by range afterwards (`iter_*(lo, hi)`), one batch at a time: a task holds one batch of
rows, never a whole column. Listings are Arrow arrays (picklable, compact), not Python lists.
Images are not read here, only located: an `ImageRef` says where the bytes are.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from misp_dpo.errors import UserError
from misp_dpo.image_uris import table_uri, tar_files, tar_uri
from misp_dpo.row_ranges import read_parquet_range, slice_rows

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TABLE_FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
}


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: inline, a whole file, or `size` bytes at `offset` of a file."""

    uri: str  # what the outputs record (`misp_dpo.image_uris`): a path, tar:// member or table cell
    path: str | None = None
    data: bytes | None = None
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        with open(self.path, "rb") as handle:
            if self.size < 0:
                return handle.read()
            handle.seek(self.offset)
            return handle.read(self.size)


# ----------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Table:
    """A Parquet, JSONL or CSV file: its schema and row count, read by row range."""

    path: Path  # absolute
    format: str
    schema: pa.Schema
    num_rows: int

    def iter_rows(self, lo: int, hi: int, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        """Rows [lo, hi) of `columns`, in batches of at most `batch_size` rows."""
        if hi <= lo:
            return
        if self.format == "parquet":
            batches = read_parquet_range(self.path, lo, hi, columns, batch_size)
        else:
            batches = slice_rows(self._stream(columns), lo, hi)
        yield from _rebatch(batches, batch_size)

    def _stream(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        if self.format == "csv":
            # every CSV cell is text: a prompt "42" or an id "007" must not become a number
            convert = pacsv.ConvertOptions(
                column_types={name: pa.string() for name in columns}, include_columns=columns
            )
            yield from pacsv.open_csv(self.path, convert_options=convert)
        else:
            for batch in pajson.open_json(self.path):
                yield pa.RecordBatch.from_arrays([batch.column(c) for c in columns], names=columns)


def _rebatch(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Exactly `size` rows per batch (the last one shorter), whatever the file's own block sizes."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        pending.append(batch)
        rows += batch.num_rows
        while rows >= size:
            table = pa.Table.from_batches(pending).combine_chunks()
            yield table.slice(0, size).to_batches()[0]
            rest = table.slice(size)
            pending, rows = (rest.to_batches() if rest.num_rows else []), rest.num_rows
    if rows:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def open_table(path: Path, flag: str) -> Table:
    """Schema and row count of a table; a `UserError` naming `flag` when it cannot be read."""
    fmt = TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{flag} {path}: not a table; use .parquet, .jsonl or .csv")
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        if fmt == "parquet":
            meta = pq.ParquetFile(path).metadata
            return Table(Path(os.path.abspath(path)), fmt, meta.schema.to_arrow_schema(), meta.num_rows)
        reader = pacsv.open_csv(path) if fmt == "csv" else pajson.open_json(path)
        schema, rows = reader.schema, sum(batch.num_rows for batch in reader)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{flag} {path}: not readable as {fmt} ({str(error).splitlines()[0]})") from None
    return Table(Path(os.path.abspath(path)), fmt, schema, rows)


def check_image_column(table: Table, name: str, flag: str, column_flag: str) -> None:
    """The image column exists and holds paths, bytes or `{bytes, path}` structs."""
    if name not in table.schema.names:
        raise UserError(
            f"{flag} {table.path}: no column {name!r} (columns: {', '.join(table.schema.names)}); "
            f"name the image column with {column_flag}"
        )
    kind = table.schema.field(name).type
    ok = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
    if pa.types.is_struct(kind):
        ok = {"bytes", "path"} & {kind.field(i).name for i in range(kind.num_fields)} != set()
    if not ok:
        raise UserError(
            f"{flag} {table.path}: column {name!r} is {kind}; it must hold paths (relative to the "
            "table), image bytes, or {bytes, path} structs as Hugging Face datasets write them"
        )


def image_refs(column: pa.Array, table: Path, name: str, first_row: int) -> list[ImageRef | None]:
    """Refs of one batch of the image column `name`; None where a cell is null (no image given).
    Bytes stored in the table are located by their cell (a struct's `path` is only a file name)."""
    kind = column.type
    if pa.types.is_struct(kind):
        names = {kind.field(i).name for i in range(kind.num_fields)}
        blobs = column.field("bytes").to_pylist() if "bytes" in names else [None] * len(column)
        paths = column.field("path").to_pylist() if "path" in names else [None] * len(column)
        valid = column.is_valid().to_pylist()
    elif pa.types.is_binary(kind):
        blobs, paths, valid = column.to_pylist(), [None] * len(column), [True] * len(column)
    else:
        blobs, paths, valid = [None] * len(column), column.to_pylist(), [True] * len(column)
    refs: list[ImageRef | None] = []
    for i, (blob, path, present) in enumerate(zip(blobs, paths, valid, strict=True)):
        if present and blob is not None:
            refs.append(ImageRef(uri=table_uri(table, name, first_row + i), data=blob))
        elif present and path:
            local = os.path.abspath(os.path.join(table.parent, path.removeprefix("file://")))
            refs.append(ImageRef(uri=local, path=local))
        else:
            refs.append(None)
    return refs


# ----------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class FolderCorpus:
    """Image files under a folder, recursively, sorted by relative path."""

    root: Path
    paths: pa.Array  # relative POSIX paths
    skipped: int  # files without an image extension

    @property
    def num_items(self) -> int:
        return len(self.paths)

    def iter_refs(self, lo: int, hi: int, batch_size: int) -> Iterator[list[ImageRef | None]]:
        for start in range(lo, hi, batch_size):
            names = self.paths.slice(start, min(batch_size, hi - start)).to_pylist()
            yield [ImageRef(uri=str(self.root / n), path=str(self.root / n)) for n in names]


@dataclass(frozen=True)
class TableCorpus:
    """Images named by a column of a table (paths, bytes or `{bytes, path}` structs)."""

    table: Table
    column: str

    @property
    def num_items(self) -> int:
        return self.table.num_rows

    def iter_refs(self, lo: int, hi: int, batch_size: int) -> Iterator[list[ImageRef | None]]:
        row = lo
        for batch in self.table.iter_rows(lo, hi, [self.column], batch_size):
            yield image_refs(batch.column(0), self.table.path, self.column, row)
            row += batch.num_rows


@dataclass(frozen=True)
class TarCorpus:
    """Image members of webdataset `.tar` shards, located by their headers (read without extracting)."""

    shards: tuple[str, ...]
    shard: pa.Array  # int32, index into shards
    member: pa.Array  # string
    offset: pa.Array  # int64, start of the member's data
    size: pa.Array  # int64

    @property
    def num_items(self) -> int:
        return len(self.member)

    def iter_refs(self, lo: int, hi: int, batch_size: int) -> Iterator[list[ImageRef | None]]:
        for start in range(lo, hi, batch_size):
            n = min(batch_size, hi - start)
            columns = [
                a.slice(start, n).to_pylist() for a in (self.shard, self.member, self.offset, self.size)
            ]
            yield [
                ImageRef(uri=tar_uri(m, self.shards[s]), path=self.shards[s], offset=o, size=z)
                for s, m, o, z in zip(*columns, strict=True)
            ]


Corpus = FolderCorpus | TableCorpus | TarCorpus


def list_folder(root: Path) -> FolderCorpus:
    """Every image file under `root` (dot-files and dot-folders excluded), sorted by relative path."""
    root = Path(os.path.abspath(root))
    chunks: list[pa.Array] = []
    skipped = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = os.path.relpath(folder, root)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        names = [f for f in files if not f.startswith(".")]
        images = [prefix + f for f in names if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        skipped += len(names) - len(images)
        if images:
            chunks.append(pa.array(images, pa.string()))
    paths = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())
    return FolderCorpus(root, paths.take(pc.sort_indices(paths)), skipped)


def list_tars(shards: list[Path], flag: str) -> TarCorpus:
    """Image members of each shard, in shard order then archive order (as webdataset reads them).

    Each shard's headers become Arrow arrays before the next shard is read, so the listing never
    holds the whole corpus as Python objects (only one shard's headers at a time).
    """
    shard_index, members, offsets, sizes = [], [], [], []
    for s, shard in enumerate(shards):
        member, offset, size = _tar_members(shard, flag)
        shard_index.append(pa.array(np.full(len(member), s, np.int32)))
        members.append(member)
        offsets.append(offset)
        sizes.append(size)
    return TarCorpus(
        tuple(os.path.abspath(s) for s in shards),
        *(pa.concat_arrays(chunks) for chunks in (shard_index, members, offsets, sizes)),
    )


def _tar_members(shard: Path, flag: str) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(name, data offset, size) of the image members of one uncompressed tar, from its headers."""
    members, offsets, sizes = [], [], []
    try:
        for info in tar_files(shard):
            if os.path.splitext(info.name)[1].lower() in IMAGE_EXTENSIONS:
                members.append(info.name)
                offsets.append(info.offset_data)
                sizes.append(info.size)
    except (tarfile.TarError, OSError) as error:
        raise UserError(f"{flag} {shard}: not a readable uncompressed tar ({error})") from None
    return pa.array(members, pa.string()), pa.array(offsets, pa.int64()), pa.array(sizes, pa.int64())


def expand_braces(pattern: str) -> list[str]:
    """webdataset shard notation: `shard-{000..009}.tar` and `{a,b}` alternatives."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def open_corpus(spec: str, image_column: str, flag: str = "--corpus") -> Corpus:
    """A folder of images, a table with an image column, or tar shards (a file, a folder of them,
    a glob or a brace pattern)."""
    if any(ch in spec for ch in "*?[{"):
        paths = sorted({Path(p) for pattern in expand_braces(spec) for p in glob.glob(pattern)})
        if not paths or any(p.suffix != ".tar" for p in paths):
            raise UserError(f"{flag} {spec}: the pattern must match .tar shards (matched {len(paths)} files)")
        return list_tars(paths, flag)
    path = Path(spec)
    if path.is_dir():
        folder = list_folder(path)
        if folder.num_items:
            return folder
        tars = sorted(path.glob("*.tar"))
        if tars:
            return list_tars(tars, flag)
        raise UserError(
            f"{flag} {path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) or .tar shards"
        )
    if path.suffix == ".tar" and path.is_file():
        return list_tars([path], flag)
    table = open_table(path, flag)
    check_image_column(table, image_column, flag, "--corpus-image-column")
    return TableCorpus(table, image_column)

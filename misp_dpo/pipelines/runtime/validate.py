"""`misp-dpo validate DIR`: is this stage output whole and unaltered?"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from misp_dpo.pipelines.io import sha256_file, temp_files
from misp_dpo.pipelines.manifest import read_manifest
from misp_dpo.pipelines.runtime.tasks import task_done
from misp_dpo.pipelines.schemas import schema_id


def validate_output(folder: Path) -> tuple[list[str], str]:
    """(problems, one-line summary); no problems means every shard and file matches the manifest."""
    manifest = read_manifest(folder)
    problems: list[str] = []
    schemas_by_prefix: dict[str, str | None] = {}
    for record in manifest.shards + manifest.files:
        path = folder / record.path
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
            continue
        if sha256_file(path) != record.sha256:
            problems.append(f"{path}: checksum differs from the manifest (file changed after the run)")
        if record.rows is None:
            continue
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, ValueError) as error:
            problems.append(f"{path}: not readable as Parquet ({error})")
            continue
        if parquet.metadata.num_rows != record.rows:
            problems.append(f"{path}: {parquet.metadata.num_rows} rows, manifest says {record.rows}")
        found = schema_id(parquet.schema_arrow)
        prefix = record.path.rsplit("-", 1)[0]
        if found is None:
            problems.append(f"{path}: no misp-dpo schema name in its metadata")
        elif schemas_by_prefix.setdefault(prefix, found) != found:
            problems.append(f"{path}: schema {found}, other {prefix} shards have {schemas_by_prefix[prefix]}")
    listed = {r.path for r in manifest.shards}
    for path in sorted(folder.glob("*.parquet")):
        if path.name not in listed:
            problems.append(f"{path}: data shard not listed in the manifest")
    for path in temp_files(folder):
        problems.append(
            f"{path}: stray temporary file of an interrupted write (not part of the output); delete it"
        )
    missing = [t for t in range(manifest.num_tasks) if not task_done(folder, t, manifest.config_hash)]
    if missing:
        problems.append(f"{folder}: tasks {missing[:5]} have no stats file for this config")
    rows = sum(r.rows or 0 for r in manifest.shards)
    summary = (
        f"{folder}: `{manifest.stage}` output, {len(manifest.shards)} shards, {rows} rows, "
        f"{len(manifest.files)} other files, {manifest.num_tasks} tasks: "
        + ("OK" if not problems else f"{len(problems)} problem(s)")
    )
    return problems, summary

"""`manifest.json`: what a finished stage output holds, how it was made, and from which inputs.

A stage reads its inputs through their manifests only (never another stage's internals), and the
hash of an input's manifest enters the config hash, so that a changed input invalidates resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from misp_dpo import __version__
from misp_dpo.errors import UserError
from misp_dpo.pipelines.io import read_json, write_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "misp_dpo.manifest/1"


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the stage folder
    sha256: str
    rows: int | None = None  # Parquet shards only


@dataclass(frozen=True)
class Manifest:
    stage: str
    config: dict[str, Any]
    config_hash: str
    inputs: dict[str, str]  # input name -> sha256 of that input's manifest.json
    meta: dict[str, Any]  # stage facts other stages rely on: model name, embedding dim, ...
    num_tasks: int
    shards: list[FileRecord]
    files: list[FileRecord]  # non-shard outputs: weights, dataset card, report
    stats: dict[str, Any]
    version: str = __version__
    format: str = MANIFEST_FORMAT
    root: Path = field(default=Path("."), compare=False)

    def shard_paths(self, prefix: str) -> list[Path]:
        """Data shards named `prefix-NNNNN.parquet`, in task order."""
        return [self.root / s.path for s in self.shards if s.path.startswith(prefix + "-")]

    def rows(self, prefix: str) -> int:
        return sum(s.rows or 0 for s in self.shards if s.path.startswith(prefix + "-"))

    def write(self, folder: Path) -> None:
        payload = dataclasses.asdict(self)
        payload.pop("root")
        write_json(payload, folder / MANIFEST)


def manifest_hash(folder: Path) -> str:
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()


def read_manifest(folder: Path, stage: str | tuple[str, ...] | None = None, flag: str = "") -> Manifest:
    """Load a finished stage's manifest (of `stage`, or of any stage when None), or fail in one line."""
    stages = (stage,) if isinstance(stage, str) else stage or ()
    wanted = " or ".join(f"`{s}`" for s in stages) or "misp-dpo"
    where = f"{flag} {folder}" if flag else str(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"{where}: no such folder; point it at the output of a finished {wanted} stage")
    if not path.is_file():
        raise UserError(
            f"{where}: no manifest.json, so this is not a finished {wanted} output; "
            f"run (or finish) `misp-dpo {stages[0] if stages else '<stage>'}` into it first"
        )
    try:
        payload = read_json(path)
        shards = [FileRecord(**s) for s in payload.pop("shards")]
        files = [FileRecord(**s) for s in payload.pop("files")]
        manifest = Manifest(shards=shards, files=files, root=folder, **payload)
    except (ValueError, TypeError, KeyError) as error:
        raise UserError(f"{path}: unreadable manifest ({error}); rerun the stage with --overwrite") from None
    if manifest.format != MANIFEST_FORMAT:
        raise UserError(f"{path}: manifest format {manifest.format!r}, expected {MANIFEST_FORMAT!r}")
    if stages and manifest.stage not in stages:
        raise UserError(f"{where}: holds a `{manifest.stage}` output, expected {wanted}")
    return manifest

"""Pipeline TOML files: one table per stage, in run order, with `{root}`-style variables.

    root = "runs/demo"          # top-level scalars are variables, usable as {root} in any string
    [synth]
    out = "{root}/synth"
    [embed]
    pairs = "{root}/synth/pairs.parquet"
    workers = 2                 # run options may be set per stage; flags of `misp-dpo run` win

Tables are read in file order; each is built into the stage's config exactly as its flags would be.
A `[slurm]` table (with `[slurm.STAGE]` overrides) is not a stage: it sets the resources of the
generated sbatch scripts (see `misp_dpo.pipelines.runtime.slurm`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from misp_dpo.config import build_config, flat_fields
from misp_dpo.errors import UserError
from misp_dpo.log import LOGGER
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.stage import Stage

SECTIONS = ("slurm",)  # top-level tables that are settings, not stages


def _substitute(value: Any, variables: dict[str, Any], where: str) -> Any:
    if isinstance(value, str):
        try:
            return value.format_map(variables)
        except KeyError as error:
            raise UserError(
                f"{where}: unknown variable {{{error.args[0]}}}; define it at the top of the file"
            ) from None
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    return value


def read_pipeline(path: Path, root: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parsed document and its variables (`root` overridden when given)."""
    if not path.is_file():
        raise UserError(f"{path}: no such pipeline file (try configs/demo.toml)")
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML ({error})") from None
    variables = {k: v for k, v in document.items() if not isinstance(v, dict)}
    if root is not None:
        variables["root"] = root
    return document, variables


def substitute_table(table: dict[str, Any], variables: dict[str, Any], where: str) -> dict[str, Any]:
    # keys may be spelled like the flags (batch-size) or like the fields (batch_size)
    return {k.replace("-", "_"): _substitute(v, variables, where) for k, v in table.items()}


Registry = Mapping[str, Stage[Any]]  # stage name -> stage; the CLI passes misp_dpo.pipelines.stages.STAGES


def load_pipeline(
    path: Path, registry: Registry, root: str | None = None, overrides: dict[str, Any] | None = None
) -> list[tuple[Stage[Any], Any, RunOptions]]:
    """Parse and validate every stage of a pipeline file before any of them runs."""
    document, variables = read_pipeline(path, root)
    run_keys = {f.name for f, _ in flat_fields(RunOptions)}
    stages = []
    for name, table in ((k, v) for k, v in document.items() if isinstance(v, dict) and k not in SECTIONS):
        if name not in registry:
            raise UserError(f"{path}: [{name}] is not a stage; stages are {', '.join(registry)}")
        where = f"{path} [{name}]"
        values = substitute_table(table, variables, where)
        run_values = {k: v for k, v in values.items() if k in run_keys} | (overrides or {})
        stage = registry[name]
        cfg = build_config(stage.config, {k: v for k, v in values.items() if k not in run_keys}, where)
        stages.append((stage, cfg, build_config(RunOptions, run_values, where)))
    return stages


def select_stages(
    stages: list[tuple[Stage[Any], Any, RunOptions]],
    registry: Registry,
    path: Path,
    until: str | None,
    only: str | None,
) -> list[tuple[Stage[Any], Any, RunOptions]]:
    """The stages `--until` / `--only` ask for, in file order."""
    names = [stage.name for stage, _, _ in stages]
    for flag, name in (("--until", until), ("--only", only)):
        if name is not None and name not in registry:
            raise UserError(f"{flag} {name}: not a stage; stages are {', '.join(registry)}")
    if until is not None and only is not None:
        raise UserError("--until and --only: give one of them")
    if only is not None:
        if only not in names:
            raise UserError(f"--only {only}: {path} has no [{only}] table; it has {', '.join(names)}")
        return [s for s in stages if s[0].name == only]
    if until is not None and until not in names:
        LOGGER.warning(f"--until {until}: {path} has no [{until}] table; running all of its stages")
        return stages
    return stages[: names.index(until) + 1] if until is not None else stages


def run_pipeline(
    path: Path,
    registry: Registry,
    until: str | None = None,
    root: str | None = None,
    overrides: dict[str, Any] | None = None,
    only: str | None = None,
) -> None:
    for stage, cfg, opts in select_stages(
        load_pipeline(path, registry, root, overrides), registry, path, until, only
    ):
        manifest = run_stage(stage, cfg, opts)
        if manifest is None:  # a Slurm array task finished its share; later stages need every share
            return

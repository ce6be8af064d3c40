"""The `misp-dpo` command line: one command per stage, each flag a field of the stage's config.

Commands are generated from the config dataclasses, so a flag's help and default are the field's
own and cannot drift from what the stage does. No logic lives here: build the config, call the runner.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional, get_args, get_origin

import typer

from misp_dpo import __version__
from misp_dpo.config import build_config, flat_fields
from misp_dpo.errors import UserError
from misp_dpo.log import configure_logging
from misp_dpo.pipelines.runtime.pipeline_file import run_pipeline
from misp_dpo.pipelines.runtime.runner import RunOptions, run_stage
from misp_dpo.pipelines.runtime.slurm_submit import submit_pipeline
from misp_dpo.pipelines.runtime.validate import validate_output
from misp_dpo.pipelines.stages import STAGES

app = typer.Typer(
    help="Mine multi-negative preference datasets for vision-language models (MISP-DPO) and train on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)


def _cli_type(kind: Any) -> Any:
    """Typer-friendly annotation: a tuple is a repeatable flag whose values may also be comma-separated
    (`--probes a.json --probes b.json` = `--probes a.json,b.json`), joined and parsed by `build_config`."""
    origin = get_origin(kind)
    if origin is tuple:
        return list[str]
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(kind) if a is not type(None)][0]
        return Optional[_cli_type(inner)]  # noqa: UP045 - typer needs typing.Optional at runtime
    return kind


def _parameter(f: dataclasses.Field[Any], kind: Any) -> inspect.Parameter:
    help_text = f.metadata.get("help", "")
    required = f.default is dataclasses.MISSING
    default = ... if required else f.default
    if isinstance(default, tuple):
        default = [",".join(str(v) for v in default)] if default else []
    if f.metadata.get("argument"):
        info = typer.Argument(default, help=help_text, show_default=not required)
    else:
        flag = "--" + f.name.replace("_", "-")
        names = [f"{flag}/--no-{flag[2:]}"] if kind is bool and default is True else [flag]
        info = typer.Option(default, *names, help=help_text, show_default=not required)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=_cli_type(kind))


def _stage_command(name: str) -> None:
    stage = STAGES[name]
    stage_fields = flat_fields(stage.config)
    stage_names = {f.name for f, _ in stage_fields}
    run_fields = [(f, k) for f, k in flat_fields(RunOptions) if f.name not in stage_names]
    # Typer lists positional arguments in signature order: put them first.
    ordered = sorted(stage_fields, key=lambda fk: not fk[0].metadata.get("argument")) + run_fields
    parameters = [_parameter(f, kind) for f, kind in ordered]

    def command(**values: Any) -> None:
        values = {k: ",".join(v) if isinstance(v, list) else v for k, v in values.items()}
        run_names = {f.name for f, _ in run_fields}
        opts = build_config(RunOptions, {k: v for k, v in values.items() if k in run_names}, "flags")
        cfg = build_config(stage.config, {k: v for k, v in values.items() if k not in run_names}, "flags")
        configure_logging(opts.log_format)
        run_stage(stage, cfg, opts)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    doc = inspect.getdoc(stage) or ""
    app.command(name=name, help=doc, short_help=doc.split("\n")[0])(command)


for _name in STAGES:
    _stage_command(_name)


@app.command("run")
def run_command(
    pipeline: Path = typer.Argument(
        ..., help="pipeline TOML: one table per stage, keys = that stage's flags"
    ),
    until: Optional[str] = typer.Option(None, help="stop after this stage (e.g. embed)"),  # noqa: UP045
    only: Optional[str] = typer.Option(None, help="run just this stage of the file"),  # noqa: UP045
    root: Optional[str] = typer.Option(None, help="override the TOML's `root` variable"),  # noqa: UP045
    executor: Optional[str] = typer.Option(None, help="local | slurm | ray, for every stage"),  # noqa: UP045
    workers: Optional[int] = typer.Option(None, help="concurrent tasks, for every stage"),  # noqa: UP045
    overwrite: bool = typer.Option(False, help="redo stages whose config changed"),
    log_format: str = typer.Option("auto", help="auto | text | json"),
    ray_address: Optional[str] = typer.Option(  # noqa: UP045
        None, help="--executor ray: address of an existing Ray cluster (default: start a local one)"
    ),
    finalize_only: bool = typer.Option(
        False, help="only merge finished tasks' stats into each stage's manifest (Slurm merge jobs)"
    ),
    submit: bool = typer.Option(False, help="--executor slurm: write one sbatch array per stage and submit"),
    dry_run: bool = typer.Option(False, help="--executor slurm: print the sbatch scripts, submit nothing"),
    slurm: list[str] = typer.Option(  # noqa: B006
        [],
        help="KEY=VALUE of the TOML's slurm table, for every stage (e.g. partition=gpu); wins over the TOML",
    ),
    max_array_size: Optional[int] = typer.Option(  # noqa: UP045
        None, help="largest Slurm array (default: MaxArraySize from scontrol, else 1001)"
    ),
) -> None:
    """Run the stages of a pipeline TOML in order, skipping those already complete."""
    configure_logging(log_format)  # type: ignore[arg-type]
    overrides = {
        "executor": executor,
        "workers": workers,
        "overwrite": overwrite or None,
        "log_format": log_format,
        "ray_address": ray_address,
        "finalize_only": finalize_only or None,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if submit or dry_run:
        text = submit_pipeline(
            pipeline,
            STAGES,
            dry_run=dry_run,
            max_array_size=max_array_size,
            slurm_flags=slurm,
            until=until,
            only=only,
            root=root,
            overrides=overrides,
        )
        print(text, end="")
        return
    run_pipeline(pipeline, STAGES, until=until, only=only, root=root, overrides=overrides)


@app.command("validate")
def validate_command(folder: Path = typer.Argument(..., help="a stage output folder")) -> None:
    """Check a stage output: manifest, shard schemas, row counts and checksums."""
    configure_logging("text")
    problems, summary = validate_output(folder)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print(summary)
    if problems:
        raise typer.Exit(1)


@app.command("version")
def version_command() -> None:
    """Print the installed version."""
    print(__version__)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)

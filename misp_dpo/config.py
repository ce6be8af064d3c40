"""Config dataclasses: every field documented where it is declared, loaded the same way from flags and TOML.

A field's metadata carries its help text (shown by `--help`), whether it is a positional argument,
and whether it counts towards the config hash that guards resume (output paths do not). Nested
dataclasses are flattened: their fields are flags and TOML keys of the enclosing stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

from misp_dpo.errors import UserError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
_MISSING: Any = dataclasses.MISSING


def option(
    default: Any = _MISSING, help: str = "", *, argument: bool = False, hashed: bool | str = True
) -> Any:
    """A documented config field. `argument=True` makes it positional on the command line.

    `hashed`: True, the field counts towards the config hash; False, it does not (output paths);
    "unless-default", it counts only when set away from its default: a setting added after outputs
    were made, whose default reproduces them, so those outputs keep their hash and still resume.
    """
    metadata = {"help": help, "argument": argument, "hashed": hashed}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults: configs are frozen")
    return dataclasses.field(default=default, metadata=metadata)


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flat_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """(field, resolved type) for every leaf field, nested dataclasses expanded in place."""
    hints = field_types(cls)
    leaves: list[tuple[dataclasses.Field[Any], Any]] = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            leaves.extend(flat_fields(kind))
        else:
            leaves.append((f, kind))
    return leaves


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(kind) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], where)
    if origin is Literal:
        if value not in get_args(kind):
            choices = ", ".join(repr(c) for c in get_args(kind))
            raise UserError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = get_args(kind)[0]
        if isinstance(value, str) and inner in (int, float):  # "1,0.5" from a flag
            try:
                items = [inner(item.strip()) for item in items]
            except ValueError:
                raise UserError(f"{where}: expected numbers separated by commas, got {value!r}") from None
        return tuple(_coerce(item, inner, where) for item in items)
    if kind is Path:
        return Path(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and not isinstance(value, kind):
        raise UserError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def build_config(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build a (possibly nested) config from flat key/values; unknown keys are an error naming `where`."""
    hints = field_types(cls)
    known = {f.name for f, _ in flat_fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            sub = {k: v for k, v in values.items() if k in {g.name for g, _ in flat_fields(kind)}}
            kwargs[f.name] = build_config(kind, sub, where)
        elif f.name in values:
            kwargs[f.name] = _coerce(values[f.name], kind, f"{where}: {f.name}")
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise UserError(f"{where}: missing required key {f.name!r} ({f.metadata.get('help', '')})")
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise UserError(f"{where}: {error}") from None


def to_dict(config: Any, hashed_only: bool = False) -> dict[str, Any]:
    """Flat JSON-ready dict of a config; `hashed_only` drops fields (output paths) outside the hash."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_dict(value, hashed_only))
            continue
        hashed = f.metadata.get("hashed", True)
        if hashed_only and (not hashed or (hashed == "unless-default" and value == f.default)):
            continue
        out[f.name] = _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def stable_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

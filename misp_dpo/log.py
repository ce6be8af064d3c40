"""The package's one logger and its progress bars: text and bars on a terminal, JSON lines otherwise."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from typing import Any, Literal

from tqdm.auto import tqdm

LOGGER = logging.getLogger("misp_dpo")
LogFormat = Literal["auto", "text", "json"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {"level": record.levelname.lower(), "message": record.getMessage()}
        payload.update(getattr(record, "fields", {}))
        return json.dumps(payload, sort_keys=True, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname} {record.getMessage()}"
        return line + "".join(f" {k}={v}" for k, v in fields.items())


def resolve_format(log_format: LogFormat) -> Literal["text", "json"]:
    """`auto` means text with progress bars on a terminal and JSON lines when piped (cluster logs)."""
    if log_format == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return log_format


def configure_logging(log_format: LogFormat = "auto", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if resolve_format(log_format) == "json" else _TextFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False


def log_event(message: str, **fields: Any) -> None:
    """An INFO record whose keyword fields become keys of the JSON line (`k=v` pairs in text)."""
    LOGGER.info(message, extra={"fields": fields})


def bars_enabled() -> bool:
    json_logs = any(isinstance(h.formatter, JsonFormatter) for h in LOGGER.handlers)
    return sys.stderr.isatty() and not json_logs


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar (`update`, `set_postfix`, iteration) that is silent when no human is watching."""
    disable = bool(kwargs.pop("disable", False)) or not bars_enabled()
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)

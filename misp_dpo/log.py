"""The package's one logger and its progress bars: text and bars on a terminal, JSON lines otherwise.

Every JSON line carries an ISO 8601 UTC `time`. Python warnings (`warnings.warn` from any library)
and records of libraries that log through the standard `logging` tree (datasets, huggingface_hub,
open_clip, ...) reach the same handler, so they come out as our lines, not as raw text between them.
The handler writes through `tqdm.write`, which lifts a live progress bar off the terminal line before
printing, so bars and log lines never share a line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import huggingface_hub.utils
from tqdm.auto import tqdm

LOGGER = logging.getLogger("misp_dpo")
LogFormat = Literal["auto", "text", "json"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        payload: dict[str, Any] = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        if record.name != LOGGER.name:
            payload["logger"] = record.name  # py.warnings, datasets, ...
        payload.update(getattr(record, "fields", {}))
        return json.dumps(payload, sort_keys=True, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname} {record.getMessage()}"
        if record.name != LOGGER.name:
            line += f" [{record.name}]"
        return line + "".join(f" {k}={v}" for k, v in fields.items())


def resolve_format(log_format: LogFormat) -> Literal["text", "json"]:
    """`auto` means text with progress bars on a terminal and JSON lines when piped (cluster logs)."""
    if log_format == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return log_format


class _TqdmHandler(logging.Handler):
    """Writes each record with `tqdm.write`, which keeps live progress bars off the record's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 -- logging must never raise (logging.Handler.handleError's rule)
            self.handleError(record)


def configure_logging(log_format: LogFormat = "auto", level: int = logging.INFO) -> None:
    """Our records at `level`, and third-party warnings (Python warnings, libraries' WARNING records
    that reach the root logger) through the same handler and format."""
    handler = _TqdmHandler()
    handler.setFormatter(JsonFormatter() if resolve_format(log_format) == "json" else _TextFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False
    logging.captureWarnings(True)
    root = logging.getLogger()  # other handlers there (pytest's capture) stay
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _TqdmHandler)] + [handler]
    if not bars_enabled():  # the Hub's and transformers' own bars (weights loading) would break log lines
        huggingface_hub.utils.disable_progress_bars()


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

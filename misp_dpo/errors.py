"""Errors the user can fix.

A `UserError` is printed by the CLI as one line (no traceback): its message must name the file,
column or flag at fault and the fix. Anything else is a bug and keeps its traceback.
"""

import re


class UserError(Exception):
    """Bad input or configuration, reported as one line naming the problem and the fix."""


class OutputMadeOtherwise(UserError):
    """An output folder made with another config or inputs: `--overwrite` replaces it (a cache, such as
    bench/downstream.py's, replaces it without asking; any other `UserError` still stops it)."""


# An object's repr such as `<_io.BytesIO object at 0x7f...>`: its address differs on every run.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def in_words(error: BaseException) -> str:
    """An error's message without object reprs, so a per-item failure's detail is the same on every run."""
    return _OBJECT_REPR.sub("", str(error)).strip()

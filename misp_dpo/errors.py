"""Errors the user can fix.

A `UserError` is printed by the CLI as one line (no traceback): its message must name the file,
column or flag at fault and the fix. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or configuration, reported as one line naming the problem and the fix."""

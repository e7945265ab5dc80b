"""The one kind of failure a user can act on: the CLI prints its message (no traceback) and exits 1.

Every module's own error derives from `StageError` (and from the builtin it refines), so the CLI needs no list of
them: bad params, a malformed record (file, line, field), a missing model, a broken data contract, ...
"""

from __future__ import annotations


class StageError(Exception):
    """A failure with a message that says what is wrong and where; nothing finished is lost."""

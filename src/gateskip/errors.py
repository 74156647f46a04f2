"""One exception type for every problem a user can fix.

The CLI prints ``GateSkipError`` as a single line (no traceback) and exits non-zero; library users
catch it like any ``ValueError``.
"""


class GateSkipError(ValueError):
    """A problem with the user's input, named together with the fix."""

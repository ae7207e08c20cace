"""One exception type for problems a user can fix (bad input, missing files, mismatched configs).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class XLNetError(Exception):
    """A user-facing error whose message is one line that names the offending file, tensor or field."""

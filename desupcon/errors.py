"""The toolkit's own error types.

Every error that reports a problem with what the user gave (a setting, a dataset, a file, an
output folder) derives from `DesupconError`; the command line prints those as one line,
`error: <message>`, and exits with status 2. Anything else is a bug and keeps its traceback
(`--debug` shows the traceback of every error). Each concrete type also derives from the builtin
it replaced (`ValueError`, `OSError`, ...), so `except ValueError` and the like still catch it.
"""

from __future__ import annotations


class DesupconError(Exception):
    """Base class of the errors the command line reports as one line (see the module docstring)."""


class ConfigError(DesupconError, ValueError):
    """An invalid setting; the message names it, its value and the allowed range."""


class InputFileError(DesupconError, OSError):
    """A file named on the command line is missing or cannot be read; the message names it."""


class MissingInputsError(DesupconError, FileNotFoundError):
    """Several inputs of one command are missing (the data and the teacher, say); the message
    names each of them, so that one rerun can fix them all."""

"""Errors caused by what the user gave (a file, a flag, a checkpoint, an output place), as opposed
to bugs.

Each is a :class:`UserError` *and* the built-in type the library raised for that case before
(``ValueError``, ``FileNotFoundError``, ``OSError``), so code catching the built-in type keeps
working. The command lines (``mtbert-train``, ``python -m mtbert.data``) print the message of a
``UserError`` on one line and exit with status 2 (``--debug``: the traceback); any other
exception is a bug and keeps its traceback and exit status 1.
"""
import sys
import traceback


class UserError(Exception):
    """Base of the errors the user can fix; the message says which file, line, key or flag, and what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (data file, checkpoint, model) does not exist."""


class DataFileError(UserError, ValueError):
    """A data file that cannot be used: not UTF-8 text, binary, empty, missing a column, no usable rows."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed: truncated, not a PyTorch file, or not a training checkpoint."""


class ConfigError(UserError, ValueError):
    """A setting out of range, inconsistent with another, or contradicting a resumed checkpoint."""


class OutputError(UserError, OSError):
    """An output that cannot be written (a path under a regular file, a full disk, no permission)."""


class DownloadError(UserError, RuntimeError):
    """A download that failed (no network, a wrong URL) or brought an unusable file."""


def make_directory(path, purpose="output directory"):
    """``mkdir -p path``, or an :class:`OutputError` naming it (e.g. a path under a regular file)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the {purpose} {path}: {err.strerror} ({err.filename})") from err
    return path


def run_command(prog, run, debug=False) -> int:
    """Runs a command line's body ``run()`` and returns its exit status; a :class:`UserError` prints
    ``prog: error: <message>`` on one line (after the traceback when ``debug``) and gives status 2.
    Other exceptions propagate: a bug keeps its traceback and Python's exit status 1."""
    try:
        return run()
    except UserError as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2

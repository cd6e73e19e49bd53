"""Loads the compiled extension ``mtbert._C`` and exposes its ops (``torch.ops.mtbert``).

Everything that does not need the extension works without it; whatever needs it calls
:func:`ops`, which raises an error saying how to build it.
"""
import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.mtbert.*)

    IMPORT_ERROR = None
except ImportError as err:
    IMPORT_ERROR = err

BUILD_HINT = (
    "mtbert._C, the compiled extension, is not available ({err}). Build it from the repository "
    "root with `make build` (or `pip install --no-build-isolation -e .`); it needs a C++ compiler "
    "and the same torch it will run with."
)


def available() -> bool:
    return IMPORT_ERROR is None


def ops():
    """The namespace ``torch.ops.mtbert``; raises RuntimeError with build instructions if absent."""
    if IMPORT_ERROR is not None:
        raise RuntimeError(BUILD_HINT.format(err=IMPORT_ERROR)) from IMPORT_ERROR
    return torch.ops.mtbert

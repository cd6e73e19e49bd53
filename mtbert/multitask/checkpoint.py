"""Checkpoints that survive a kill: written to a temporary file in the same directory, flushed to
disk, then renamed over the target (``os.replace`` is atomic on POSIX and Windows), so the target
is always either the old complete checkpoint or the new one."""
import os
import random
import signal
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError, MissingFileError, OutputError, make_directory

# Test hook for the kill tests (tests/test_kill.py): "save:N" SIGKILLs this process inside the N-th
# checkpoint write of the process, after the data reached the disk and before the rename; "step:N"
# after optimizer step N (see ``kill_point``). Unset in normal use.
KILL_ENV = "MTBERT_TEST_SIGKILL_AT"
_saves = 0


def kill_point(kind: str, count: int) -> None:
    """SIGKILLs this process when ``$MTBERT_TEST_SIGKILL_AT`` is ``f"{kind}:{count}"``."""
    if os.environ.get(KILL_ENV) == f"{kind}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(state: dict, path) -> Path:
    """Writes ``state`` to ``path`` atomically. An ``OSError`` (no such directory, a full disk, no
    permission) becomes an :class:`~mtbert.errors.OutputError` naming the file; the previous
    checkpoint at ``path`` is untouched and no temporary file is left behind."""
    global _saves
    path = Path(path)
    make_directory(path.parent, "checkpoint directory")
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    temporary = None
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(descriptor, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _saves += 1
        kill_point("save", _saves)
        os.replace(temporary, path)
    except OSError as err:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise OutputError(f"could not write the checkpoint {path}: {err.strerror or err}"
                          f"{'; the previous one is intact' if path.is_file() else ''}") from err
    except BaseException:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path) -> dict:
    """The dict saved at ``path``; a missing, truncated or non-PyTorch file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling a damaged or foreign file fails in many ways, all the file's fault
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def rng_states() -> dict:
    """Every random state training draws from: Python's, torch's CPU and CUDA generators."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])

"""Several JAX processes (`jax.distributed.initialize`) writing one directory: agreeing on a name, running a step
on process 0 alone, and raising on every process when any of them failed, so none is left waiting at a barrier.

    name = multihost.shared_token()                      # the same random hex on every process
    multihost.on_primary(lambda: stage.mkdir(), "staging")  # process 0 runs it; all return (or raise) together
    multihost.check_all(error, "writing the arrays")     # raises on every process if any process failed

Every function here is a collective when `jax.process_count() > 1`: every process must call it, in the same
order, or the others wait (JAX's own barriers, `jax.experimental.multihost_utils`, carry the data). With one
process each is a plain local call: no communication, nothing compiled.
"""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

# bytes of the broadcast error report: a JSON object (ASCII, at most 12 bytes a character) of fields cut to 2,000
# (message), 500 (strerror) and 1,000 (filename) characters, so at most 42,000 bytes and some keys
_SIZE = 1 << 16


class ProcessError(RuntimeError):
    """Raised on the processes that did not fail when another process failed a step they all take part in; the
    message names the failed processes (their own errors are raised there)."""


def count() -> int:
    """The number of JAX processes (1 without `jax.distributed`)."""
    return jax.process_count()


def index() -> int:
    """This process's index, 0 to `count() - 1`."""
    return jax.process_index()


def is_primary() -> bool:
    """True on process 0, the one that writes what is written once (renames, deletions, metadata)."""
    return index() == 0


def shared_token(nbytes: int = 8) -> str:
    """A random hex string of `2 * nbytes` characters, process 0's on every process."""
    token = np.frombuffer(os.urandom(nbytes), np.uint8)
    if count() > 1:
        token = np.asarray(multihost_utils.broadcast_one_to_all(token), np.uint8)
    return bytes(token).hex()


def check_all(error: BaseException | None, what: str) -> None:
    """Every process passes the exception it hit while doing `what` (or None). Returns when none failed; raises
    `error` where it is set, and a ProcessError naming the failed processes on the others."""
    if count() > 1:
        flags = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
        failed = [i for i, f in enumerate(flags) if f]
    else:
        failed = [0] if error is not None else []
    if error is not None:
        raise error
    if failed:
        raise ProcessError(f"{what} failed on process {', '.join(map(str, failed))} (its error is raised there); "
                           f"process {index()} stopped too, nothing was committed")


def _report(error: BaseException | None) -> np.ndarray:
    fields: dict[str, Any] = {}
    if error is not None:
        fields = {"type": type(error).__name__, "message": str(error)[:2000]}
        if isinstance(error, OSError) and error.errno is not None:
            fields.update(errno=error.errno, strerror=str(error.strerror)[:500],
                          filename=None if error.filename is None else os.fsdecode(error.filename)[:1000])
    raw = json.dumps(fields).encode()
    return np.frombuffer(raw + b" " * (_SIZE - len(raw)), np.uint8)


def _mirror(fields: dict, what: str) -> BaseException:
    """The exception process 0 raised, rebuilt: a built-in type keeps its type (an OSError its errno and file)."""
    cls = getattr(builtins, fields["type"], None)
    where = f" (raised on process 0 while {what})"
    if isinstance(cls, type) and issubclass(cls, OSError) and "errno" in fields:
        return cls(fields["errno"], fields["strerror"] + where, fields["filename"])
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
        return cls(fields["message"] + where)
    return ProcessError(f"{fields['type']}: {fields['message']}{where}")


def on_primary(fn: Callable[[], Any], what: str) -> None:
    """Runs `fn()` on process 0 only (the others wait for it) and returns None on every process once it returned.
    When it raises, process 0 raises its exception and every other process the same built-in type with the same
    message (an OSError with its errno and filename; any other type as a ProcessError)."""
    if count() == 1:
        fn()
        return
    error = None
    if is_primary():
        try:
            fn()
        except BaseException as e:  # reported to the others, then re-raised below
            error = e
    raw = bytes(np.asarray(multihost_utils.broadcast_one_to_all(_report(error)), np.uint8))
    if error is not None:
        raise error
    fields = json.loads(raw.decode())
    if fields:
        raise _mirror(fields, what)

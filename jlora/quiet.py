"""Keeps orbax and tensorstore from printing tracebacks on stderr about a failure jlora already reports.

    with quiet_orbax():
        checkpointer.restore(...)  # a failure raises here, with nothing printed; on success orbax's logs pass

Two kinds of output follow a failed orbax save or load. (1) Log records: orbax logs each failing worker thread with
its traceback (logger "absl"), and asyncio logs "Task exception was never retrieved" (logger "asyncio") when orbax's
failed tasks are freed. `quiet_orbax` holds both loggers' records while the block runs and passes them on after it
if the block succeeded. When it raised, it first waits for the orbax worker threads the block started (orbax raises
while they still run, and a caller that deleted their directory at once would leave one waiting for minutes, and
the process unable to exit), frees the failed tasks (`gc.collect`), then drops the records: the exception says
what failed. The failed tasks that the exception's traceback still holds are marked retrieved, and those left
pending on a loop orbax closed get a handler on that loop that drops their "destroyed but pending" report, so
freeing the exception later (in the caller's code) logs nothing either. Tasks the block never saw (run by orbax on
a loop in a background thread, freed later) are covered by a filter on the "asyncio" logger, installed once per
process, that drops the report on an orbax task whose exception has the type and message of one `quiet_orbax`
re-raised; every other record passes.
(2) When one of several concurrent tensorstore reads or writes fails, orbax closes its event loop while the others
are still in flight; when they finish, tensorstore calls `loop.call_soon_threadsafe` on the closed loop and Python
prints "RuntimeError: Event loop is closed" through `sys.unraisablehook`, up to seconds later. On its first use
`quiet_orbax` wraps `sys.unraisablehook` (once per process) so that exactly those reports (a RuntimeError 'Event
loop is closed', for no object, raised in asyncio's `call_soon_threadsafe`) are dropped; every other unraisable
exception goes to the hook that was installed before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import sys
import threading
import time
from collections.abc import Iterator

_LOGGERS = ("absl", "asyncio")
_lock = threading.Lock()
_reported: collections.deque = collections.deque(maxlen=64)  # (type, message) of errors quiet_orbax re-raised


class _Hold(logging.Filter):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _abandoned_callback(unraisable) -> bool:
    """True for tensorstore's completion callback hitting an event loop orbax has closed."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_frame.f_code.co_name != "call_soon_threadsafe":
        tb = tb.tb_next
    return (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
            and unraisable.object is None and tb is not None
            and tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith("asyncio/base_events.py"))


class _DropAbandonedCallbacks:
    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        if not _abandoned_callback(unraisable):
            (self.previous or sys.__unraisablehook__)(unraisable)


def _drop_abandoned_callbacks() -> None:
    with _lock:
        if not isinstance(sys.unraisablehook, _DropAbandonedCallbacks):
            sys.unraisablehook = _DropAbandonedCallbacks(sys.unraisablehook)


class _DropReported(logging.Filter):
    """Drops asyncio's report on an orbax task (its coroutine defined under orbax/) that failed with an error of
    the same type and message as one `quiet_orbax` already raised to its caller (each of orbax's concurrent writes
    raises its own copy, and a task whose loop ran on in a background thread is freed whenever it is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and (type(exc), str(exc)) in _reported
                    and "/orbax/" in record.getMessage().replace("\\", "/"))


def _drop_reported() -> None:
    with _lock:
        logger = logging.getLogger("asyncio")
        if not any(isinstance(f, _DropReported) for f in logger.filters):
            logger.addFilter(_DropReported())


def _join(threads, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        while t is not threading.current_thread() and time.monotonic() < deadline:
            try:
                t.join(max(0.0, deadline - time.monotonic()))
                break
            except RuntimeError:  # listed while starting: "cannot join thread before it is started"
                time.sleep(0.01)


def _from_orbax(task: asyncio.Task) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and "/orbax/" in code.co_filename.replace("\\", "/")


def _drop_pending(loop, context) -> None:
    task = context.get("task")
    if not (isinstance(task, asyncio.Task) and not task.done() and _from_orbax(task)):
        loop.default_exception_handler(context)


def _settle_abandoned_tasks() -> None:
    """Marks orbax's failed tasks retrieved and silences those left pending on a closed loop (see the module
    docstring), so that nothing is logged when they are freed. Only tasks whose coroutine is orbax's, and only
    loops already closed (orbax's own), are touched."""
    for obj in gc.get_objects():  # type(), not isinstance: that reads __class__, which some objects warn or fail on
        if issubclass(type(obj), asyncio.Task) and _from_orbax(obj):
            if obj.done():
                if not obj.cancelled():
                    obj.exception()  # marks the exception retrieved
            elif obj.get_loop().is_closed():
                obj.get_loop().set_exception_handler(_drop_pending)


@contextlib.contextmanager
def quiet_orbax(*, join_timeout: float = 30.0) -> Iterator[None]:
    """Runs the block with orbax's log records held back: re-emitted after success; after an exception, the orbax
    worker threads started meanwhile (which outlive the exception) are joined for up to `join_timeout` seconds,
    so that nothing they write or log comes later, their records are dropped, the late "Event loop is closed"
    reports are silenced, and the exception is re-raised."""
    _drop_reported()
    _drop_abandoned_callbacks()  # first, as a read may fail and hit the closed loop before the exception reaches us
    holds = [(logging.getLogger(name), _Hold()) for name in _LOGGERS]
    before = set(threading.enumerate())
    for logger, hold in holds:
        logger.addFilter(hold)
    try:
        yield
    except BaseException as e:
        _reported.append((type(e), str(e)))
        _join([t for t in set(threading.enumerate()) - before if type(t).__module__.startswith("orbax.")],
              join_timeout)
        gc.collect()  # orbax's failed tasks, in reference cycles, log "Task exception was never retrieved" when freed
        _settle_abandoned_tasks()
        raise
    else:
        for logger, hold in holds:
            logger.removeFilter(hold)
            for record in hold.records:
                logger.handle(record)
    finally:
        for logger, hold in holds:
            logger.removeFilter(hold)

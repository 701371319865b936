"""Replacing a directory with no moment where neither the old nor the new copy is whole: write beside, then swap.

    with replace_dir(path, overwrite=True, is_ours=is_jlora_checkpoint, what="jlora adapter checkpoint") as new:
        write_into(new)  # `new` does not exist yet: create it (a directory) and fill it
    # `path` now holds what was written; the old copy is deleted only after the new one is in place

`replace_dir` stages the write in a fresh hidden directory beside `path` (`.<name>.jlora-<random>/<name>`, same
filesystem, so the final step is a rename). On Linux the commit is one `renameat2` call: RENAME_EXCHANGE swaps the
old and the new copy atomically, RENAME_NOREPLACE puts a new one in place only if `path` does not exist (not even as
an empty directory, which a plain `os.rename` would replace). Where the kernel, libc or filesystem lacks them the
fallback is two renames (old copy aside into the staging directory, new copy in), and a crash between them leaves
`path` absent and the old copy whole at `.<name>.jlora-<random>/<name>.old`; a new path is claimed by `os.mkdir`,
so a concurrent writer still fails rather than replacing it. A crash at any other moment leaves at most a hidden
`.<name>.jlora-*` directory beside `path` and `path` as it was before, or complete.

With several JAX processes (`jax.distributed`) every process enters `replace_dir` together, on a filesystem they
share: the staging directory's name is drawn by process 0 and broadcast, so all write into one; process 0 alone
checks, creates, renames and deletes, the others wait for each step and raise what it raised
(`jlora.multihost`); a failure on any process while writing raises on all and commits nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator

from jlora import multihost

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


@functools.cache
def _libc_renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc >= 2.28 (macOS, musl, Windows)
        return None


def _renameat2(src: pathlib.Path, dst: pathlib.Path, flags: int) -> bool:
    """True when `renameat2(src, dst, flags)` did the rename; False where it is unavailable; OSError otherwise."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_new(src, dst) -> None:
    """Renames the directory `src` to `dst`, atomically, only if `dst` does not exist (FileExistsError otherwise,
    even for an empty directory, which `os.rename` would silently replace). Both must be on one filesystem."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
        if os.name == "nt":  # os.rename never replaces an existing path on Windows
            os.rename(src, dst)
            return
        os.mkdir(dst)  # claims the name: fails when it exists
    except FileExistsError as e:
        raise FileExistsError(errno.EEXIST, "it already exists; nothing was replaced", str(dst)) from e
    try:
        os.rename(src, dst)  # replaces the empty directory claimed above
    except BaseException:
        os.rmdir(dst)
        raise


def _swap_in(new: pathlib.Path, path: pathlib.Path) -> None:
    """Puts `new` at `path` and the old `path` at `new` (RENAME_EXCHANGE), or the two-rename fallback."""
    if _renameat2(new, path, _RENAME_EXCHANGE):
        return
    aside = new.with_name(new.name + ".old")
    os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise


def _check(path: pathlib.Path, overwrite: bool, is_ours: Callable[[pathlib.Path], bool], what: str) -> bool:
    """True when `path` exists and may be replaced; False when it does not exist; raises otherwise."""
    if not os.path.lexists(path):
        return False
    if not overwrite:
        raise FileExistsError(errno.EEXIST, f"{path} already exists; pass overwrite=True to replace it", str(path))
    if path.is_symlink() or not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory but a {'link' if path.is_symlink() else 'file'}; "
                         f"jlora never deletes what it did not write: choose another path or move it away")
    if any(path.iterdir()) and not is_ours(path):
        names = sorted(p.name for p in path.iterdir())
        listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise ValueError(f"{path} exists and is not a {what} (it holds {listed}); jlora never deletes what it did "
                         f"not write: choose another path, or move or delete it yourself")
    return True


@contextlib.contextmanager
def replace_dir(path, *, overwrite: bool, is_ours: Callable[[pathlib.Path], bool], what: str
                ) -> Iterator[pathlib.Path]:
    """Yields a path to write a new directory into, then puts it at `path`, replacing the old one only when whole.

    Args:
        path: str | PathLike, the directory to write; its parents are created.
        overwrite: bool, whether an existing `path` may be replaced (FileExistsError otherwise).
        is_ours: `(pathlib.Path) -> bool`, whether an existing non-empty directory at `path` is what the caller
            writes (e.g. `jlora.checkpoint.is_jlora_checkpoint`); when False, a ValueError naming `path` and its
            contents: jlora never deletes what it did not write. An empty directory is always replaceable.
        what: str, the kind of directory written, for the error messages ("jlora adapter checkpoint").

    Yields:
        pathlib.Path, absolute, named like `path` inside a fresh hidden staging directory beside it; it does NOT
        exist yet: create it as a directory and fill it. On normal exit it is moved to `path` (atomically on Linux;
        see the module docstring) and the old copy deleted; when the block raises, or wrote nothing, the staging
        directory is deleted and `path` is left untouched. The checks are made on entry and again at the commit.
        With several JAX processes every process must enter it and gets the same path (see the module docstring).
    """
    path = pathlib.Path(os.path.abspath(os.fspath(path)))
    if multihost.count() > 1:
        with _replace_shared(path, overwrite, is_ours, what) as new:
            yield new
        return
    _check(path, overwrite, is_ours, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.jlora-", dir=path.parent))
    new = stage / path.name
    try:
        yield new
        _commit(new, path, overwrite, is_ours, what)
    except BaseException:
        _remove(stage, settle=_SETTLE)  # a writer may still be finishing files in it
        raise
    _remove(stage)


def _commit(new: pathlib.Path, path: pathlib.Path, overwrite: bool, is_ours: Callable[[pathlib.Path], bool],
            what: str) -> None:
    if not new.is_dir():
        raise ValueError(f"nothing was written to {new}: the block must create that directory; {path} is "
                         f"left as it was")
    if _check(path, overwrite, is_ours, what):
        _swap_in(new, path)
    else:
        rename_new(new, path)


@contextlib.contextmanager
def _replace_shared(path: pathlib.Path, overwrite: bool, is_ours: Callable[[pathlib.Path], bool], what: str
                    ) -> Iterator[pathlib.Path]:
    """`replace_dir` for several JAX processes writing one directory on a filesystem they share (orbax's
    multi-process save: each process writes its shards, process 0 the metadata). Every process must enter it.

    The staging directory `.<name>.jlora-<token>` is named by a token process 0 draws and broadcasts, so all
    processes write into the same one. Process 0 alone checks `path`, creates the staging directory, renames the
    result into place and deletes the staging directory; every process waits for each of these steps and raises
    when it failed (process 0's exception, rebuilt on the others). When the block raises on any process, every
    process raises (a `jlora.multihost.ProcessError` where it did not fail) and nothing is committed."""
    stage = path.parent / f".{path.name}.jlora-{multihost.shared_token()}"

    def claim():
        _check(path, overwrite, is_ours, what)
        path.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()

    multihost.on_primary(claim, f"staging {path}")
    new, error = stage / path.name, None
    try:
        yield new
    except BaseException as e:  # every process learns of it (check_all) before any raises
        error = e
    try:
        multihost.check_all(error, f"writing {path}")
    except BaseException:
        multihost.on_primary(lambda: _remove(stage, settle=_SETTLE), f"deleting {stage}")
        raise

    def commit():
        try:
            _commit(new, path, overwrite, is_ours, what)
        finally:
            _remove(stage)

    multihost.on_primary(commit, f"committing {path}")


_SETTLE = 0.5  # seconds the staging directory must stay absent after a failed write before it counts as deleted
_LIMIT = 30.0  # seconds after which deleting it is given up (it is then left, hidden, beside the path)


def _remove(stage: pathlib.Path, *, settle: float = 0.0, limit: float = _LIMIT) -> None:
    """Deletes the staging directory, and after a failed write waits until it has stayed absent for `settle`
    seconds: the writer's background threads (tensorstore's, finishing the other arrays' files after one write
    raised) may still add entries or recreate it. Gives up quietly after `limit` seconds."""
    deadline, absent_since = time.monotonic() + limit, None
    while time.monotonic() < deadline:
        shutil.rmtree(stage, ignore_errors=True)
        now = time.monotonic()
        if stage.exists():
            absent_since = None
        else:
            absent_since = now if absent_since is None else absent_since
            if now - absent_since >= settle:
                return
        time.sleep(0.05)

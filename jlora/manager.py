"""Step-numbered adapter checkpoints in one directory, safe with several writers (managers or processes).

    with jlora.AdapterCheckpointManager("/ckpt/run1", max_to_keep=3) as manager:
        manager.save(step, adapters, config, variables=frozen)
        adapters, config = manager.restore(variables=variables)  # the latest step

Layout: `<directory>/<step>` (decimal, no leading zeros) is a `save_adapters` checkpoint. A step is written into a
fresh hidden staging directory `<directory>/.<step>.jlora-<random>/` and committed by one rename that fails when
the step exists (`jlora.atomic.rename_new`; even an empty directory is not replaced), so two writers racing for one
step never mix: the step holds exactly what the first to commit wrote, and the other gets a FileExistsError. Every
call reads the directory itself (no cached step list), so several managers on one directory see each other's steps.
A crash mid-save leaves only a hidden staging directory (never listed, never loaded).
With several JAX processes (`jax.distributed`) every process creates the manager on the same shared directory and
calls `save` and `restore` with the same arguments: each writes and reads its own shards (`jlora.save_adapters`),
process 0 commits each step and prunes old ones, and `save` returns on every process once both are done.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid

from jlora import multihost
from jlora.atomic import replace_dir
from jlora.checkpoint import (
    WHAT,
    CorruptCheckpointError,
    absolute,
    is_jlora_checkpoint,
    load_adapters,
    read_meta,
    save_args,
    write,
)
from jlora.config import LoraConfig


class AdapterCheckpointManager:
    """Step-numbered adapter checkpoints under `directory` (`<directory>/<step>`), keeping the last `max_to_keep`.

    Each step holds what `save_adapters` writes. Saves are synchronous: `save` returns once the step is complete
    and renamed into place, so a crash mid-save leaves the earlier steps, and `restore()`, intact. A step that
    exists is never replaced. `max_to_keep` (None keeps all) prunes the oldest steps after each save; a step
    directory that is not recognisably a jlora checkpoint is never deleted.
    """

    def __init__(self, directory, *, max_to_keep: int | None = 3):
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                        or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None (keep all), got {max_to_keep!r}")
        self.directory = absolute(directory)
        self.max_to_keep = max_to_keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def all_steps(self) -> list[int]:
        """The committed steps in the directory now, ascending (corrupt ones included: see `last_good_step`)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if re.fullmatch(r"0|[1-9][0-9]*", n) and (self.directory / n).is_dir())

    def _problem(self, step: int) -> str | None:
        """None when step `step`'s metadata verifies (checksum) and its arrays directory exists; else what is wrong."""
        path = self.directory / str(step)
        try:
            read_meta(path)
        except CorruptCheckpointError as e:
            return str(e)
        return None if (path / "adapters").is_dir() else f"{path} has no adapters directory"

    def last_good_step(self) -> int | None:
        """The highest step whose metadata verifies against its checksum and whose arrays directory exists, or
        None; the arrays themselves are read by `restore`."""
        return next((s for s in reversed(self.all_steps()) if self._problem(s) is None), None)

    def _offer(self, step: int) -> str:
        good = next((s for s in reversed(self.all_steps()) if s != step and self._problem(s) is None), None)
        if good is None:
            return f"; no other step in {self.directory} is intact"
        return (f"; the last good step is {good}: restore(step={good}) loads it (see last_good_step()); new saves "
                f"need a step above {max(self.all_steps())}")

    def latest_step(self) -> int | None:
        """The highest step, or None when there is none. Its metadata is verified: a corrupt latest step raises a
        CorruptCheckpointError (a ValueError) naming the step, what is wrong and the last good step."""
        steps = self.all_steps()
        if not steps:
            return None
        problem = self._problem(steps[-1])
        if problem is not None:
            raise CorruptCheckpointError(f"the latest step {steps[-1]} is corrupt: {problem}{self._offer(steps[-1])}")
        return steps[-1]

    def save(self, step: int, adapters, config: LoraConfig, *, variables=None) -> None:
        """Saves step `step` (an int greater than every step in the directory now); see `save_adapters` for
        `variables`. A step that exists is never replaced: ValueError before writing, FileExistsError when another
        writer committed it while this one was writing."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        args = save_args(adapters, config, variables)
        steps = self.all_steps()
        if steps and step <= steps[-1]:
            exists = f"; step {step} exists, and a saved step is never replaced" if step in steps else ""
            raise ValueError(f"step {step} is not after the latest saved step {steps[-1]} in {self.directory}"
                             f"{exists}: save under a step > {steps[-1]}")
        path = self.directory / str(step)
        try:
            with replace_dir(path, overwrite=False, is_ours=is_jlora_checkpoint, what=WHAT) as new:
                write(new, args)
        except FileExistsError as e:
            if e.filename != str(path):
                raise
            raise FileExistsError(f"step {step} in {self.directory} was saved by another writer while this one was "
                                  f"writing; a saved step is never replaced, so this save wrote nothing: save "
                                  f"under a later step") from e
        multihost.on_primary(self._prune, f"deleting steps beyond max_to_keep={self.max_to_keep}")

    def _prune(self) -> None:
        if self.max_to_keep is None:
            return
        for step in self.all_steps()[:-self.max_to_keep]:
            path = self.directory / str(step)
            if not is_jlora_checkpoint(path):
                continue
            trash = self.directory / f".{step}.jlora-deleting-{uuid.uuid4().hex}"
            try:
                os.rename(path, trash)  # one writer wins; the step vanishes from the listing at once
            except FileNotFoundError:
                continue
            shutil.rmtree(trash)

    def restore(self, step: int | None = None, *, variables=None, target=None,
                check_weights: bool = True) -> tuple[dict, LoraConfig]:
        """`(adapters, config)` of `step` (the latest when None); see `load_adapters` for `variables`, `target`
        and `check_weights`. A corrupt step raises a CorruptCheckpointError naming the last good step."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no adapter checkpoints in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; the steps are {steps}")
        try:
            return load_adapters(self.directory / str(step), variables=variables, target=target,
                                 check_weights=check_weights)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"step {step} is corrupt: {e}{self._offer(step)}") from e

    def wait(self) -> None:
        """Saves are synchronous: nothing to wait for (kept for the orbax-like API)."""

    def close(self) -> None:
        """Holds no resources: nothing to release (kept for the orbax-like API)."""

    def __enter__(self) -> AdapterCheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

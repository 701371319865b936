"""The multi-process protocol of `jlora.atomic.replace_dir` (one staging directory, one commit, errors raised on
every process), with two simulated processes: threads whose collectives meet at a barrier. The real 2-process run
(jax.distributed, orbax) is tests/multidevice/test_multihost.py.

    python -m pytest -q tests/test_checkpoint_multihost.py
"""

import errno
import os
import threading

import jax
import numpy as np
import pytest

from jlora import atomic, checkpoint, multihost
from jlora.checkpoint import CorruptCheckpointError


class Processes:
    """`n` simulated processes: `run(fn)` calls `fn(index)` in n threads; `broadcast_one_to_all` and
    `process_allgather` (multihost_utils' names) meet at a barrier, as JAX's collectives do."""

    def __init__(self, n: int = 2):
        self.n, self.local, self.slots = n, threading.local(), [None] * n
        self.barrier = threading.Barrier(n, timeout=20)

    def index(self) -> int:
        return self.local.index

    def _gather(self, value):
        self.slots[self.index()] = np.asarray(value)
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        assert len({(x.shape, x.dtype) for x in out}) == 1, "JAX's collectives need one shape on every process"
        return out

    def broadcast_one_to_all(self, x):
        return self._gather(x)[0]

    def process_allgather(self, x):
        return np.stack(self._gather(x))

    def run(self, fn) -> list:
        """`[result or exception of fn(i)]` for each process."""
        results: list = [None] * self.n

        def target(i):
            self.local.index = i
            try:
                results[i] = fn(i)
            except BaseException as e:  # returned to the test; a stuck partner times out at the barrier
                results[i] = e

        threads = [threading.Thread(target=target, args=(i,)) for i in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a simulated process is stuck"
        return results


@pytest.fixture
def processes(monkeypatch):
    fake = Processes()
    monkeypatch.setattr(multihost, "count", lambda: fake.n)
    monkeypatch.setattr(multihost, "index", fake.index)
    monkeypatch.setattr(multihost, "multihost_utils", fake)
    return fake


def is_ours(path):
    return (path / "shard0").exists()


def write_shards(new, i, processes):
    """What orbax does: process 0 creates the directory, all wait, each writes its own shard."""
    if i == 0:
        new.mkdir()
    processes.process_allgather(0)
    (new / f"shard{i}").write_text(f"from process {i}")


def hidden(directory):
    return [n for n in os.listdir(directory) if n.startswith(".")]


def test_both_processes_write_into_one_staging_directory_committed_once(tmp_path, processes):
    path = tmp_path / "ckpt"
    seen = []

    def save(i, text="new"):
        with atomic.replace_dir(path, overwrite=True, is_ours=is_ours, what="test checkpoint") as new:
            seen.append(new)
            write_shards(new, i, processes)
            (new / f"shard{i}").write_text(text)

    assert processes.run(save) == [None, None]
    assert seen[0] == seen[1] and seen[0].parent.parent == tmp_path
    assert sorted(os.listdir(path)) == ["shard0", "shard1"]
    assert processes.run(lambda i: save(i, "newer")) == [None, None]  # overwrite: swapped in whole
    assert {(path / f"shard{i}").read_text() for i in range(2)} == {"newer"}
    assert hidden(tmp_path) == []


def test_a_failure_on_one_process_raises_on_both_and_commits_nothing(tmp_path, processes):
    path = tmp_path / "ckpt"

    def save(i):
        with atomic.replace_dir(path, overwrite=False, is_ours=is_ours, what="test checkpoint") as new:
            write_shards(new, i, processes)
            if i == 1:
                raise OSError(errno.ENOSPC, "No space left on device")

    zero, one = processes.run(save)
    assert isinstance(one, OSError) and one.errno == errno.ENOSPC
    assert isinstance(zero, multihost.ProcessError) and "failed on process 1" in str(zero)
    assert not path.exists() and hidden(tmp_path) == []


def test_process_zeros_refusal_is_raised_on_both(tmp_path, processes):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "notes.txt").write_text("keep me")

    def save(i, overwrite):
        with atomic.replace_dir(path, overwrite=overwrite, is_ours=is_ours, what="test checkpoint") as new:
            write_shards(new, i, processes)

    for error in processes.run(lambda i: save(i, False)):  # exists: FileExistsError, errno and file kept
        assert isinstance(error, FileExistsError) and error.filename == str(path) and error.errno == errno.EEXIST
        assert "overwrite=True" in str(error)
    zero, one = processes.run(lambda i: save(i, True))  # not ours: ValueError, nothing deleted
    assert type(zero) is ValueError and type(one) is ValueError
    assert "never deletes what it did not write" in str(one) and "raised on process 0" in str(one)
    assert os.listdir(path) == ["notes.txt"] and hidden(tmp_path) == []

    def write_nothing(i):
        with atomic.replace_dir(tmp_path / "empty", overwrite=False, is_ours=is_ours, what="test checkpoint"):
            pass

    for error in processes.run(write_nothing):
        assert type(error) is ValueError and "nothing was written" in str(error)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_writer_that_commits_first_wins_on_both_processes(tmp_path, processes):
    path = tmp_path / "ckpt"

    def save(i):
        with atomic.replace_dir(path, overwrite=False, is_ours=is_ours, what="test checkpoint") as new:
            write_shards(new, i, processes)
            if i == 0:
                path.mkdir()  # another writer commits the name meanwhile
                (path / "shard0").write_text("the other writer's")

    for error in processes.run(save):
        assert isinstance(error, FileExistsError) and error.filename == str(path)
    assert os.listdir(path) == ["shard0"] and (path / "shard0").read_text() == "the other writer's"
    assert hidden(tmp_path) == []


def test_on_primary_runs_once_and_mirrors_other_errors(processes):
    calls = []

    def fn():
        calls.append(multihost.index())
        raise CorruptCheckpointError("/ckpt/7 is not a complete jlora adapter checkpoint")

    zero, one = processes.run(lambda i: multihost.on_primary(fn, "reading /ckpt/7"))
    assert calls == [0]
    assert type(zero) is CorruptCheckpointError
    assert type(one) is multihost.ProcessError
    assert str(one) == ("CorruptCheckpointError: /ckpt/7 is not a complete jlora adapter checkpoint (raised on "
                        "process 0 while reading /ckpt/7)")
    assert processes.run(lambda i: multihost.on_primary(lambda: calls.append(i), "x")) == [None, None]
    assert calls == [0, 0]
    a, b = processes.run(lambda i: multihost.shared_token())
    assert a == b and len(a) == 16

    long = "/ckpt/" + "\U0001f600\udcff" * 3000  # a filename that is not UTF-8 (surrogate escapes), very long

    def missing():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory " + "\x00\u00e9" * 3000, long)

    zero, one = processes.run(lambda i: multihost.on_primary(missing, "reading"))
    assert type(one) is FileNotFoundError and one.errno == errno.ENOENT and one.filename == long[:1000]


def test_arrays_no_sharding_places_go_to_the_default_device_or_everywhere(monkeypatch):
    assert checkpoint._fallback() == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    monkeypatch.setattr(multihost, "count", lambda: 2)  # several processes: no default device is global
    fallback = checkpoint._fallback()
    assert fallback.is_fully_replicated and fallback.device_set == set(jax.devices())

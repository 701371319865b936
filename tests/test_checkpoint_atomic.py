"""Overwriting never loses a checkpoint: `save_adapters(..., overwrite=True)` writes beside and swaps by rename
(`jlora.atomic.replace_dir`), and never deletes a directory jlora did not write.

    python -m pytest -q tests/test_checkpoint_atomic.py
"""

import os
import re
import signal
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest
from test_checkpoint import CONFIG, assert_trees_equal, make, scaled

import jlora


@pytest.fixture(scope="module")
def setup():
    return make()


def test_an_error_mid_overwrite_leaves_the_old_checkpoint(setup, tmp_path, monkeypatch):
    _, variables, frozen, adapters = setup
    path = tmp_path / "c"
    jlora.save_adapters(path, adapters, CONFIG, variables=frozen)
    real = ocp.StandardCheckpointHandler.async_save

    async def half_then_disk_full(self, directory, *args, **kwargs):
        await real(self, directory, *args, **kwargs)  # the new arrays are (partly) on disk
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ocp.StandardCheckpointHandler, "async_save", half_then_disk_full)
        with pytest.raises(OSError, match="disk full"):
            jlora.save_adapters(path, scaled(adapters, 2), CONFIG, variables=frozen, overwrite=True)
    restored, config = jlora.load_adapters(path, variables=variables)
    assert_trees_equal(restored, adapters)  # the old values, whole
    assert config == CONFIG
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no staging directory left beside it


KILLED_MID_SAVE = """
import os, signal, sys
import numpy as np
import orbax.checkpoint as ocp
import jlora
from jlora.paths import nest

async def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # the process dies while the arrays are being written

ocp.StandardCheckpointHandler.async_save = killed
adapters = nest({"params/q/kernel/lora_a": np.full((11, 7), 2.0, np.float32),
                 "params/q/kernel/lora_b": np.full((7, 19), 2.0, np.float32)})
jlora.save_adapters(sys.argv[1], adapters, jlora.LoraConfig(rank=7, alpha=14, targets=("q",)), overwrite=True)
"""


def test_a_process_killed_mid_overwrite_leaves_the_old_checkpoint(tmp_path):
    import numpy as np

    from jlora.paths import nest

    old = nest({"params/q/kernel/lora_a": np.full((11, 7), 1.0, np.float32),
                "params/q/kernel/lora_b": np.full((7, 19), 1.0, np.float32)})
    config = jlora.LoraConfig(rank=7, alpha=14, targets=("q",))
    path = tmp_path / "c"
    jlora.save_adapters(path, old, config)
    child = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(path)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert child.returncode == -signal.SIGKILL, child.stderr
    restored, loaded = jlora.load_adapters(path)
    assert loaded == config
    assert_trees_equal(restored, old)


def test_overwrite_refuses_a_directory_jlora_did_not_write(setup, tmp_path):
    adapters = setup[3]
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "train.log").write_text("step 1 loss 2.3\n")
    (run / "logs" / "events").write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(run)) + r" exists and is not a jlora adapter checkpoint "
                                         r"\(it holds logs, train.log\); jlora never deletes what it did not write"):
        jlora.save_adapters(run, adapters, CONFIG, overwrite=True)
    assert (run / "train.log").read_text() == "step 1 loss 2.3\n" and (run / "logs" / "events").exists()
    assert sorted(os.listdir(tmp_path)) == ["run"]
    jlora.save_adapters(tmp_path / "c", adapters, CONFIG)
    (tmp_path / "c" / "notes.txt").write_text("mine")  # a checkpoint the user added a file to is not jlora's alone
    with pytest.raises(ValueError, match="not a jlora adapter checkpoint"):
        jlora.save_adapters(tmp_path / "c", adapters, CONFIG, overwrite=True)
    (tmp_path / "file").write_text("data")
    with pytest.raises(ValueError, match="is not a directory but a file"):
        jlora.save_adapters(tmp_path / "file", adapters, CONFIG, overwrite=True)
    assert (tmp_path / "file").read_text() == "data"


def test_overwrite_of_an_empty_directory_or_a_jlora_checkpoint(setup, tmp_path):
    adapters = setup[3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        jlora.save_adapters(tmp_path / "empty", adapters, CONFIG)
    jlora.save_adapters(tmp_path / "empty", adapters, CONFIG, overwrite=True)  # nothing to lose
    assert_trees_equal(jlora.load_adapters(tmp_path / "empty")[0], adapters)
    jlora.save_adapters(tmp_path / "empty", scaled(adapters, 3), CONFIG, overwrite=True)
    assert_trees_equal(jlora.load_adapters(tmp_path / "empty")[0], scaled(adapters, 3))
    assert sorted(os.listdir(tmp_path)) == ["empty"]


# replace_dir and rename_new themselves, natively (renameat2) and through the portable fallback


@pytest.fixture(params=["renameat2", "fallback"])
def atomic(request, monkeypatch):
    from jlora import atomic

    if request.param == "fallback":
        monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: False)
    else:
        assert atomic._renameat2.__name__ == "_renameat2"
    return atomic


def _ours(path):
    return (path / "mark").exists()


def _fill(new, text):
    new.mkdir()
    (new / "mark").write_text(text)


def test_replace_dir_swaps_in_a_whole_directory(atomic, tmp_path):
    path = tmp_path / "a" / "out"  # parents are created
    with atomic.replace_dir(path, overwrite=False, is_ours=_ours, what="test dir") as new:
        assert not new.exists() and new.name == "out" and new.parent.parent == path.parent
        assert new.parent.name.startswith(".out.jlora-")
        _fill(new, "one")
    assert (path / "mark").read_text() == "one" and os.listdir(tmp_path / "a") == ["out"]
    with atomic.replace_dir(path, overwrite=True, is_ours=_ours, what="test dir") as new:
        _fill(new, "two")
        assert (path / "mark").read_text() == "one"  # the old copy is whole until the swap
    assert (path / "mark").read_text() == "two" and os.listdir(tmp_path / "a") == ["out"]


def test_replace_dir_leaves_the_path_untouched_on_error(atomic, tmp_path):
    path = tmp_path / "out"
    _fill(path, "old")
    with pytest.raises(KeyError), atomic.replace_dir(path, overwrite=True, is_ours=_ours, what="test dir") as new:
        _fill(new, "new")
        raise KeyError("boom")
    with pytest.raises(ValueError, match="nothing was written"), \
            atomic.replace_dir(path, overwrite=True, is_ours=_ours, what="test dir"):
        pass
    assert (path / "mark").read_text() == "old" and os.listdir(tmp_path) == ["out"]


def test_a_failed_write_waits_for_late_writers_before_the_staging_directory_counts_as_gone(atomic, tmp_path):
    """After an error a writer's background thread (tensorstore finishing another array's file) may recreate the
    staging directory after it was first deleted; replace_dir keeps deleting until it stays gone."""
    import threading
    import time

    path, late = tmp_path / "out", []

    def writer(new):  # a late write 0.2 s after the error, into the staging directory, recreating its parents
        time.sleep(0.2)
        (new / "late").mkdir(parents=True)
        late.append(True)

    with pytest.raises(KeyError), atomic.replace_dir(path, overwrite=False, is_ours=_ours, what="test dir") as new:
        _fill(new, "new")
        threading.Thread(target=writer, args=(new,), daemon=True).start()
        raise KeyError("boom")
    assert late == [True] and os.listdir(tmp_path) == []


def test_replace_dir_checks_again_at_the_commit(atomic, tmp_path):
    path = tmp_path / "out"
    with pytest.raises(FileExistsError), atomic.replace_dir(path, overwrite=False, is_ours=_ours, what="t") as new:
        _fill(new, "mine")
        path.mkdir()  # another writer created it meanwhile, even empty: not replaced
    assert os.listdir(path) == [] and os.listdir(tmp_path) == ["out"]
    with pytest.raises(ValueError, match=r"not a t \(it holds theirs\)"), \
            atomic.replace_dir(path, overwrite=True, is_ours=_ours, what="t") as new:
        _fill(new, "mine")
        (path / "theirs").write_text("keep")
    assert (path / "theirs").read_text() == "keep"


def test_rename_new_never_replaces(atomic, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fill(src, "s")
    dst.mkdir()  # os.rename would replace this empty directory
    with pytest.raises(FileExistsError, match="nothing was replaced"):
        atomic.rename_new(src, dst)
    assert (src / "mark").exists() and os.listdir(dst) == []
    dst.rmdir()
    atomic.rename_new(src, dst)
    assert (dst / "mark").read_text() == "s" and not src.exists()


def test_fallback_swap_puts_the_old_copy_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    from jlora import atomic

    monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: False)
    path = tmp_path / "out"
    _fill(path, "old")
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("I/O error")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"), atomic.replace_dir(path, overwrite=True, is_ours=_ours,
                                                                       what="t") as new:
        _fill(new, "new")
    assert (path / "mark").read_text() == "old" and os.listdir(tmp_path) == ["out"]

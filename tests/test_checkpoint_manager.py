"""AdapterCheckpointManager with several writers: the directory's real state, steps never replaced, two processes
racing for one step, a corrupt latest step reported with the last good one.

    python -m pytest -q tests/test_checkpoint_manager.py
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from test_checkpoint import CONFIG, assert_trees_equal, make, scaled

import jlora


@pytest.fixture(scope="module")
def setup():
    return make()


def test_two_managers_on_one_directory_see_each_others_steps(setup, tmp_path):
    _, variables, frozen, adapters = setup
    first = jlora.AdapterCheckpointManager(tmp_path / "run", max_to_keep=None)
    second = jlora.AdapterCheckpointManager(tmp_path / "run", max_to_keep=None)
    first.save(1, adapters, CONFIG, variables=frozen)
    assert second.all_steps() == [1] and second.latest_step() == 1
    with pytest.raises(ValueError, match=r"step 1 is not after the latest saved step 1 .*step 1 exists, and a saved "
                                         r"step is never replaced"):
        second.save(1, scaled(adapters, 5), CONFIG, variables=frozen)
    second.save(2, scaled(adapters, 2), CONFIG, variables=frozen)
    assert first.all_steps() == [1, 2] and first.latest_step() == 2
    with pytest.raises(ValueError, match="not after the latest saved step 2"):
        first.save(2, scaled(adapters, 7), CONFIG)
    assert_trees_equal(first.restore(1, variables=variables)[0], adapters)  # never overwritten
    assert_trees_equal(first.restore(variables=variables)[0], scaled(adapters, 2))


def test_a_step_created_while_writing_is_not_replaced(setup, tmp_path, monkeypatch):
    adapters = setup[3]
    from jlora import manager as module

    manager = jlora.AdapterCheckpointManager(tmp_path / "run")
    real = module.write

    def write_then_someone_else_commits(path, args):
        real(path, args)
        (tmp_path / "run" / "3").mkdir()  # an empty directory, which a plain os.rename would replace

    monkeypatch.setattr(module, "write", write_then_someone_else_commits)
    with pytest.raises(FileExistsError, match=r"step 3 in .*run was saved by another writer while this one was "
                                              r"writing; a saved step is never replaced"):
        manager.save(3, adapters, CONFIG)
    assert os.listdir(tmp_path / "run") == ["3"] and os.listdir(tmp_path / "run" / "3") == []


RACER = """
import os, sys, time
import numpy as np
import orbax.checkpoint as ocp
import jlora
from jlora.paths import nest

directory, value, barrier = sys.argv[1], float(sys.argv[2]), sys.argv[3]
real = ocp.Checkpointer.save

def wait_for_both(stage):
    open(os.path.join(barrier, stage + sys.argv[2]), "w").close()
    deadline = time.time() + 60
    while len([n for n in os.listdir(barrier) if n.startswith(stage)]) < 2 and time.time() < deadline:
        time.sleep(0.01)

def save_then_wait(self, *args, **kwargs):  # both writers have written before either goes on: a real race
    real(self, *args, **kwargs)
    wait_for_both("written")

ocp.Checkpointer.save = save_then_wait
adapters = nest({"params/q/kernel/lora_a": np.full((11, 7), value, np.float32),
                 "params/q/kernel/lora_b": np.arange(7 * 19, dtype=np.float32).reshape(7, 19) * value,
                 "params/q/bias": np.full((19,), -value, np.float32)})
manager = jlora.AdapterCheckpointManager(directory)
wait_for_both("start")
try:
    manager.save(5, adapters, jlora.LoraConfig(rank=7, alpha=14, targets=("q",), bias="lora_only"))
    print("SAVED")
except (FileExistsError, ValueError) as e:
    print("REFUSED", type(e).__name__, e)
"""


def test_two_processes_racing_for_one_step(tmp_path):
    (tmp_path / "barrier").mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "run"), value, str(tmp_path / "barrier")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for value in ("1", "2")]
    outs = [racer.communicate(timeout=120) for racer in racers]
    assert [r.returncode for r in racers] == [0, 0], outs
    said = sorted(out.split(" ", 1)[0].strip() for out, _ in outs)
    assert said == ["REFUSED", "SAVED"], outs
    refused = next(out for out, _ in outs if out.startswith("REFUSED"))
    assert re.search("FileExistsError step 5 in .* was saved by another writer", refused), refused
    restored, _ = jlora.AdapterCheckpointManager(tmp_path / "run").restore(5)
    winner = float(next(v for (out, _), v in zip(outs, (1, 2)) if out.startswith("SAVED")))
    q = restored["params"]["q"]
    np.testing.assert_array_equal(q["kernel"]["lora_a"], np.full((11, 7), winner, np.float32))
    np.testing.assert_array_equal(q["kernel"]["lora_b"], np.arange(7 * 19, dtype=np.float32).reshape(7, 19) * winner)
    np.testing.assert_array_equal(q["bias"], np.full((19,), -winner, np.float32))
    assert os.listdir(tmp_path / "run") == ["5"]  # the loser's staging directory is gone


def _flip_alpha(step_dir):
    file = step_dir / "meta" / "metadata"
    text = file.read_text()
    assert '"alpha": 14' in text
    file.write_text(text.replace('"alpha": 14', '"alpha": 15'))


def test_a_corrupt_latest_step_is_reported_with_the_last_good_one(setup, tmp_path):
    _, variables, frozen, adapters = setup
    manager = jlora.AdapterCheckpointManager(tmp_path / "run")
    for step in (1, 2, 3):
        manager.save(step, scaled(adapters, step), CONFIG, variables=frozen)
    _flip_alpha(tmp_path / "run" / "3")
    message = (r"step 3 is corrupt: .*run/3 is not a complete jlora adapter checkpoint: the metadata file "
               r".*run/3/meta/metadata does not match its sha256 checksum.*; the last good step is 2: "
               r"restore\(step=2\) loads it")
    with pytest.raises(ValueError, match="the latest " + message):
        manager.latest_step()
    with pytest.raises(ValueError, match=message):
        manager.restore(variables=variables)
    assert manager.last_good_step() == 2
    assert_trees_equal(manager.restore(step=2, variables=variables)[0], scaled(adapters, 2))
    manager.save(4, scaled(adapters, 4), CONFIG)  # saving goes on after the corrupt step
    assert manager.all_steps() == [2, 3, 4] and manager.latest_step() == 4


def test_a_latest_step_with_missing_arrays_names_the_last_good_step(setup, tmp_path):
    adapters = setup[3]
    manager = jlora.AdapterCheckpointManager(tmp_path / "run")
    manager.save(1, adapters, CONFIG)
    manager.save(2, scaled(adapters, 2), CONFIG)
    shutil.rmtree(tmp_path / "run" / "2" / "adapters" / "d")
    assert manager.latest_step() == 2  # the metadata is intact; the arrays are read by restore
    with pytest.raises(ValueError, match=r"step 2 is corrupt: .*adapter arrays cannot be read.*; the last good step "
                                         r"is 1: restore\(step=1\) loads it"):
        manager.restore()
    shutil.rmtree(tmp_path / "run" / "1" / "meta")
    with pytest.raises(ValueError, match="no other step in .* is intact"):
        manager.restore()
    assert manager.last_good_step() == 2
    time.sleep(0.2)  # orbax's abandoned reads finish inside this test: an unraisable they report fails it


def test_pruning_counts_every_writers_steps_and_spares_foreign_directories(setup, tmp_path):
    adapters = setup[3]
    first = jlora.AdapterCheckpointManager(tmp_path / "run", max_to_keep=2)
    second = jlora.AdapterCheckpointManager(tmp_path / "run", max_to_keep=2)
    (tmp_path / "run" / "0").mkdir()
    (tmp_path / "run" / "0" / "notes.txt").write_text("not jlora's")
    (tmp_path / "run" / "events.log").write_text("kept")
    first.save(1, adapters, CONFIG)
    second.save(2, scaled(adapters, 2), CONFIG)
    first.save(3, scaled(adapters, 3), CONFIG)
    assert sorted(os.listdir(tmp_path / "run")) == ["0", "2", "3", "events.log"]
    assert json.loads((tmp_path / "run" / "3" / "meta" / "metadata").read_text())["format"] == "jlora.adapters/2"

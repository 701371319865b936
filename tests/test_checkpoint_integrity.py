"""What a checkpoint guarantees on load: checksummed metadata, the base's content digest (another fine-tune of the
same architecture is refused unless check_weights=False), format 1 still read, nothing printed on stderr after a
caught error.

    python -m pytest -q tests/test_checkpoint_integrity.py
"""

import gc
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_checkpoint import CONFIG, Block, X, assert_trees_equal, make, noisy, scaled, variables_of

import jlora
from jlora.paths import named_leaves


@pytest.fixture(scope="module")
def setup():
    return make()


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity") / "c"
    jlora.save_adapters(path, setup[3], CONFIG, variables=setup[2])
    return path


def test_a_changed_character_in_the_metadata_is_refused(setup, saved, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(saved, path)
    file = path / "meta" / "metadata"
    text = file.read_text()
    assert '"alpha": 14' in text
    file.write_text(text.replace('"alpha": 14', '"alpha": 15'))  # still valid JSON, a different scale
    with pytest.raises(ValueError, match=re.escape(f"the metadata file {file} does not match its sha256 checksum")):
        jlora.load_adapters(path)
    assert json.loads(text)["format"] == "jlora.adapters/2"
    file.write_text(text.replace('"jlora.adapters/2"', '"jlora.adapters/1"'))  # a downgrade keeps the checksum key
    with pytest.raises(ValueError, match=r"is not of format 'jlora.adapters/2' .*; got format 'jlora.adapters/1' "
                                         r"with the keys \[.*'sha256'\]"):
        jlora.load_adapters(path)
    file.write_text(text)
    assert_trees_equal(jlora.load_adapters(path, variables=setup[1])[0], setup[3])


def test_format_1_checkpoints_still_load(setup, tmp_path):
    """A checkpoint written as jlora 0.1.0 wrote it: no checksum, a fingerprint of shapes and dtypes only."""
    _, variables, _, adapters = setup
    arrays = {p: {"shape": list(x.shape), "dtype": x.dtype.name} for p, x in named_leaves(adapters)}
    base = {p: {k: v for k, v in spec.items() if k != "digest"}
            for p, spec in jlora.fingerprint(variables, adapters).items()}
    meta = {"format": "jlora.adapters/1", "config": CONFIG.to_dict(), "arrays": arrays, "base": base}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(tmp_path / "v1", args=ocp.args.Composite(adapters=ocp.args.StandardSave(adapters),
                                                                   meta=ocp.args.JsonSave(meta)))
    other = jax.tree.map(lambda x: x + 1.0, variables)  # shapes only: any weights of these shapes pass
    restored, config = jlora.load_adapters(tmp_path / "v1", variables=other)
    assert config == CONFIG
    assert_trees_equal(restored, adapters)
    with pytest.raises(ValueError, match="fingerprint differs"):
        jlora.load_adapters(tmp_path / "v1", variables=variables_of(hidden=23))
    jlora.save_adapters(tmp_path / "v1", scaled(adapters, 2), CONFIG, overwrite=True)  # a format-1 dir is jlora's
    assert_trees_equal(jlora.load_adapters(tmp_path / "v1")[0], scaled(adapters, 2))


def another_fine_tune(variables, paths=("query", "value"), seed=5):
    """The same architecture with other weights at `paths` (every element moved, as a full fine-tune does)."""
    tuned = noisy(variables, seed)
    return {"params": {k: tuned["params"][k] if k in paths else v for k, v in variables["params"].items()}}


def test_adapters_on_another_fine_tune_of_the_base_are_refused(setup, saved):
    _, variables, _, adapters = setup
    with pytest.raises(ValueError, match="fingerprint differs") as e:
        jlora.load_adapters(saved, variables=another_fine_tune(variables))
    msg = str(e.value)
    assert "params/query/kernel: weights differ from the saved base (content digest)" in msg
    assert "params/value/kernel: weights differ from the saved base (content digest)" in msg
    assert "bias" not in msg  # leaves trained in full replace the base: their base values do not matter
    assert "pass check_weights=False to compare only shapes and dtypes" in msg
    with pytest.raises(ValueError, match=r"fingerprint differs\):\n  params/value/kernel: weights differ"):
        jlora.load_adapters(saved, variables=another_fine_tune(variables, paths=("value",)))
    restored, _ = jlora.load_adapters(saved, variables=another_fine_tune(variables), check_weights=False)
    assert_trees_equal(restored, adapters)
    biases = jax.tree_util.tree_map_with_path(lambda p, x: x + 1 if "bias" in jax.tree_util.keystr(p) else x,
                                              variables)
    assert_trees_equal(jlora.load_adapters(saved, variables=biases)[0], adapters)


def test_the_manager_checks_the_weights_too(setup, tmp_path):
    _, variables, frozen, adapters = setup
    with jlora.AdapterCheckpointManager(tmp_path / "run") as manager:
        manager.save(1, adapters, CONFIG, variables=frozen)
        with pytest.raises(ValueError, match=r"params/query/kernel: weights differ (.|\n)*check_weights=False"):
            manager.restore(variables=another_fine_tune(variables))
        assert_trees_equal(manager.restore(variables=another_fine_tune(variables), check_weights=False)[0], adapters)


def test_abstract_variables_need_check_weights_false(setup, saved):
    adapters = setup[3]
    abstract = jax.eval_shape(Block().init, jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"params/query/kernel: the variables hold no values here \(ShapeDtypeStruct"
                                         r"\)(.|\n)*check_weights=False"):
        jlora.load_adapters(saved, variables=abstract)
    assert_trees_equal(jlora.load_adapters(saved, variables=abstract, check_weights=False)[0], adapters)


def test_digest_reads_a_fixed_strided_sample(tmp_path):
    from jlora import basecheck

    x = np.random.default_rng(0).standard_normal((1000, 1001)).astype(np.float32)
    d = basecheck.digest(x)
    assert d == basecheck.digest(jnp.asarray(x))  # numpy, jax (and bfloat16 below) alike
    assert d != basecheck.digest(x.reshape(1001, 1000)) and d != basecheck.digest(x.astype(jnp.bfloat16))
    idx = basecheck._indices(x.size)
    assert len(idx) == 4096 and idx[0] == 0 and idx[-1] == x.size - 1 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.asarray(basecheck._take(jnp.asarray(x), jnp.asarray(idx))), x.reshape(-1)[idx])
    for flat, changed in ((idx[2000], True), (x.size - 1, True), (idx[1] + 1, False)):  # unsampled: not seen
        y = x.copy().reshape(-1)
        y[flat] += 1.0
        assert (basecheck.digest(y.reshape(x.shape)) != d) is changed, flat
    small = np.arange(11 * 19, dtype=np.float32).reshape(11, 19)
    assert np.array_equal(basecheck._indices(small.size), np.arange(small.size))  # every element of a small weight
    assert basecheck.digest(jax.ShapeDtypeStruct((3, 4), jnp.float32)) is None


def test_a_caught_error_logs_nothing(setup, tmp_path, caplog, monkeypatch):
    adapters = setup[3]
    import tensorstore as ts

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    caplog.set_level(logging.DEBUG)
    with monkeypatch.context() as m:
        m.setattr(ts.TensorStore, "write", disk_full)
        with pytest.raises(OSError, match="disk full"):
            jlora.save_adapters(tmp_path / "c", adapters, CONFIG)
    gc.collect()  # what the failed save left is freed now, not in a later test: it must log and warn nothing
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert os.listdir(tmp_path) == []


QUIET = """
import gc, os, shutil, sys, time
import numpy as np
import tensorstore as ts
import jlora
from jlora.paths import nest

adapters = nest({"params/q/kernel/lora_a": np.ones((11, 7), np.float32),
                 "params/q/kernel/lora_b": np.ones((7, 19), np.float32),
                 "params/q/bias": np.ones((19,), np.float32), "params/k/bias": np.ones((5,), np.float32)})
config = jlora.LoraConfig(rank=7, alpha=14, targets=("q",), modules_to_save=("k",))
path = os.path.join(sys.argv[1], "c")
jlora.save_adapters(path, adapters, config)
shutil.rmtree(os.path.join(path, "adapters", "d"))  # every array's data gone: concurrent reads fail
try:
    jlora.load_adapters(path)
except ValueError as e:
    print("caught load", e.__class__.__name__ == "CorruptCheckpointError")

def disk_full(*args, **kwargs):
    raise OSError("disk full")

ts.TensorStore.write = disk_full
try:
    jlora.save_adapters(os.path.join(sys.argv[1], "d"), adapters, config)
except OSError as e:
    print("caught save", e)
gc.collect()  # the caught exceptions and what they held are freed
time.sleep(0.5)  # orbax's abandoned reads and writes finish here
print("end")
"""


def test_nothing_is_printed_on_stderr_after_a_caught_error(tmp_path):
    child = subprocess.run([sys.executable, "-c", QUIET, str(tmp_path)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert child.returncode == 0, child.stderr
    assert child.stderr == ""
    assert child.stdout.splitlines() == ["caught load True", "caught save disk full", "end"]


def test_orbax_tasks_left_failed_or_pending_are_freed_silently_but_no_others(caplog):
    """The tasks a failed orbax write leaves (failed, or pending on the loop orbax closed) log nothing when freed
    after `quiet_orbax` settled them; a failed task that is not orbax's still logs."""
    import asyncio

    from jlora import quiet

    source = "async def fail():\n    raise OSError('disk full')\n\nasync def wait(f):\n    await f\n"
    orbax, other = {}, {}
    exec(compile(source, "/site-packages/orbax/checkpoint/fake.py", "exec"), orbax)
    exec(compile(source, "/site-packages/mine/fake.py", "exec"), other)
    loop = asyncio.new_event_loop()
    never = loop.create_future()
    tasks = [loop.create_task(orbax["fail"]()), loop.create_task(orbax["wait"](never)),
             loop.create_task(other["fail"]())]
    for _ in range(3):
        loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    assert [t.done() for t in tasks] == [True, False, True]
    caplog.set_level(logging.DEBUG)
    quiet._settle_abandoned_tasks()
    del tasks, never
    gc.collect()
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(messages) == 1 and "Task exception was never retrieved" in messages[0] and "mine" in messages[0]


def test_settling_tasks_reads_no_attribute_of_other_objects():
    """Objects whose `__class__` warns or raises (torch's deprecated `reduce_op`) are passed over untouched."""
    import warnings

    from jlora import quiet

    class Touchy:
        @property
        def __class__(self):
            warnings.warn("read", FutureWarning, stacklevel=2)
            raise AttributeError("__class__")

    alive = [Touchy() for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet._settle_abandoned_tasks()
    assert len(alive) == 3


def test_late_reports_are_dropped_only_for_orbax_tasks_failing_with_an_error_already_raised(caplog):
    """The asyncio logger's filter: a report on an orbax task whose error quiet_orbax re-raised is dropped; the
    same error on another library's task, or another error on an orbax task, still logs."""
    from jlora import quiet

    with pytest.raises(OSError, match="quota"), quiet.quiet_orbax():
        raise OSError("quota")
    caplog.set_level(logging.DEBUG)
    logger = logging.getLogger("asyncio")
    for error, where in ((OSError("quota"), "/site-packages/orbax/checkpoint/x.py"),
                         (OSError("quota"), "/site-packages/mine/x.py"),
                         (OSError("other"), "/site-packages/orbax/checkpoint/x.py")):
        logger.error("Task exception was never retrieved\nfuture: <Task finished coro=<f() defined at %s>>", where,
                     exc_info=(type(error), error, None))
    assert [r.getMessage().split("defined at ")[1] for r in caplog.records if r.name == "asyncio"] == [
        "/site-packages/mine/x.py>>", "/site-packages/orbax/checkpoint/x.py>>"]

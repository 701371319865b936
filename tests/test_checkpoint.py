"""Adapter checkpoints: exact round trips, adapters alone on disk, fingerprint checks, atomic step manager.

    python -m pytest -q tests/test_checkpoint.py
"""

import gc
import json
import os
import re
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jlora
from jlora import basecheck
from jlora.checkpoint import checksum
from jlora.paths import named_leaves, select_targets

IN, HIDDEN, OUT, RANK = 11, 19, 13, 7  # pairwise distinct, so a transposed or swapped factor cannot fit
CONFIG = jlora.LoraConfig(rank=RANK, alpha=14, targets=("query", "value"), bias="lora_only")


class Block(nn.Module):
    hidden: int = HIDDEN
    second: str = "value"
    wide: int = 0  # > 0 adds a large frozen, non-targeted layer "key" (in -> wide)

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.hidden, name="query")(x))
        y = nn.Dense(OUT, name=self.second)(h)
        if self.wide:
            y = y + nn.Dense(self.wide, name="key", use_bias=False)(x)[..., :OUT]
        return y


X = jax.random.normal(jax.random.key(0), (5, IN))


def variables_of(**block):
    """Abstract variables (ShapeDtypeStructs): all a fingerprint check reads."""
    return jax.eval_shape(Block(**block).init, jax.random.key(0), X)


def scaled(adapters, k):
    """`k * adapters`, computed in numpy (no compile per shape), keeping each dtype."""
    return jax.tree.map(lambda x: jnp.asarray((k * np.asarray(x, np.float32)).astype(x.dtype)), adapters)


def noisy(adapters, seed=3):
    """Adds N(0, 0.3^2) noise to every adapter leaf, so lora_b (zero at init) is non-zero."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray((np.asarray(x, np.float32) + 0.3 * rng.standard_normal(x.shape)).astype(x.dtype)),
        adapters)


def make(config=CONFIG, **block):
    model = Block(**block)
    variables = model.init(jax.random.key(0), X)
    lora = jlora.lora_transform(model.apply, config)
    frozen, adapters = lora.init(variables, X, key=jax.random.key(1))
    return lora, variables, frozen, noisy(adapters)


@pytest.fixture(scope="module")
def setup():
    return make()


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    _, _, frozen, adapters = setup
    path = tmp_path_factory.mktemp("ckpt") / "adapters"
    jlora.save_adapters(path, adapters, CONFIG, variables=frozen)
    return path


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), (_, w) in zip(named_leaves(got), named_leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape, path
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=path)


def test_round_trip_is_exact(setup, saved):
    lora, variables, frozen, adapters = setup
    for kwargs in ({}, {"variables": variables}, {"variables": frozen}):
        restored, config = jlora.load_adapters(saved, **kwargs)
        assert config == CONFIG
        assert_trees_equal(restored, adapters)
    assert float(jnp.abs(adapters["params"]["query"]["kernel"]["lora_b"]).max()) > 0  # non-zero B: a real check
    np.testing.assert_array_equal(lora.apply(frozen, restored, X), lora.apply(frozen, adapters, X))


def test_fingerprint_records_base_shapes(setup):
    _, variables, frozen, adapters = setup
    digest = {p: basecheck.digest(x) for p, x in named_leaves(variables) if p.endswith("kernel")}
    want = {
        "params/query/bias": {"shape": [HIDDEN], "dtype": "float32", "digest": None},
        "params/query/kernel": {"shape": [IN, HIDDEN], "dtype": "float32", "digest": digest["params/query/kernel"]},
        "params/value/bias": {"shape": [OUT], "dtype": "float32", "digest": None},
        "params/value/kernel": {"shape": [HIDDEN, OUT], "dtype": "float32", "digest": digest["params/value/kernel"]},
    }
    assert re.fullmatch("strided4096-sha256:[0-9a-f]{64}", digest["params/query/kernel"])
    assert digest["params/query/kernel"] != digest["params/value/kernel"]
    assert jlora.fingerprint(variables, adapters) == want
    assert jlora.fingerprint(frozen, adapters) == want  # the frozen tree's None slots read from the adapters
    assert json.loads(json.dumps(want)) == want
    other = variables_of(second="out")
    with pytest.raises(ValueError, match=re.escape("params/value/kernel")):
        jlora.fingerprint(other, adapters)


def test_only_the_adapters_are_on_disk(tmp_path):
    _, variables, frozen, adapters = make(wide=8192)
    path = tmp_path / "ckpt"
    jlora.save_adapters(path, adapters, CONFIG, variables=frozen)
    on_disk = ocp.StandardCheckpointHandler().metadata(path / "adapters").tree
    assert {p for p, _ in named_leaves(on_disk)} == {p for p, _ in named_leaves(adapters)}
    restored, _ = jlora.load_adapters(path, variables=variables)
    assert {p for p, _ in named_leaves(restored)} == {p for p, _ in named_leaves(adapters)}
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    frozen_bytes = variables["params"]["key"]["kernel"].nbytes  # 11 * 8192 * 4 bytes = 360 KiB, never written
    assert disk < frozen_bytes / 4, (disk, frozen_bytes)


def test_fingerprint_mismatch_names_path_and_both_shapes(saved):
    other = variables_of(hidden=23)
    with pytest.raises(ValueError, match="fingerprint differs") as e:
        jlora.load_adapters(saved, variables=other)
    msg = str(e.value)
    assert "params/query/kernel: saved base (11, 19) float32, variables have (11, 23) float32" in msg
    assert "params/value/kernel: saved base (19, 13) float32, variables have (23, 13) float32" in msg


def test_dtype_mismatch_is_a_fingerprint_error(saved, setup):
    variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), setup[1])
    with pytest.raises(ValueError, match=re.escape("saved base (11, 19) float32, variables have (11, 19) bfloat16")):
        jlora.load_adapters(saved, variables=variables)


def test_missing_path_in_variables_raises(saved):
    other = variables_of(second="out")
    with pytest.raises(ValueError, match="params/value/kernel: missing from the variables"):
        jlora.load_adapters(saved, variables=other)


def test_without_saved_base_each_pair_must_fit_its_weight(setup, tmp_path):
    _, variables, _, adapters = setup
    jlora.save_adapters(tmp_path / "c", adapters, CONFIG)  # no variables: adapter shapes only
    restored, _ = jlora.load_adapters(tmp_path / "c", variables=variables)
    assert_trees_equal(restored, adapters)
    other = variables_of(hidden=23)
    with pytest.raises(ValueError, match=r"params/query/kernel: adapter shapes lora_a \(11, 7\)") as e:
        jlora.load_adapters(tmp_path / "c", variables=other)
    assert "params/query/bias: saved array (19,) float32, variables have (23,) float32" in str(e.value)


def test_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        jlora.load_adapters(tmp_path / "nope")


def _truncate(path):
    with open(path, "r+") as f:
        f.truncate(7)


@pytest.mark.parametrize("damage, match", [
    (lambda p: os.remove(p / "meta" / "metadata"), "metadata cannot be read"),
    (lambda p: _truncate(p / "meta" / "metadata"), "metadata cannot be read"),
    (lambda p: shutil.rmtree(p / "meta"), "metadata cannot be read"),
    (lambda p: shutil.rmtree(p / "adapters" / "d"), "adapter arrays cannot be read"),  # orbax's other reads are
    (lambda p: shutil.rmtree(p / "adapters"), "adapter arrays cannot be read"),  # abandoned: jlora.quiet silences them
], ids=["meta-deleted", "meta-truncated", "meta-dir-deleted", "array-data-deleted", "arrays-dir-deleted"])
def test_corrupt_checkpoint_raises_a_clear_error(setup, tmp_path, damage, match):
    path = tmp_path / "c"
    jlora.save_adapters(path, setup[3], CONFIG)
    damage(path)
    with pytest.raises(ValueError, match=match) as e:
        jlora.load_adapters(path)
    assert str(path) in str(e.value)
    time.sleep(0.2)  # orbax's abandoned reads finish inside this test: an unraisable they report fails it
    gc.collect()


def test_a_foreign_checkpoint_is_rejected(tmp_path):
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(tmp_path / "c", args=ocp.args.Composite(meta=ocp.args.JsonSave({"step": 3})))
    with pytest.raises(ValueError, match="not a jlora adapter checkpoint"):
        jlora.load_adapters(tmp_path / "c")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["config"].update(rank=0), "saved config is invalid"),
    (lambda m: m["arrays"]["params/query/bias"].update(dtype="float99"), "saved array specs are malformed"),
    (lambda m: m.update(base=[1]), "saved array specs are malformed"),
    (lambda m: m.pop("arrays"), "not a jlora adapter checkpoint"),
])
def test_invalid_saved_metadata_raises(setup, tmp_path, edit, match):
    path = tmp_path / "c"
    jlora.save_adapters(path, setup[3], CONFIG, variables=setup[1])
    meta = json.loads((path / "meta" / "metadata").read_text())
    edit(meta)
    meta["sha256"] = checksum({k: v for k, v in meta.items() if k != "sha256"})  # a consistent but invalid file
    (path / "meta" / "metadata").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        jlora.load_adapters(path)


def test_restore_against_a_given_target(setup, saved):
    adapters = setup[3]
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters)
    restored, _ = jlora.load_adapters(saved, target=target)
    assert_trees_equal(restored, adapters)
    wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[::-1], x.dtype), adapters)
    del wrong["params"]["value"]["bias"]
    with pytest.raises(ValueError, match="target does not match") as e:
        jlora.load_adapters(saved, target=wrong)
    assert "params/value/bias: missing from the target" in str(e.value)
    assert "params/query/kernel/lora_a: saved shape (11, 7), target (7, 11)" in str(e.value)
    wrong["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    with pytest.raises(ValueError, match="params/extra: not in the checkpoint"):
        jlora.load_adapters(saved, target=wrong)


def test_save_errors(setup, saved, tmp_path):
    adapters = setup[3]
    with pytest.raises(FileExistsError, match=re.escape(str(saved))):
        jlora.save_adapters(saved, adapters, CONFIG)
    with pytest.raises(TypeError, match="jlora.LoraConfig"):
        jlora.save_adapters(tmp_path / "c", adapters, CONFIG.to_dict())
    with pytest.raises(ValueError, match="holds no arrays"):
        jlora.save_adapters(tmp_path / "c", {}, CONFIG)
    with pytest.raises(ValueError, match="not arrays"):
        jlora.save_adapters(tmp_path / "c", {"params": {"w": "text"}}, CONFIG)
    assert not (tmp_path / "c").exists()


def test_overwrite_replaces(setup, tmp_path):
    adapters = setup[3]
    jlora.save_adapters(tmp_path / "c", adapters, CONFIG)
    doubled = scaled(adapters, 2)
    jlora.save_adapters(tmp_path / "c", doubled, CONFIG, overwrite=True)
    assert_trees_equal(jlora.load_adapters(tmp_path / "c")[0], doubled)


def test_bf16_adapters_keep_their_dtype(tmp_path):
    config = jlora.LoraConfig(rank=RANK, alpha=14, targets=("query", "value"), bias="lora_only", dtype=jnp.bfloat16)
    lora, variables, frozen, adapters = make(config)
    assert adapters["params"]["query"]["kernel"]["lora_a"].dtype == jnp.bfloat16
    jlora.save_adapters(tmp_path / "c", adapters, config, variables=variables)
    restored, loaded = jlora.load_adapters(tmp_path / "c", variables=frozen)
    assert_trees_equal(restored, adapters)  # pairs bfloat16, biases float32
    assert jnp.dtype(loaded.dtype) == jnp.bfloat16
    np.testing.assert_array_equal(lora.apply(frozen, restored, X), lora.apply(frozen, adapters, X))


def test_predicate_targets_are_saved_as_paths(tmp_path):
    config = jlora.LoraConfig(rank=RANK, alpha=14, bias="lora_only",
                              targets=lambda path, leaf: path.endswith(("query/kernel", "value/kernel")))
    lora, variables, frozen, adapters = make(config)
    jlora.save_adapters(tmp_path / "c", adapters, config, variables=frozen)
    restored, loaded = jlora.load_adapters(tmp_path / "c", variables=variables)
    assert isinstance(loaded.targets, str)
    assert select_targets(variables, loaded) == select_targets(variables, config)
    reloaded = jlora.lora_transform(Block().apply, loaded)
    np.testing.assert_array_equal(reloaded.apply(frozen, restored, X), lora.apply(frozen, adapters, X))


def test_manager_keeps_the_last_n_and_restores_latest_and_given_step(setup, tmp_path):
    _, variables, frozen, adapters = setup
    with jlora.AdapterCheckpointManager(tmp_path / "run", max_to_keep=2) as manager:
        assert manager.latest_step() is None
        for step in (1, 2, 3):
            manager.save(step, scaled(adapters, step), CONFIG, variables=frozen)
        assert manager.all_steps() == [2, 3] and manager.latest_step() == 3
        assert sorted(os.listdir(tmp_path / "run")) == ["2", "3"]
        latest, config = manager.restore(variables=variables)
        assert_trees_equal(latest, scaled(adapters, 3))
        assert config == CONFIG
        assert_trees_equal(manager.restore(2)[0], scaled(adapters, 2))
        manager.wait()
    with jlora.AdapterCheckpointManager(tmp_path / "run") as reopened:  # a new process sees the same steps
        assert reopened.all_steps() == [2, 3]
        assert_trees_equal(reopened.restore()[0], scaled(adapters, 3))


def test_manager_errors(setup, tmp_path):
    adapters = setup[3]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="max_to_keep"):
            jlora.AdapterCheckpointManager(tmp_path / "bad", max_to_keep=bad)
    with jlora.AdapterCheckpointManager(tmp_path / "run") as manager:
        with pytest.raises(FileNotFoundError, match="no adapter checkpoints"):
            manager.restore()
        with pytest.raises(ValueError, match="step must be"):
            manager.save(-1, adapters, CONFIG)
        manager.save(5, adapters, CONFIG)
        with pytest.raises(ValueError, match="not after the latest saved step 5"):
            manager.save(5, adapters, CONFIG)
        with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 4 .* the steps are \[5\]"):
            manager.restore(4)
        other = variables_of(hidden=23)
        with pytest.raises(ValueError, match="fingerprint differs"):  # no saved base: pairs checked against W
            manager.restore(variables=other)


def test_crash_mid_save_leaves_the_previous_step_readable(setup, tmp_path, monkeypatch):
    _, variables, frozen, adapters = setup
    manager = jlora.AdapterCheckpointManager(tmp_path / "run")
    manager.save(1, adapters, CONFIG, variables=frozen)

    async def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ocp.StandardCheckpointHandler, "async_save", crash)
        with pytest.raises(OSError, match="disk full"):
            manager.save(2, scaled(adapters, 2), CONFIG, variables=frozen)
        with pytest.raises(OSError, match="disk full"):
            jlora.save_adapters(tmp_path / "single", adapters, CONFIG)
    assert os.listdir(tmp_path / "run") == ["1"]  # the partial write is removed
    assert manager.latest_step() == 1
    assert_trees_equal(manager.restore(variables=variables)[0], adapters)
    manager.close()
    with jlora.AdapterCheckpointManager(tmp_path / "run") as reopened:  # a restarted process ignores the leftover
        assert reopened.all_steps() == [1]
        assert_trees_equal(reopened.restore(variables=variables)[0], adapters)
        reopened.save(2, scaled(adapters, 2), CONFIG)
        assert sorted(os.listdir(tmp_path / "run")) == ["1", "2"]
        assert_trees_equal(reopened.restore()[0], scaled(adapters, 2))
        assert_trees_equal(reopened.restore(1)[0], adapters)
    with pytest.raises(FileNotFoundError):
        jlora.load_adapters(tmp_path / "single")  # nothing at the path a crashed save aimed for
    assert sorted(os.listdir(tmp_path)) == ["run"]  # and nothing beside it

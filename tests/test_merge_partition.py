"""merge / unmerge / split / combine: pure, inverse, and every error path of the transform's bookkeeping."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb

import jlora


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(19, name="query")(x)
        h = nn.LayerNorm(name="ln")(jnp.tanh(h))
        return nn.Dense(13, name="head")(h)


X = jax.random.normal(jax.random.key(0), (5, 11))
MODEL = TwoLayer()
VARS = MODEL.init(jax.random.key(0), X)
CFG = jlora.LoraConfig(rank=7, alpha=3.0, targets=("query",), bias="lora_only", modules_to_save=("head",))


def setup(cfg=CFG):
    lora = jlora.lora_transform(MODEL.apply, cfg)
    frozen, adapters = lora.init(VARS, X, key=jax.random.key(1))
    return lora, frozen, perturb(adapters)


def test_split_combine_round_trip_exact():
    frozen, trainable = jlora.split(VARS, CFG)
    assert frozen["params"]["query"]["bias"] is None and frozen["params"]["head"]["kernel"] is None
    assert set(trainable["params"]) == {"query", "head"} and set(trainable["params"]["query"]) == {"bias"}
    back = jlora.combine(frozen, trainable)
    jax.tree.map(np.testing.assert_array_equal, back, VARS)


def test_init_partition_matches_split():
    _lora, frozen, adapters = setup()
    want_frozen, _ = jlora.split(VARS, CFG)
    assert jax.tree.structure(frozen) == jax.tree.structure(want_frozen)
    assert set(adapters["params"]["query"]) == {"kernel", "bias"}
    assert set(adapters["params"]["head"]) == {"kernel", "bias"}


def test_merge_equals_apply_and_inputs_untouched():
    lora, frozen, adapters = setup()
    before = jax.tree.map(np.array, (frozen, adapters))
    merged = jlora.merge(frozen, adapters, CFG)
    np.testing.assert_allclose(MODEL.apply(merged, X), lora.apply(frozen, adapters, X), atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, (frozen, adapters), before)
    assert merged["params"]["head"]["bias"] is adapters["params"]["head"]["bias"]


def test_unmerge_inverts_merge():
    _, frozen, adapters = setup()
    back = jlora.unmerge(jlora.merge(frozen, adapters, CFG), adapters, CFG)
    assert jax.tree.structure(back) == jax.tree.structure(frozen)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), back, frozen)


def test_merge_keeps_dtype_and_computes_in_float32():
    vars16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), VARS)
    cfg = jlora.LoraConfig(rank=7, alpha=3.0, targets=("query",), dtype=jnp.float32)
    frozen, adapters = jlora.lora_transform(MODEL.apply, cfg).init(vars16, X, key=jax.random.key(1))
    adapters = perturb(adapters)
    assert adapters["params"]["query"]["kernel"]["lora_a"].dtype == jnp.float32
    merged = jlora.merge(frozen, adapters, cfg)
    w = merged["params"]["query"]["kernel"]
    assert w.dtype == jnp.bfloat16
    a, b = adapters["params"]["query"]["kernel"].values()
    want = (vars16["params"]["query"]["kernel"].astype(jnp.float32) + 3.0 / 7 * (np.asarray(a) @ np.asarray(b)))
    np.testing.assert_array_equal(w, want.astype(jnp.bfloat16))


def test_adapters_for_another_model_are_rejected():
    lora, frozen, adapters = setup()
    bad = jax.tree.map(lambda x: x, adapters)
    bad["params"]["query"]["kernel"] = {"lora_a": jnp.ones((12, 7)), "lora_b": jnp.ones((7, 19))}
    with pytest.raises(ValueError, match=r"params/query/kernel: adapter shapes lora_a \(12, 7\).*\(11, 19\)"):
        lora.apply(frozen, bad, X)
    with pytest.raises(ValueError, match=r"params/query/kernel: adapter shapes"):
        jlora.merge(frozen, bad, CFG)
    ghost = {**adapters, "params": {**adapters["params"], "ghost": {"kernel": adapters["params"]["query"]["kernel"]}}}
    with pytest.raises(ValueError, match=r"\['params/ghost/kernel'\] have no parameter"):
        lora.apply(frozen, ghost, X)
    with pytest.raises(ValueError, match=r"\['params/ghost/kernel'\] have no parameter"):
        jlora.merge(frozen, ghost, CFG)
    stray = {**adapters, "params": {**adapters["params"], "ln": {"scale": jnp.ones(19)}}}
    with pytest.raises(ValueError, match=r"\['params/ln/scale'\], which are not None slots"):
        jlora.combine(frozen, stray)


def test_transform_errors():
    with pytest.raises(TypeError, match="jlora.LoraConfig"):
        jlora.lora_transform(MODEL.apply, {"rank": 8})
    with pytest.raises(TypeError, match="callable"):
        jlora.lora_transform(3, CFG)
    unused = jlora.LoraConfig(targets=("w", "v"))
    with pytest.raises(ValueError, match="'v' is never used"):
        jlora.lora_transform(lambda p, x: x @ p["w"], unused).init(
            {"w": jnp.ones((11, 19)), "v": jnp.ones((11, 19))}, X, key=jax.random.key(0))
    with pytest.raises(TypeError, match="variables leaf .* is a str"):
        jlora.lora_transform(lambda p, x: x @ p["w"], jlora.LoraConfig(targets=("w",))).init(
            {"w": jnp.ones((11, 19)), "name": "x"}, X, key=jax.random.key(0))
    with pytest.raises(ValueError, match="modules_to_save \\['classifier'\\] match no module"):
        jlora.lora_transform(MODEL.apply, jlora.LoraConfig(targets=("query",), modules_to_save=("classifier",))
                             ).init(VARS, X, key=jax.random.key(0))
    with pytest.raises(ValueError, match="both LoRA targets and trained in full"):
        jlora.lora_transform(MODEL.apply, jlora.LoraConfig(targets=("query",), modules_to_save=("query",))
                             ).init(VARS, X, key=jax.random.key(0))


def test_layout_errors():
    fused = jlora.LoraConfig(targets=("w",), fused={"w": (True, False, True)})
    with pytest.raises(ValueError, match=r"fused mask .* divisible by 3.*\(11, 19\)"):
        jlora.lora_transform(lambda p, x: x @ p["w"], fused).init({"w": jnp.ones((11, 19))}, X, key=jax.random.key(0))
    with pytest.raises(ValueError, match="contracted on its output axes"):
        jlora.lora_transform(lambda p, x: x @ p["w"].T, fused).init({"w": jnp.ones((18, 11))}, X,
                                                                    key=jax.random.key(0))

    def scanned(p, x):
        return jax.lax.scan(lambda c, w: (c * w, None), x[0, :4], p["w"])[0]

    with pytest.raises(ValueError, match="no room for a low-rank pair"):
        jlora.lora_transform(scanned, jlora.LoraConfig(targets=("w",))).init({"w": jnp.ones((3, 4))}, X,
                                                                             key=jax.random.key(0))


def test_linen_batch_stats_of_a_saved_module_stay_frozen():
    """modules_to_save=("bn",) trains BatchNorm's scale and bias; its running statistics are not parameters: they
    stay in the frozen tree (updated by mutable=["batch_stats"]) rather than reaching the optimizer."""

    class WithNorm(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            return nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(19, name="query")(x))

    x = jax.random.normal(jax.random.key(0), (5, 11))
    variables = WithNorm().init(jax.random.key(1), x, train=False)
    cfg = jlora.LoraConfig(rank=7, alpha=14, targets=("query",), modules_to_save=("bn",))
    lora = jlora.lora_transform(WithNorm().apply, cfg)
    frozen, adapters = lora.init(variables, x, train=False, key=jax.random.key(2))
    assert "batch_stats" not in adapters and set(adapters["params"]["bn"]) == {"scale", "bias"}
    assert frozen["batch_stats"]["bn"]["mean"].shape == (19,) and frozen["params"]["bn"]["scale"] is None
    adapters = perturb(adapters)  # lora_b non-zero
    y, updates = lora.apply(frozen, adapters, x, mutable=["batch_stats"])
    want, want_updates = WithNorm().apply(jlora.merge(frozen, adapters, cfg), x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, want, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["bn"]["mean"], want_updates["batch_stats"]["bn"]["mean"],
                               atol=1e-6)

"""lora_transform beyond the consumers: patterns, inits, kwargs passed through, vmap, frozen leaves as arguments."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb

import jlora


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        h = nn.Dense(19, name="query")(x)
        h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
        h = nn.Dropout(0.5, deterministic=not train)(jnp.tanh(h))
        return nn.Dense(13, name="value")(h)


X = jax.random.normal(jax.random.key(0), (5, 11))
MODEL = Net()
VARS = MODEL.init(jax.random.key(0), X, train=False)


def test_rank_and_alpha_patterns_shape_and_scale_each_target():
    cfg = jlora.LoraConfig(rank=7, alpha=3.0, targets=("query", "value"), rank_pattern={"value": 2},
                           alpha_pattern={"value": 8.0})
    lora = jlora.lora_transform(MODEL.apply, cfg, strict=True)
    frozen, ad = lora.init(VARS, X, train=False, key=jax.random.key(1))
    assert ad["params"]["query"]["kernel"]["lora_a"].shape == (11, 7)
    assert ad["params"]["value"]["kernel"]["lora_b"].shape == (2, 13)
    ad = perturb(ad)
    merged = jlora.merge(frozen, ad, cfg)
    a, b = ad["params"]["value"]["kernel"]["lora_a"], ad["params"]["value"]["kernel"]["lora_b"]
    np.testing.assert_allclose(merged["params"]["value"]["kernel"] - VARS["params"]["value"]["kernel"],
                               4.0 * a @ b, atol=1e-5)
    np.testing.assert_allclose(lora.apply(frozen, ad, X, train=False), MODEL.apply(merged, X, train=False),
                               atol=1e-5)


def test_gaussian_and_loralib_init_statistics():
    big = {"w": jnp.zeros((256, 96))}
    x = jnp.ones((2, 256))
    for init, std in (("loralib", (1 / 256) ** 0.5 / 3**0.5), ("gaussian", 1 / 16)):
        cfg = jlora.LoraConfig(rank=16, targets=("w",), init=init)
        _, ad = jlora.lora_transform(lambda p, x: x @ p["w"], cfg).init(big, x, key=jax.random.key(1))
        a = np.asarray(ad["w"]["lora_a"])
        assert abs(a.std() - std) < 0.05 * std and not np.any(ad["w"]["lora_b"])
        if init == "loralib":
            assert np.abs(a).max() <= 1 / 16


def test_mutable_collections_rngs_and_static_kwargs_pass_through():
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("query", "value"))
    lora = jlora.lora_transform(MODEL.apply, cfg, strict=True)
    frozen, ad = lora.init(VARS, X, train=False, key=jax.random.key(1))
    ad = perturb(ad)
    rngs = {"dropout": jax.random.key(4)}
    y, updates = jax.jit(lambda f, a, x: lora.apply(f, a, x, train=True, rngs=rngs, mutable=["batch_stats"]))(
        frozen, ad, X)
    merged = jlora.merge(frozen, ad, cfg)
    y_want, upd_want = MODEL.apply(merged, X, train=True, rngs=rngs, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_want, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), updates, upd_want)


def test_vmap_over_apply():
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("query",))
    lora = jlora.lora_transform(MODEL.apply, cfg, strict=True)
    frozen, ad = lora.init(VARS, X, train=False, key=jax.random.key(1))
    stacked = jax.tree.map(lambda t: jnp.stack([t, t + 0.1, t - 0.2]), ad)
    ys = jax.vmap(lambda a: lora.apply(frozen, a, X, train=False))(stacked)
    for i in range(3):
        one = jax.tree.map(lambda t, i=i: t[i], stacked)
        np.testing.assert_allclose(ys[i], MODEL.apply(jlora.merge(frozen, one, cfg), X, train=False), atol=1e-5)


def test_frozen_weights_are_arguments_not_constants():
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("query", "value"))
    lora = jlora.lora_transform(MODEL.apply, cfg)
    frozen, ad = lora.init(VARS, X, train=False, key=jax.random.key(1))

    def loss(frozen, ad, x):
        return jnp.sum(lora.apply(frozen, ad, x, train=False))

    closed = jax.make_jaxpr(jax.grad(loss, argnums=1))(frozen, ad, X)
    assert all(np.size(c) <= 1 for c in closed.consts), [np.shape(c) for c in closed.consts]
    assert len(closed.jaxpr.invars) == len(jax.tree.leaves((frozen, ad, X)))


def test_strict_error_says_it_refuses_and_the_warning_that_it_materialises():
    def f(params, x):
        return x @ jnp.sin(params["w"])  # sin: no factored rule

    params = {"w": jax.random.normal(jax.random.key(2), (11, 19))}
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("w",))
    frozen, ad = jlora.lora_transform(f, cfg).init(params, X, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"reaches `sin`.*strict=True refuses the fallback.*strict=False") as err:
        jlora.lora_transform(f, cfg, strict=True).apply(frozen, perturb(ad), X)
    assert "instead" not in str(err.value)
    with pytest.warns(jlora.FactoredFallbackWarning, match=r"reaches `sin`[^.]*; materialising W \+ scale"):
        jlora.lora_transform(f, cfg).apply(frozen, perturb(ad), X)

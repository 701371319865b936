"""Training: gradients of the factored forward, trainable sets per bias mode, masked optimizer, dropout."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import perturb
from test_consumers import Stacked

import jlora


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(19, name="query")(x))
        h = nn.LayerNorm(name="ln")(h)
        h = nn.Conv(7, (3,), name="conv")(h[..., None, :].repeat(4, axis=-2))
        return nn.Dense(13, name="value")(h.mean(-2))


X = jax.random.normal(jax.random.key(0), (5, 11))
MODEL = Net()
VARS = MODEL.init(jax.random.key(0), X)
T = jax.random.normal(jax.random.key(9), (5, 13))


def loss_of(y):
    return jnp.sum(jnp.sin(y) * T)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_gradients_equal_those_of_the_merged_weights(bias):
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("query", "conv", "value"), bias=bias)
    lora = jlora.lora_transform(MODEL.apply, cfg, strict=True)
    frozen, adapters = lora.init(VARS, X, key=jax.random.key(1))
    adapters = perturb(adapters)
    g = jax.jit(jax.grad(lambda a: loss_of(lora.apply(frozen, a, X))))(adapters)
    want = jax.grad(lambda a: loss_of(MODEL.apply(jlora.merge(frozen, a, cfg), X)))(adapters)
    chex.assert_trees_all_close(g, want, atol=2e-5, rtol=1e-4)
    assert all(float(jnp.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(g))


def test_gradients_through_scan_stacked_layers():
    m, x = Stacked(), jax.random.normal(jax.random.key(0), (2, 5, 6))
    variables = m.init(jax.random.key(0), x)
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("dense",))
    lora = jlora.lora_transform(m.apply, cfg, strict=True)
    frozen, adapters = lora.init(variables, x, key=jax.random.key(1))
    adapters = perturb(adapters)
    g = jax.grad(lambda a: jnp.sum(jnp.cos(lora.apply(frozen, a, x))))(adapters)
    want = jax.grad(lambda a: jnp.sum(jnp.cos(m.apply(jlora.merge(frozen, a, cfg), x))))(adapters)
    chex.assert_trees_all_close(g, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "bias, extra",
    [("none", set()), ("all", {"query/bias", "conv/bias", "value/bias", "ln/bias"}),
     ("lora_only", {"query/bias", "value/bias"})],
)
def test_trainable_set_per_bias_mode(bias, extra):
    cfg = jlora.LoraConfig(rank=3, targets=("query", "value"), bias=bias)
    frozen, adapters = jlora.lora_transform(MODEL.apply, cfg).init(VARS, X, key=jax.random.key(1))
    paths = {"/".join(str(k.key) for k in p[1:]) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    lora = {f"{m}/kernel/lora_{s}" for m in ("query", "value") for s in "ab"}
    assert paths == lora | extra
    frozen_paths = {"/".join(str(k.key) for k in p[1:]) for p, x in
                    jax.tree_util.tree_flatten_with_path(frozen, is_leaf=lambda x: x is None)[0] if x is None}
    assert frozen_paths == extra
    mask = jlora.trainable_mask(adapters, cfg)
    assert all(jax.tree.leaves(mask))


def test_masked_optimizer_freezes_frozen_leaves():
    cfg = jlora.LoraConfig(rank=3, targets=("query",), bias="lora_only")
    tree = {"query": {"kernel": {"lora_a": jnp.ones((11, 3)), "lora_b": jnp.ones((3, 19))}, "bias": jnp.ones(19)},
            "value": {"kernel": jnp.ones((19, 13)), "bias": jnp.ones(13)}}
    tx = jlora.masked_optimizer(optax.adamw(0.1, weight_decay=0.5), cfg)
    state = tx.init(tree)
    adam_state = state.inner_states["trainable"].inner_state[0]
    mu = adam_state.mu
    assert isinstance(mu["value"]["kernel"], optax.MaskedNode) and isinstance(mu["value"]["bias"], optax.MaskedNode)
    assert mu["query"]["kernel"]["lora_a"].shape == (11, 3) and mu["query"]["bias"].shape == (19,)
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = tx.update(grads, state, tree)
    assert not np.any(updates["value"]["kernel"]) and not np.any(updates["value"]["bias"])  # no decay either
    assert np.all(np.asarray(updates["query"]["bias"]) != 0)
    explicit = jlora.masked_optimizer(optax.sgd(1.0), jax.tree.map(lambda _: False, tree))
    assert not any(np.any(u) for u in jax.tree.leaves(explicit.update(grads, explicit.init(tree), tree)[0]))
    by_fn = jlora.masked_optimizer(optax.sgd(1.0), lambda p: jax.tree.map(lambda _: True, p))
    assert all(np.all(u == -1) for u in jax.tree.leaves(by_fn.update(grads, by_fn.init(tree), tree)[0]))


def test_train_step_compiles_once_and_learns():
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("query", "value"), dropout=0.1)
    lora = jlora.lora_transform(MODEL.apply, cfg)
    frozen, adapters = lora.init(VARS, X, key=jax.random.key(1))
    tx = optax.adam(3e-2)
    state = tx.init(adapters)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(adapters, state, x, y, key):
        def loss(a):
            return jnp.mean((lora.apply(frozen, a, x, dropout_key=key) - y) ** 2)

        value, g = jax.value_and_grad(loss)(adapters)
        updates, state = tx.update(g, state, adapters)
        return optax.apply_updates(adapters, updates), state, value

    keys = jax.random.split(jax.random.key(5), 60)
    target = MODEL.apply(VARS, X) + 0.5
    losses = []
    for i in range(60):
        x = X + 0.01 * jax.random.normal(keys[i], X.shape)
        adapters, state, value = step(adapters, state, x, target, keys[i])
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0]


def dropout_setup(rate=0.25):
    def f(params, x):
        return x @ params["w"]

    n = 64
    cfg = jlora.LoraConfig(rank=n, alpha=n, targets=("w",), dropout=rate)  # scale 1
    lora = jlora.lora_transform(f, cfg, strict=True)
    params = {"w": 0.1 * jax.random.normal(jax.random.key(2), (n, n))}
    x = jax.random.normal(jax.random.key(3), (200, n))
    frozen, _ = lora.init(params, x, key=jax.random.key(1))
    adapters = {"w": {"lora_a": jnp.eye(n), "lora_b": jnp.eye(n)}}  # the LoRA branch is the identity
    return lora, frozen, adapters, x, params


def test_dropout_statistics_branch_only_and_determinism():
    rate = 0.25
    lora, frozen, adapters, x, params = dropout_setup(rate)
    apply = jax.jit(lora.apply)
    branch = apply(frozen, adapters, x, dropout_key=jax.random.key(7)) - x @ params["w"]  # base path untouched
    kept = np.isclose(branch, x / (1 - rate), atol=1e-5)
    dropped = np.isclose(branch, 0.0, atol=1e-6)
    assert np.all(kept | dropped)
    assert abs(dropped.mean() - rate) < 0.02
    np.testing.assert_array_equal(apply(frozen, adapters, x, dropout_key=jax.random.key(7)),
                                  apply(frozen, adapters, x, dropout_key=jax.random.key(7)))
    assert not np.allclose(apply(frozen, adapters, x, dropout_key=jax.random.key(8)),
                           apply(frozen, adapters, x, dropout_key=jax.random.key(7)))
    np.testing.assert_allclose(apply(frozen, adapters, x), x @ params["w"] + x, atol=1e-5)  # no key: no dropout


def test_dropout_masks_differ_across_scanned_layers():
    def f(params, x):
        return jax.lax.scan(lambda c, w: (c @ w, c), x, params["w"])[1]

    n = 16
    cfg = jlora.LoraConfig(rank=n, alpha=n, targets=("w",), dropout=0.5)
    params, x = {"w": jnp.zeros((3, n, n))}, jnp.ones((4, n))
    lora = jlora.lora_transform(f, cfg, strict=True)
    frozen, _ = lora.init(params, x, key=jax.random.key(1))
    eye = jnp.broadcast_to(jnp.eye(n), (3, n, n))
    outs = lora.apply(frozen, {"w": {"lora_a": eye, "lora_b": eye}}, x, dropout_key=jax.random.key(0))
    assert not np.array_equal(outs[1] == 0, outs[2] == 0)

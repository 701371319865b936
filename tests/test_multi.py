"""jlora.multi: stacking K adapters (padded ranks, own scales), running them in one program, training a grid equal
to K separate runs, hot swap without retracing."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import multi

RANKS, ALPHAS, LRS, DECAYS = (7, 3, 5), (16.0, 2.0, 5.0), (3e-3, 1e-2, 1e-3), (0.1, 0.0, 0.01)


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(19, name="out")(jnp.tanh(nn.Dense(13, name="hidden")(x)))


def _configs(dropout=0.1, **kw):
    return [jlora.LoraConfig(rank=r, alpha=a, targets=("hidden", "out"), dropout=dropout, **kw)
            for r, a in zip(RANKS, ALPHAS)]


def _normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def _noisy(tree, seed):
    """`tree` plus N(0, 0.3) noise (numpy: no compiles), so lora_b is non-zero."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape, np.float32)), tree)


def _pairs(configs, seed=0, bias=False):
    """Random adapters of Tiny for `configs` (lora pairs at hidden and out, at `rank_for`; with `bias` the biases
    trained in full too), without lora.init."""
    rng, out = np.random.default_rng(seed), []

    def normal(*shape):
        return jnp.asarray(0.3 * rng.standard_normal(shape, np.float32))

    for c in configs:
        tree = {}
        for name, (i, o) in {"hidden": (11, 13), "out": (13, 19)}.items():
            r = c.rank_for(f"params/{name}/kernel")
            tree[name] = {"kernel": {"lora_a": normal(i, r), "lora_b": normal(r, o)}} | ({"bias": normal(o)}
                                                                                        if bias else {})
        out.append({"params": tree})
    return out


@functools.cache
def _alone(model, config):
    """The jitted apply of one adapter alone: (frozen, adapters, x, dropout_key=None) -> y."""
    return jax.jit(jlora.lora_transform(model.apply, config).apply)


@pytest.fixture(scope="module")
def tiny():
    """(model, x, frozen, adapters, configs): three adapters of ranks 7, 3, 5, alphas 16, 2, 5, dropout 0.1."""
    model, x, configs = Tiny(), _normal(0, 4, 11), _configs()
    return model, x, jax.jit(model.init)(jax.random.key(1), x), _pairs(configs), configs


def _setup(configs, model, x):
    variables = jax.jit(model.init)(jax.random.key(1), x)
    adapters = []
    for k, c in enumerate(configs):
        frozen, a = jlora.lora_transform(model.apply, c).init(variables, x, key=jax.random.key(10 + k))
        adapters.append(_noisy(a, seed=k))  # lora_b non-zero
    return frozen, adapters


def _equal_trees(t1, t2):
    assert jax.tree.structure(t1) == jax.tree.structure(t2)
    for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t2)):
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def test_stack_pads_and_unstack_is_the_exact_inverse():
    configs = [jlora.LoraConfig(rank=r, alpha=a, targets=("hidden", "out"), bias="all", scaling=s,
                                rank_pattern={"out": r + 1}, alpha_pattern={"hidden": 3.0})
               for r, a, s in zip(RANKS, ALPHAS, ("alpha_over_r", "rslora", "alpha_over_r"))]
    adapters = _pairs(configs, bias=True)
    stacked, sc = multi.stack(adapters, configs, max_rank=9)
    assert sc.size == 3 and dict(sc.ranks) == {"params/hidden/kernel": 9, "params/out/kernel": 9}
    a, b = stacked["params"]["out"]["kernel"]["lora_a"], stacked["params"]["out"]["kernel"]["lora_b"]
    assert a.shape == (3, 13, 9) and b.shape == (3, 9, 19) and stacked["params"]["out"]["bias"].shape == (3, 19)
    for k, r in enumerate(RANKS):
        assert not np.any(a[k, :, r + 1:]) and not np.any(b[k, r + 1:])  # zero columns of a, zero rows of b
        assert np.array_equal(a[k, :, : r + 1], adapters[k]["params"]["out"]["kernel"]["lora_a"])
    back = multi.unstack(stacked, sc)
    for (got, config), want, c in zip(back, adapters, configs):
        _equal_trees(got, want)  # bit for bit, at the adapter's own rank
        assert config == c
    again = jax.jit(lambda trees: [a for a, _ in multi.unstack(multi.stack(trees, configs, max_rank=9)[0], sc)])
    for got, want in zip(again(adapters), adapters):  # and under jit
        _equal_trees(got, want)
    np.testing.assert_allclose(sc.scales()["params/hidden/kernel"], [3 / 7, 3 / np.sqrt(3), 3 / 5], rtol=1e-7)
    unit = sc.unit_config()
    assert unit.scale_for("params/out/kernel") == 1.0 and unit.rank_for("params/hidden/kernel") == 9


def test_stack_scanned_and_fused_layouts():
    def scanned(v, x):  # W (4, 11, 11) used per layer by scan: lora_a (4, 11, r), lora_b (4, r, 11)
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, v["w"])[0]

    x, v = _normal(0, 2, 11), {"w": _normal(1, 4, 11, 11) / 4}
    configs = [jlora.LoraConfig(rank=r, alpha=2.0 * r, targets="w") for r in (4, 2)]
    pairs = [_noisy(jlora.lora_transform(scanned, c).init(v, x, key=jax.random.key(k))[1], seed=k)
             for k, c in enumerate(configs)]
    stacked, sc = multi.stack(pairs, configs)
    assert dict(sc.rank_axes) == {"w": 1} and stacked["w"]["lora_b"].shape == (2, 4, 4, 11)
    ys = jax.jit(multi.stacked_transform(scanned, sc).apply)(v, stacked, x)
    for k, c in enumerate(configs):
        np.testing.assert_allclose(ys[k], jax.jit(jlora.lora_transform(scanned, c).apply)(v, pairs[k], x), atol=1e-5)
    with pytest.raises(ValueError, match="axis 0 or 1.*frozen="):  # rank 4 = 4 layers: the shapes do not say
        multi.stack(pairs[:1], configs[:1], max_rank=6)
    stacked, sc = multi.stack(pairs[:1], configs[:1], max_rank=6, frozen=v)
    assert stacked["w"]["lora_b"].shape == (1, 4, 6, 11)
    _equal_trees(multi.unstack(stacked, sc)[0][0], pairs[0])

    plain = {"w": {"lora_a": np.ones((11, 2), np.float32), "lora_b": np.ones((2, 11), np.float32)}}
    with pytest.raises(ValueError, match="do not share one layout"):  # a (4, 11, r) pair and an (11, r) one
        multi.stack([pairs[1], plain], configs[1:] * 2)

    model = nn.Dense(21)  # fused q|k|v output, q and v adapted: lora_a (11, 2r), lora_b (r, 14)
    configs = [jlora.LoraConfig(rank=r, alpha=4.0, targets=".*kernel", fused={"kernel": (True, False, True)})
               for r in (3, 2)]
    x = _normal(0, 4, 11)
    frozen, pairs = _setup(configs, model, x)
    stacked, sc = multi.stack(pairs, configs)
    a = stacked["params"]["kernel"]["lora_a"]
    assert a.shape == (2, 11, 6) and not np.any(a[1, :, [2, 5]])  # each enabled slice padded on its own
    np.testing.assert_array_equal(a[1, :, 3:5], pairs[1]["params"]["kernel"]["lora_a"][:, 2:4])
    ys = jax.jit(multi.stacked_transform(model.apply, sc).apply)(frozen, stacked, x)
    for k, c in enumerate(configs):
        np.testing.assert_allclose(ys[k], _alone(model, c)(frozen, pairs[k], x), atol=1e-5)
    for (got, _), want in zip(multi.unstack(stacked, sc), pairs):
        _equal_trees(got, want)


def test_apply_and_apply_each_equal_each_adapter_alone(tiny):
    model, x, frozen, adapters, configs = tiny
    stacked, sc = multi.stack(adapters, configs)
    m = multi.stacked_transform(model.apply, sc)
    xs, key = _normal(5, 3, 4, 11), jax.random.key(7)
    run, each = jax.jit(m.apply), jax.jit(m.apply_each)
    ys, ys_drop, ys_each = (np.asarray(y) for y in (run(frozen, stacked, x), run(frozen, stacked, x, dropout_key=key),
                                                    each(frozen, stacked, xs)))
    assert ys.shape == (3, 4, 19)
    for k, c in enumerate(configs):
        alone = _alone(model, c)
        np.testing.assert_allclose(ys[k], alone(frozen, adapters[k], x), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(ys_each[k], alone(frozen, adapters[k], xs[k]), atol=1e-5, rtol=1e-5)
    # adapter k's dropout key is fold_in(key, k) (checked on the last one: one compile with dropout)
    np.testing.assert_allclose(ys_drop[2], _alone(model, configs[2])(frozen, adapters[2], x,
                                                                     dropout_key=jax.random.fold_in(key, 2)),
                               atol=1e-5, rtol=1e-5)
    assert np.max(np.abs(ys[0] - ys[1])) > 1e-2 and np.max(np.abs(ys - ys_drop)) > 1e-2
    np.testing.assert_allclose(m.apply(frozen, stacked, x), ys, atol=1e-5, rtol=1e-5)  # eager


@functools.cache
def _separate_step(model, config, k):
    """One AdamW step of adapter k alone (jitted once for both parametrizations)."""
    lora, tx = jlora.lora_transform(model.apply, config), optax.adamw(LRS[k], weight_decay=DECAYS[k])

    @jax.jit
    def step(frozen, a, s, x, t):
        g = jax.grad(lambda a: jnp.mean((lora.apply(frozen, a, x) - t) ** 2))(a)
        u, s = tx.update(g, s, a)
        return optax.apply_updates(a, u), s

    return step, tx


def _train_separately(model, frozen, adapters, configs, xs, ts, steps=10):
    out = []
    for k, c in enumerate(configs):
        step, tx = _separate_step(model, c, k)
        a, s = adapters[k], tx.init(adapters[k])
        for i in range(steps):
            a, s = step(frozen, a, s, xs[i][k], ts[i][k])
        out.append(a)
    return out


@pytest.mark.parametrize("tenants", [False, True], ids=["sweep", "multi_tenant"])
def test_training_a_stack_equals_separate_runs(tiny, tenants):
    model, _, frozen, adapters, configs = tiny
    stacked, sc = multi.stack(adapters, configs)
    tx = multi.stacked_optimizer(optax.adamw, learning_rate=list(LRS), weight_decay=list(DECAYS))
    step = multi.train_step(multi.stacked_transform(model.apply, sc), tx, lambda y, t: jnp.mean((y - t) ** 2),
                            per_adapter_batches=tenants)
    if tenants:  # adapter k's own batch each step
        xs, ts = [_normal(i, 3, 4, 11) for i in range(10)], [_normal(10 + i, 3, 4, 19) for i in range(10)]
    else:  # one batch for all
        xs = [np.broadcast_to(_normal(i, 4, 11), (3, 4, 11)) for i in range(10)]
        ts = [np.broadcast_to(_normal(10 + i, 4, 19), (3, 4, 19)) for i in range(10)]
    state = tx.init(stacked)
    for i in range(10):
        inputs, targets = (xs[i], ts[i]) if tenants else (xs[i][0], ts[i][0])
        stacked, state, losses = step(frozen, stacked, state, (inputs,), targets)
        assert losses.shape == (3,)
    want = _train_separately(model, frozen, adapters, configs, xs, ts)
    for (got, _), w, a0 in zip(multi.unstack(stacked, sc), want, adapters):
        chex.assert_trees_all_close(got, w, atol=1e-5, rtol=1e-5)
        assert max(np.max(np.abs(np.asarray(p) - q)) for p, q in zip(jax.tree.leaves(w), jax.tree.leaves(a0))) > 1e-3


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_padded_slots_stay_exactly_zero(tiny, opt):
    model, x, frozen, adapters, configs = tiny
    stacked, sc = multi.stack(adapters, configs, max_rank=8)
    make = {"sgd": optax.sgd, "adam": optax.adam, "adamw": lambda learning_rate: optax.adamw(learning_rate, 0.9,
                                                                                             weight_decay=0.5)}[opt]
    tx = multi.stacked_optimizer(make, learning_rate=list(LRS))
    step = multi.train_step(multi.stacked_transform(model.apply, sc), tx, lambda y, t: jnp.sum((y - t) ** 2))
    state = tx.init(stacked)
    for i in range(5):
        stacked, state, _ = step(frozen, stacked, state, (x + i,), np.ones((4, 19), np.float32))
    for name in ("hidden", "out"):
        a, b = (stacked["params"][name]["kernel"][f] for f in ("lora_a", "lora_b"))
        for k, r in enumerate(RANKS):
            assert not np.any(a[k, :, r:]) and not np.any(b[k, r:])  # exactly zero
            assert np.all(a[k, :, :r] != adapters[k]["params"][name]["kernel"]["lora_a"])  # the rest trained
    multi.unstack(stacked, sc)  # the padded-slot check passes


def test_hot_swap_does_not_retrace(tiny):
    model, x, frozen, adapters, configs = tiny
    stacked, sc = multi.stack(adapters, configs, max_rank=8, fold_scales=True)
    m = multi.stacked_transform(model.apply, sc)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def serve(frozen, stacked, x):
        return m.apply(frozen, stacked, x)

    others = [jlora.LoraConfig(rank=r, alpha=a, targets=("hidden", "out"), scaling=s, dropout=0.1)
              for r, a, s in ((2, 6.0, "alpha_over_r"), (8, 3.0, "rslora"), (1, 0.5, "alpha_over_r"))]
    swapped = _pairs(others, seed=1)
    new, sc2 = multi.stack(swapped, others, max_rank=8, fold_scales=True)
    m.check(sc2)  # same unit config and K: swappable
    for adapters_, configs_, st in ((adapters, configs, stacked), (swapped, others, new)):
        ys = serve(frozen, st, x)
        for k, c in enumerate(configs_):
            np.testing.assert_allclose(ys[k], _alone(model, c)(frozen, adapters_[k], x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fold_scales=True"):
        m.check(multi.stack(swapped, others, max_rank=8)[1])
    with pytest.raises(ValueError, match="max_rank=8"):
        m.check(multi.stack(swapped, others, max_rank=9, fold_scales=True)[1])


def test_folded_stack_unstacks_to_its_configs(tiny):
    _, _, frozen, adapters, configs = tiny  # scales 16/7, 2/3, 1: division is exact only for the power of two
    stacked, sc = multi.stack(adapters, configs, fold_scales=True)
    for (got, c), want in zip(multi.unstack(stacked, sc), adapters):
        chex.assert_trees_all_close(got, want, rtol=2e-7, atol=0)  # within an ulp
        chex.assert_trees_all_close(jlora.merge(frozen, got, c), jlora.merge(frozen, want, c), rtol=1e-6, atol=1e-6)
    _equal_trees(multi.unstack(stacked, sc)[2][0], adapters[2])  # scale 1


def test_hyperparameters_are_data(tiny):
    model, x, frozen, adapters, configs = tiny
    stacked, sc = multi.stack(adapters, configs)
    tx = multi.stacked_optimizer(optax.sgd, learning_rate=[0.1, 0.2, 0.3])
    step = multi.train_step(multi.stacked_transform(model.apply, sc), tx, lambda y, t: jnp.sum(y))
    state = tx.init(stacked)
    frozen_lr = multi.with_hyperparams(state, learning_rate=[0.0, 0.2, 0.0])
    after, _, _ = step(frozen, stacked, frozen_lr, (x,), None)
    with pytest.raises(TypeError, match=r"e.g. \(x,\)"):
        step(frozen, stacked, frozen_lr, x, None)
    a0, a1 = (t["params"]["out"]["kernel"]["lora_b"] for t in (stacked, after))
    assert np.array_equal(a0[0], a1[0]) and np.array_equal(a0[2], a1[2]) and not np.array_equal(a0[1], a1[1])
    with pytest.raises(ValueError, match=r"\['momentum'\] are not per-adapter"):
        multi.with_hyperparams(state, momentum=[0.9] * 3)
    with pytest.raises(ValueError, match="shape"):
        multi.with_hyperparams(state, learning_rate=[0.1, 0.2])
    with pytest.raises(TypeError, match="stacked_optimizer"):
        multi.with_hyperparams(optax.sgd(0.1).init(stacked), learning_rate=[0.1] * 3)
    with pytest.raises(ValueError, match="different lengths"):
        multi.stacked_optimizer(optax.adamw, learning_rate=[1e-3, 1e-4], weight_decay=[0.0] * 3)
    with pytest.raises(ValueError, match="leading axes are"):
        multi.stacked_optimizer(optax.sgd, learning_rate=[1e-3, 1e-4]).init(stacked)


def test_bad_stacks_raise(tiny):
    model, x, frozen, adapters, configs = tiny
    only_out = jlora.LoraConfig(rank=3, alpha=2.0, targets=("out",))
    (other,) = _pairs([only_out])
    other["params"].pop("hidden")
    with pytest.raises(ValueError, match=r"only in adapters\[0\]: \['params/hidden/kernel'\]"):
        multi.stack([adapters[0], other], [configs[0], only_out])
    with pytest.raises(ValueError, match="max_rank=5 is below the rank 7"):
        multi.stack(adapters, configs, max_rank=5)
    with pytest.raises(ValueError, match=r"adapters\[1\] do not match configs\[1\]"):
        multi.stack(adapters, [configs[0], configs[0], configs[2]])
    with pytest.raises(ValueError, match=r"dropout rates \[0.0, 0.1\]"):
        multi.stack(adapters[:2], [configs[0], jlora.LoraConfig(rank=3, alpha=2.0, targets=("hidden", "out"))])
    with pytest.raises(ValueError, match="one config per adapters tree"):
        multi.stack(adapters, configs[:2])
    with pytest.raises(TypeError, match="jlora.LoraConfig"):
        multi.stack(adapters[:1], [{"rank": 7}])
    w = _pairs(configs[1:2])[0]  # another model: in = 12
    w["params"]["hidden"]["kernel"]["lora_a"] = np.zeros((12, 3), np.float32)
    with pytest.raises(ValueError, match="more than the rank"):
        multi.stack([adapters[0], w], configs[:2])
    with_bias = _pairs([dataclasses.replace(c, bias="all") for c in configs[:2]], bias=True)
    with pytest.raises(ValueError, match=r"leaves trained in full: only in adapters\[1\]: \['params/hidden/bias'"):
        multi.stack([adapters[0], with_bias[1]], configs[:2])
    with_bias[1]["params"]["out"]["bias"] = np.zeros(18, np.float32)
    with pytest.raises(ValueError, match=r"adapters\[1\] at 'params/out/bias' is float32\(18,\)"):
        multi.stack(with_bias, [dataclasses.replace(c, bias="all") for c in configs[:2]])
    with pytest.raises(ValueError, match="different fused masks"):
        multi.stack(adapters[:2], [configs[0], jlora.LoraConfig(rank=3, alpha=2.0, targets=("hidden", "out"),
                                                                dropout=0.1, fused={"out": (True, False)})])
    with pytest.raises(ValueError, match="frozen has no weight at 'params/hidden/kernel'"):
        multi.stack(adapters, configs, frozen={"params": {}})
    stacked, sc = multi.stack(adapters, configs)
    m = multi.stacked_transform(model.apply, sc)
    narrow = {"params": {n: {"kernel": {"lora_a": v["kernel"]["lora_a"], "lora_b": v["kernel"]["lora_b"][:, :6]}}
                         for n, v in stacked["params"].items()}}
    with pytest.raises(ValueError, match=r"rank 6 on axis 1, padded rank 7"):
        multi.unstack(narrow, sc)
    with pytest.raises(ValueError, match="leading axis of K = 3"):
        m.apply_each(frozen, stacked, x)
    with pytest.raises(ValueError, match="do not fit their StackedConfig"):
        m.apply(frozen, jax.tree.map(lambda t: t[:2], stacked), x)
    with pytest.raises(ValueError, match="StackedConfig at"):
        multi.unstack(stacked, multi.stack([other], [only_out])[1])
    with pytest.raises(TypeError, match="StackedConfig"):
        multi.stacked_transform(model.apply, configs[0])
    diverged = jax.tree.map(lambda t: t * np.nan, stacked)  # nan in padded slots: a diverged run, returned as it is
    assert np.isnan(multi.unstack(diverged, sc)[1][0]["params"]["out"]["kernel"]["lora_b"]).all()
    noisy = jax.tree.map(lambda t: t + 1e-3, stacked)  # padded slots no longer zero
    with pytest.raises(ValueError, match=r"adapter 1 at 'params/hidden/kernel' has rank 3 but non-zero.*slots 3\.\.6"):
        multi.unstack(noisy, sc)

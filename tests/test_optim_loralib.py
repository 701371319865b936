"""jlora.loralib_adamw against a numpy oracle written from loralib's AdamW formula, and its argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora

SHAPES = {"w": (3, 5), "b": (7,), "k": (2, 4, 6)}  # pairwise distinct
LR, B1, B2, EPS, WD, STEPS = 0.05, 0.8, 0.95, 1e-3, 0.3, 6


def schedule(step):
    return LR * (step + 1) / STEPS  # a linear ramp: every step has a different rate


def oracle(params, grads, *, decays):
    """loralib's AdamW in float64 numpy, step by step: m, v EMAs; p' = p - lr sqrt(1-b2^t)/(1-b1^t) m/(sqrt(v)+eps);
    then p = p' - lr wd p' where `decays[name]`."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t in range(1, len(grads) + 1):
        lr = schedule(t - 1)
        for k in p:
            g = np.asarray(grads[t - 1][k], np.float64)
            m[k] = B1 * m[k] + (1 - B1) * g
            v[k] = B2 * v[k] + (1 - B2) * g * g
            p[k] = p[k] - lr * np.sqrt(1 - B2**t) / (1 - B1**t) * m[k] / (np.sqrt(v[k]) + EPS)
            if decays[k]:
                p[k] = p[k] - lr * WD * p[k]
    return p


def data(seed=0):
    keys = jax.random.split(jax.random.key(seed), len(SHAPES) * (STEPS + 1))
    it = iter(keys)
    params = {k: jax.random.normal(next(it), s) for k, s in SHAPES.items()}
    grads = [{k: jax.random.normal(next(it), s) * (i + 1) for k, s in SHAPES.items()} for i in range(STEPS)]
    return params, grads


def run(tx, params, grads, *, jit):
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_the_numpy_oracle(jit, masked):
    params, grads = data()
    decays = {"w": True, "b": not masked, "k": True}
    tx = jlora.loralib_adamw(schedule, b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                             mask=(lambda p: {k: decays[k] for k in p}) if masked else None)
    got = run(tx, params, grads, jit=jit)
    want = oracle(params, grads, decays=decays)
    for k in SHAPES:
        assert got[k].shape == SHAPES[k] and got[k].dtype == jnp.float32
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6)
    if masked:  # the mask matters: decaying "b" too gives another result
        other = oracle(params, grads, decays=dict.fromkeys(SHAPES, True))
        assert np.abs(other["b"] - want["b"]).max() > 1e-3


def test_differs_from_optax_adamw_where_the_formulas_differ():
    """eps on the uncorrected sqrt(v), decay after the step: with a large eps the first step is not optax's."""
    params, grads = data(1)
    ours = run(jlora.loralib_adamw(0.1, eps=0.5, weight_decay=0.2), params, grads[:1], jit=False)
    theirs = run(optax.adamw(0.1, eps=0.5, weight_decay=0.2), params, grads[:1], jit=False)
    assert max(float(jnp.abs(ours[k] - theirs[k]).max()) for k in SHAPES) > 1e-3
    plain = oracle(params, grads[:1], decays=dict.fromkeys(SHAPES, False))  # constant lr = schedule(0) = LR / 6
    got = run(jlora.loralib_adamw(LR / STEPS, b1=B1, b2=B2, eps=EPS, weight_decay=0.0), params, grads[:1], jit=False)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], plain[k], rtol=2e-5, atol=2e-6)


def test_keeps_bfloat16_leaves_bfloat16():
    params = {"w": jnp.ones((3, 2), jnp.bfloat16)}
    tx = jlora.loralib_adamw(1e-2)
    updates, _ = tx.update({"w": jnp.ones((3, 2), jnp.bfloat16)}, tx.init(params), params)
    assert updates["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, name", [
    (dict(learning_rate=-1.0), "learning_rate"), (dict(learning_rate="fast"), "learning_rate"),
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=0.0), "eps"), (dict(weight_decay=-0.01), "weight_decay"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    kwargs = {"learning_rate": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=name):
        jlora.loralib_adamw(kwargs.pop("learning_rate"), **kwargs)


def test_update_without_params_is_an_error():
    tx = jlora.loralib_adamw(1e-3)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))

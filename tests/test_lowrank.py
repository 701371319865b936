"""jlora.lowrank.adapted_matmul: values, every derivative against autodiff of the plain formula, and the memory its
JVP rule exists to save."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.lowrank import adapted_matmul

IN, OUT, R, SCALE = 11, 19, 7, 0.75


def plain(x, xd, w, a, b):
    return x @ w + SCALE * (xd @ a) @ b


def operands(rows, *, dropout=True, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (rows, IN))
    xd = jax.random.normal(k[1], (rows, IN)) if dropout else x  # a "dropped-out" x is any other array
    return (x, xd, jax.random.normal(k[2], (IN, OUT)), jax.random.normal(k[3], (IN, R)),
            jax.random.normal(k[4], (R, OUT)))


def ours(x, xd, w, a, b):
    return adapted_matmul(x, xd, w, a, b, SCALE)


# rows >= in takes the one-product primal in the JVP rule, rows < in the plain sum: both paths
@pytest.mark.parametrize("rows", [5, 23])
@pytest.mark.parametrize("jit", [False, True])
def test_value_and_jvp_match_plain_formula(rows, jit):
    ops = operands(rows)
    f = jax.jit(ours) if jit else ours
    np.testing.assert_allclose(f(*ops), plain(*ops), rtol=1e-5, atol=1e-5)
    tangents = operands(rows, seed=1)
    out, tan = jax.jvp(f, ops, tangents)
    want_out, want_tan = jax.jvp(plain, ops, tangents)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tan, want_tan, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [5, 23])
@pytest.mark.parametrize("argnums", [(3, 4), (0, 1, 3, 4), (2,), (0,), (0, 1, 2, 3, 4)])
def test_grads_match_autodiff(rows, argnums):
    ops = operands(rows)
    cot = jax.random.normal(jax.random.key(9), (rows, OUT))

    def loss(fn):
        return lambda *o: jnp.sum(jnp.tanh(fn(*o)) * cot)

    got = jax.jit(jax.grad(loss(ours), argnums=argnums))(*ops)
    want = jax.grad(loss(plain), argnums=argnums)(*ops)
    for g, w in zip(got, want):
        assert float(jnp.max(jnp.abs(w))) > 0
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_same_x_twice_sums_both_paths():
    """Without dropout the layer passes x as both x and xd: its gradient must collect both uses."""
    x, _, w, a, b = operands(23, dropout=False)
    got = jax.grad(lambda x: jnp.sum(jnp.sin(ours(x, x, w, a, b))))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(plain(x, x, w, a, b))))(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_adapter_grads_form_no_weight_gradient():
    """Differentiated w.r.t. the adapters only, no dot in the compiled HLO produces W's (in, out) shape."""
    ops = operands(23)
    f = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.tanh(ours(ops[0], ops[1], ops[2], a, b))), argnums=(0, 1)))
    hlo = f.lower(ops[3], ops[4]).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots, "no dot found: the HLO inspection is vacuous"
    assert not [line for line in dots if f"f32[{IN},{OUT}]" in line.split("=")[1].split("dot(")[0]]


def test_training_keeps_one_buffer_per_layer_output():
    """The reason for the JVP rule: a GELU layer trained through adapted_matmul needs less scratch memory than
    the same layer written as `x @ W + s (x A) B` (whose two addends XLA keeps alive for the backward pass)."""
    rows, d_in, d_out, r = 512, 96, 384, 4
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (rows, d_in))
    w1, w2 = jax.random.normal(k[1], (d_in, d_out)), jax.random.normal(k[2], (d_out, d_in))
    a, b = jax.random.normal(k[3], (d_in, r)), jnp.ones((r, d_out))

    def loss(layer):
        def f(ab):
            h = x
            for _ in range(4):
                h = jax.nn.gelu(layer(h, w1, *ab)) @ w2
            return jnp.sum(h)
        return f

    def temp(layer):
        return jax.jit(jax.grad(loss(layer))).lower((a, b)).compile().memory_analysis().temp_size_in_bytes

    ours_bytes = temp(lambda h, w, a, b: adapted_matmul(h, h, w, a, b, SCALE))
    plain_bytes = temp(lambda h, w, a, b: plain(h, h, w, a, b))
    assert ours_bytes < plain_bytes, (ours_bytes, plain_bytes)

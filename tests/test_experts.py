"""Mixture-of-experts weights: a 3-D expert tensor consumed by `ragged_dot`, by a batched `dot_general` or by a
gather of whole expert matrices then a dot gets one pair per expert, lora_a (E, ., r) / lora_b (E, r, .), computed
factored (no (E, in, out) buffer in the step); an expert use jlora cannot factor falls back, warned, never silently.
"""

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_factored_equals_merged

import jlora

E, D_IN, D_OUT, R, T = 3, 11, 19, 7, 10  # experts, in, out, rank, rows: pairwise distinct
CFG = jlora.LoraConfig(rank=R, alpha=5.0, targets=("experts",))
X = jax.random.normal(jax.random.key(5), (T, D_IN))
SIZES = jnp.array([4, 0, 6], jnp.int32)  # expert 1 gets no rows
IDS = jnp.array([2, 0, 0, 1, 2, 2, 1, 0, 2, 1])


def _ragged(p, x, sizes):
    return jax.lax.ragged_dot(x, p["experts"], sizes)


def _ragged_torch_layout(p, x, sizes):  # transformers' (E, out, in), each expert used as x @ W[e].T
    return jax.lax.ragged_dot(x, jnp.swapaxes(p["experts"], 1, 2), sizes)


def _batched(p, x, ids):  # the rows batched per expert: (E, rows, in) x (E, in, out)
    return jnp.einsum("eti,eio->eto", x[:9].reshape(E, 3, D_IN), p["experts"])


def _gathered(p, x, ids):  # one (in, out) matrix per row, gathered, then a batched dot
    return jnp.einsum("ti,tio->to", x, p["experts"][ids])


# name: (fn, W shape, lora_a shape, lora_b shape, the third argument)
CASES = {
    "ragged_dot": (_ragged, (E, D_IN, D_OUT), (E, D_IN, R), (E, R, D_OUT), SIZES),
    "ragged_dot_torch_layout": (_ragged_torch_layout, (E, D_OUT, D_IN), (E, D_OUT, R), (E, R, D_IN), SIZES),
    "batched_dot_general": (_batched, (E, D_IN, D_OUT), (E, D_IN, R), (E, R, D_OUT), IDS),
    "gather_then_dot": (_gathered, (E, D_IN, D_OUT), (E, D_IN, R), (E, R, D_OUT), IDS),
}


def _params(shape):
    return {"experts": jax.random.normal(jax.random.key(1), shape) * 0.3}


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


@pytest.mark.parametrize("name", list(CASES))
def test_expert_weight_gets_one_pair_per_expert_run_factored(name):
    fn, shape, a_shape, b_shape, third = CASES[name]
    params = _params(shape)
    lora, frozen, adapters = assert_factored_equals_merged(fn, params, (X, third), CFG)  # strict: no fallback
    assert _shapes(adapters) == {"experts": {"lora_a": a_shape, "lora_b": b_shape}}
    assert lora.consumers(params, X, third) == {"experts": ["dot"]}
    target = jax.random.normal(jax.random.key(2), jax.eval_shape(fn, params, X, third).shape)

    def loss(y):
        return jnp.sum(jnp.sin(y) * target)

    g = jax.jit(jax.grad(lambda a: loss(lora.apply(frozen, a, X, third))))(adapters)
    want = jax.jit(jax.grad(lambda a: loss(fn(jlora.merge(frozen, a, CFG), X, third))))(adapters)
    chex.assert_trees_all_close(g, want, atol=2e-5, rtol=1e-4)
    assert all(float(jnp.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(g))


def test_each_expert_starts_from_its_own_draw_and_zero_output_side():
    """loralib's init per expert: the input side U(+-1/sqrt(in)) drawn per expert, the output side zero."""
    lora = jlora.lora_transform(_ragged, CFG, strict=True)
    _, adapters = lora.init(_params((E, D_IN, D_OUT)), X, SIZES, key=jax.random.key(0))
    a, b = adapters["experts"]["lora_a"], adapters["experts"]["lora_b"]
    assert not np.any(b) and float(jnp.abs(a).max()) <= 1 / np.sqrt(D_IN)
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[1], a[2])


def _expert_sized(jaxpr) -> list[str]:
    """The primitives of `jaxpr` (nested jaxprs included) that compute an array of W's size, but for transposes (of
    W itself: the base product of a torch-layout weight)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != "transpose" and any(np.prod(v.aval.shape) == E * D_IN * D_OUT for v in eqn.outvars):
            out.append(eqn.primitive.name)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else [p]:
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    out += _expert_sized(getattr(sub, "jaxpr", sub))
    return out


@pytest.mark.parametrize("name", ["ragged_dot", "ragged_dot_torch_layout", "gather_then_dot"])
def test_training_step_forms_no_expert_sized_array(name):
    """The step is ragged (or per-row) products of rank r per expert: no W + delta, no (E, in, out) gradient."""
    fn, shape, *_, third = CASES[name]
    lora = jlora.lora_transform(fn, CFG, strict=True)
    frozen, adapters = lora.init(_params(shape), X, third, key=jax.random.key(0))
    jaxpr = jax.make_jaxpr(jax.grad(lambda a: jnp.sum(lora.apply(frozen, a, X, third) ** 2)))(adapters)
    assert _expert_sized(jaxpr.jaxpr) == []


def test_expert_use_jlora_cannot_factor_falls_back_warned_and_strict_refuses():
    """An expert axis that is not leading ((in, E, out) used through a transpose) cannot be a stacked prefix: the
    ragged product runs on the materialised weight, with a warning naming it (an error under strict)."""
    def fn(p, x, sizes):
        return jax.lax.ragged_dot(x, jnp.transpose(p["experts"], (1, 0, 2)), sizes)

    params = _params((D_IN, E, D_OUT))
    lora = jlora.lora_transform(fn, CFG)
    frozen, adapters = lora.init(params, X, SIZES, key=jax.random.key(0))
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)
    with pytest.warns(jlora.FactoredFallbackWarning, match=r"'experts' \(11, 3, 19\) reaches `ragged_dot_general`"):
        got = lora.apply(frozen, adapters, X, SIZES)
    np.testing.assert_allclose(got, fn(jlora.merge(frozen, adapters, CFG), X, SIZES), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"'experts' \(11, 3, 19\) reaches `ragged_dot_general`.*strict=True"):
        jlora.lora_transform(fn, CFG, strict=True).apply(frozen, adapters, X, SIZES)


def test_gather_of_expert_matrices_followed_by_no_dot_keeps_the_lookup_layout():
    """A 3-D table looked up by row and used elementwise is an embedding (lora_a (V, r)), not a stack of experts."""
    lora = jlora.lora_transform(lambda p, x, ids: jnp.tanh(p["experts"][ids]), CFG, strict=True)
    with pytest.warns(jlora.RankWarning):  # rank 7 > 3 rows of the table
        _, adapters = lora.init(_params((E, D_IN, D_OUT)), X, IDS, key=jax.random.key(0))
    assert _shapes(adapters) == {"experts": {"lora_a": (E, R), "lora_b": (R, D_IN, D_OUT)}}

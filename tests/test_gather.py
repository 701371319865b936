"""Embedding lookups as gathers: every whole-row (or whole-column) selection of a table runs factored, with any
collapsed / offset / batching dims, on a transposed or reshaped table, eager and jit, gradients included; a lookup
that is not a whole row (a sub-slice, both axes indexed) falls back with a warning naming the user's line."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_factored_equals_merged
from jax import lax

import jlora

V, D, R = 23, 19, 7  # vocab, dim, rank: pairwise distinct
CFG = jlora.LoraConfig(rank=R, alpha=5.0, targets=("table",))
IDS = jnp.array([[1, 2, 22, 0, 7], [7, 7, 13, 5, 21]])  # (B, T) = (2, 5)


class EqxStyleEmbedding:
    """What `equinox.nn.Embedding` does: `weight[(x,)]` for one scalar index x, vmapped by the caller."""

    def __init__(self, weight):
        self.weight = weight

    def __call__(self, x):
        return self.weight[(x,)]


def _vmap2(f):
    return jax.vmap(jax.vmap(f))


def _per_token(f, ids):
    """`f(i)` for each token of ids (B, T) in turn, as a decoding loop calls it: a scan over scalar indices."""
    return lax.scan(lambda c, i: (c, f(i)), 0, ids.reshape(-1))[1]


# name: (table shape, lookup(table, ids)); the output is shaped by the lookup, ids is IDS
CASES = {
    "take_rows": ((V, D), lambda t, ids: jnp.take(t, ids, axis=0)),
    "index_bt": ((V, D), lambda t, ids: t[ids]),
    "index_rows_colon": ((V, D), lambda t, ids: t[ids, :]),
    "vmap_index": ((V, D), lambda t, ids: jax.vmap(lambda i: t[i])(ids[0])),
    "vmap_vmap_index": ((V, D), lambda t, ids: _vmap2(lambda i: t[i])(ids)),
    "vmap_dynamic_index": ((V, D), lambda t, ids: jax.vmap(lambda i: lax.dynamic_index_in_dim(t, i, 0, False))(ids[0])),
    "equinox_embedding": ((V, D), lambda t, ids: _vmap2(EqxStyleEmbedding(t))(ids)),
    "transposed_cols": ((V, D), lambda t, ids: t.T[:, ids]),
    "take_transposed": ((V, D), lambda t, ids: jnp.take(t.T, ids, axis=1)),
    "vmap_transposed": ((V, D), lambda t, ids: jax.vmap(lambda i: t.T[:, i])(ids[0])),
    "dim_vocab_cols": ((D, V), lambda t, ids: t[:, ids]),
    "dim_vocab_vmap": ((D, V), lambda t, ids: _vmap2(lambda i: t[:, i])(ids)),
    "dim_vocab_transposed_rows": ((D, V), lambda t, ids: t.T[ids]),
    "reshaped_table": ((V, 4, 5), lambda t, ids: t.reshape(V, 20)[ids]),
    "three_axis_rows": ((V, 4, 5), lambda t, ids: jax.vmap(lambda i: t[i])(ids[1])),
    "vmap_dynamic_slice_rows": ((V, D), lambda t, ids: jax.vmap(lambda i: lax.dynamic_slice_in_dim(t, i, 3))(ids[0])),
    "atomless_axis": ((V, D), lambda t, ids: t.reshape(1, V, D)[:, ids]),
    "operand_batching": ((2, V, D), lambda t, ids: jax.vmap(lambda tb, i: tb[i])(t, ids)),
    "fill_mode_out_of_bounds": ((V, D), lambda t, ids: jnp.take(t, jnp.where(ids == 7, 40, ids), axis=0,
                                                                 mode="fill", fill_value=5.0)),
    "clip_mode": ((V, D), lambda t, ids: jnp.take(t, ids + 10, axis=0, mode="clip")),
    # one traced scalar index per step (a decoding loop): `dynamic_slice` of a whole row or column
    "scalar_row_in_scan": ((V, D), lambda t, ids: _per_token(lambda i: t[i], ids)),
    "scalar_row_jit": ((V, D), lambda t, ids: t[ids[1, 2]]),
    "scalar_col_in_scan": ((D, V), lambda t, ids: _per_token(lambda i: t[:, i], ids)),
    "scalar_transposed_in_scan": ((V, D), lambda t, ids: _per_token(lambda i: t.T[:, i], ids)),
    "scalar_row_kept_axis": ((V, D), lambda t, ids: _per_token(lambda i: lax.dynamic_slice_in_dim(t, i, 2), ids)),
    "scalar_reshaped_row": ((V, D), lambda t, ids: _per_token(lambda i: t.reshape(V, 1, D)[i], ids)),
    "scalar_negative_index": ((V, D), lambda t, ids: _per_token(lambda i: t[i - V], ids)),
}


def _params(shape):
    return {"table": jax.random.normal(jax.random.key(1), shape)}


def _fn(lookup):
    return lambda params, ids: jnp.tanh(lookup(params["table"], ids))


@pytest.mark.parametrize("name", list(CASES))
def test_whole_row_lookup_runs_factored_with_merged_gradients(name):
    shape, lookup = CASES[name]
    fn, params = _fn(lookup), _params(shape)
    lora, frozen, adapters = assert_factored_equals_merged(fn, params, (IDS,), CFG)  # strict: no fallback
    target = jax.random.normal(jax.random.key(2), jax.eval_shape(fn, params, IDS).shape)

    def loss(y):
        return jnp.sum(jnp.sin(y) * target)

    g = jax.jit(jax.grad(lambda a: loss(lora.apply(frozen, a, IDS))))(adapters)
    want = jax.jit(jax.grad(lambda a: loss(fn(jlora.merge(frozen, a, CFG), IDS))))(adapters)
    chex.assert_trees_all_close(g, want, atol=2e-5, rtol=1e-4)
    assert all(float(jnp.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(g))


def test_lookup_by_column_zero_inits_the_looked_up_factor():
    """A (dim, vocab) table indexed by column: lora_b covers the vocab axis and starts at zero (loralib's embedding
    init), lora_a (dim, r) is random."""
    lora = jlora.lora_transform(_fn(CASES["dim_vocab_vmap"][1]), CFG, strict=True)
    _, adapters = lora.init(_params((D, V)), IDS, key=jax.random.key(1))
    pair = adapters["table"]
    assert pair["lora_a"].shape == (D, R) and pair["lora_b"].shape == (R, V)
    assert not np.any(pair["lora_b"]) and np.std(pair["lora_a"]) > 0.3


FALLBACKS = {
    "partial_width": lambda t, ids: t[ids, :5],
    "both_axes_indexed": lambda t, ids: t[ids, ids % D],
    "vmap_partial_width": lambda t, ids: jax.vmap(lambda i: lax.dynamic_slice(t, (i, 2), (1, 5)))(ids[0]),
    "scalar_partial_width": lambda t, ids: _per_token(lambda i: t[i, 2:7], ids),
    "scalar_both_axes": lambda t, ids: _per_token(lambda i: t[i, i % D], ids),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_partial_lookup_falls_back_with_a_warning_at_the_users_line(name):
    fn, params = _fn(FALLBACKS[name]), _params((V, D))
    lora = jlora.lora_transform(fn, CFG)
    frozen, adapters = lora.init(params, IDS, key=jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.3, adapters)
    want = fn(jlora.merge(frozen, adapters, CFG), IDS)
    prim = "dynamic_slice" if name.startswith("scalar") else "gather"
    with pytest.warns(jlora.FactoredFallbackWarning, match=rf"'table' \(23, 19\) reaches `{prim}`") as record:
        eager = lora.apply(frozen, adapters, IDS)
    assert [r.filename for r in record] == [__file__] * len(record)
    with pytest.warns(jlora.FactoredFallbackWarning) as record:
        jitted = jax.jit(lambda f, a: lora.apply(f, a, IDS))(frozen, adapters)
    assert [r.filename for r in record] == [__file__] * len(record)
    np.testing.assert_allclose(eager, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jitted, want, atol=1e-5, rtol=1e-5)
    strict = jlora.lora_transform(fn, CFG, strict=True)
    with pytest.raises(ValueError, match=rf"'table' \(23, 19\) reaches `{prim}`.*strict=True refuses"):
        strict.apply(frozen, adapters, IDS)


def test_scalar_index_into_a_stacked_weight_falls_back_rather_than_becoming_a_table():
    """`w[layer]` of a stacked (L, in, out) weight in a `fori_loop` is a `dynamic_slice` like `table[token]`, but a
    lookup layout (lora_a (L, r)) would not be one pair per layer: it falls back, warned, and equals the merged run."""
    params = {"table": jax.random.normal(jax.random.key(1), (3, 11, D)) * 0.3}

    def fn(params, x):
        return lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ params["table"][i]) @ params["table"][i].T, x)

    x = jax.random.normal(jax.random.key(2), (2, 11))
    lora = jlora.lora_transform(fn, CFG)
    assert lora.consumers(params, x) == {"table": ["dynamic_slice", "dynamic_slice"]}
    frozen, adapters = lora.init(params, x, key=jax.random.key(1))
    adapters = jax.tree.map(lambda a: a + 0.3, adapters)
    with pytest.warns(jlora.FactoredFallbackWarning, match=r"'table' \(3, 11, 19\) reaches `dynamic_slice`"):
        got = lora.apply(frozen, adapters, x)
    np.testing.assert_allclose(got, fn(jlora.merge(frozen, adapters, CFG), x), atol=1e-5, rtol=1e-5)

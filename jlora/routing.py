"""Per-row routing: each row of a batch through its own adapter of a stack, the base product shared.

`lora.apply(..., route=ids)` (reached through `jlora.multi`) gives every targeted weight a `Tracked` whose factors
carry a leading adapter axis and whose `route` holds one adapter index per batch row. At a consumer the rows are
grouped by example (the operands whose leading axis is the batch, or the batch times a per-example count such as
the sequence when a model flattens it) and the consumer's factored rule runs under `jax.vmap` over the examples,
with each example's factors gathered by its index and the weight unbatched: JAX batches the base product `x @ W`
into one product over the whole batch, and the low-rank branch into per-example products of rank r. The output
axis that holds the rows is found from the consumer's own shape rule (probing two group sizes), so dots, einsums
on either side, gathers (embeddings) and convolutions route alike.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jlora.tracked import Tracked


def prepare(stacked, adapter_ids, args, kwargs, size: int):
    """`(padded, route)` for `LoraTransform._run`: the stack (leaves (K, ...)) with a zero adapter appended at index
    K, and the ids (int (batch,), -1 = the base model alone) with -1 mapped to K. Raises a ValueError for ids that
    are not an integer vector with one entry per row (or per group of rows) of the inputs, or concrete ids outside
    [-1, K - 1] (traced ids are clamped by the gather)."""
    from jlora.analysis import _is_dynamic

    ids = jnp.asarray(adapter_ids)
    rows = next((jnp.shape(x)[0] for x in jax.tree.leaves((args, kwargs)) if _is_dynamic(x) and jnp.ndim(x)), None)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer) or rows is None or rows % max(ids.size, 1):
        raise ValueError(f"adapter_ids must be an integer array of shape ({rows},), one adapter index per row "
                         f"of the batch, got {ids.dtype} {tuple(ids.shape)}")
    if not isinstance(ids, jax.core.Tracer) and ids.size:  # concrete: checked (traced ids clamp at K - 1)
        low, high = int(np.min(np.asarray(ids))), int(np.max(np.asarray(ids)))
        if low < -1 or high >= size:
            raise ValueError(f"adapter_ids must be in [-1, {size - 1}] (-1: the base model alone), got values from "
                             f"{low} to {high}")
    padded = jax.tree.map(lambda v: jnp.concatenate([v, jnp.zeros_like(v[:1])]), stacked)
    return padded, jnp.where(ids < 0, size, ids).astype(jnp.int32)


def _rows_axis(eqn, invals, batched, w_index, shape_of):
    """The output axis of each output that holds the rows of the batched operands (None: an output without one)."""
    from jlora.interpreter import bind

    def probe(n):
        ops = []
        for i, v in enumerate(invals):
            if i == w_index:
                ops.append(jax.ShapeDtypeStruct(shape_of.shape, shape_of.dtype))
            elif i in batched:
                ops.append(jax.ShapeDtypeStruct((n, *v.shape[1:]), v.dtype))
            else:
                ops.append(jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)))
        return jax.eval_shape(lambda *o: bind(eqn, list(o)), *ops)

    axes = []
    for s2, s3 in zip(probe(2), probe(3)):
        moved = [i for i, (p, q) in enumerate(zip(s2.shape, s3.shape)) if p != q]
        axes.append(moved[0] if len(moved) == 1 else None)
    return axes


def routed(rule, ctx, eqn, invals):
    """The outputs of consumer `rule` with the one routed `Tracked` among `invals` applied per example."""
    from jlora.interpreter import Context, fallback

    sides = [i for i, v in enumerate(invals) if isinstance(v, Tracked)]
    name = eqn.primitive.name
    t = invals[sides[-1]]
    if len(sides) != 1:
        raise ValueError(f"jlora: per-row routing: `{name}` consumes two adapted weights at once "
                         f"({', '.join(invals[i].leaf.path for i in sides)}); route one of them only")
    ids = t.route
    batch = ids.shape[0]
    batched = [i for i, v in enumerate(invals)
               if i != sides[0] and jnp.ndim(v) >= 1 and jnp.shape(v)[0] % batch == 0 and jnp.shape(v)[0] > 0]
    if not batched:
        raise ValueError(f"jlora: per-row routing: {t.leaf.path!r} reaches `{name}` with no operand whose leading axis "
                         f"is the batch ({batch} rows, or a multiple of it); routing needs the batch leading at every "
                         f"adapted weight's use (it is, in models whose inputs are (batch, ...))")
    rows = {jnp.shape(invals[i])[0] // batch for i in batched}
    if len(rows) != 1:
        raise ValueError(f"jlora: per-row routing: the operands of `{name}` at {t.leaf.path!r} have leading axes "
                         f"{[jnp.shape(invals[i])[0] for i in batched]}, not one multiple of the batch ({batch})")
    per = rows.pop()
    axes = _rows_axis(eqn, invals, batched, sides[0], t.w)
    if None in axes:
        raise ValueError(f"jlora: per-row routing: the output of `{name}` at {t.leaf.path!r} has no axis that follows "
                         f"the batch rows, so rows cannot be given their adapters")
    keys = None if ctx.key is None else jax.random.split(ctx.next_key(), batch)

    def one(ops, a, b, key):
        vals = list(invals)
        for i, v in zip(batched, ops):
            vals[i] = v
        vals[sides[0]] = t.replace(a=a, b=b, route=None)
        sub = dataclasses.replace(Context(ctx.strict, None, key), routed=True)
        outs = rule(sub, eqn, vals) if rule is not None else None
        return list(fallback(sub, eqn, vals) if outs is None else outs)

    grouped = [invals[i].reshape(batch, per, *jnp.shape(invals[i])[1:]) for i in batched]
    outs = jax.vmap(one)(grouped, t.a[ids], t.b[ids], keys)
    merged = []
    for out, ax in zip(outs, axes):
        out = jnp.moveaxis(out, 0, ax)  # (..., batch, per, ...) with the rows at ax, ax + 1
        merged.append(out.reshape(*out.shape[:ax], batch * per, *out.shape[ax + 2:]))
    return merged

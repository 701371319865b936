"""Factored rules for the primitives that consume a weight: `dot_general`, `conv_general_dilated`, `gather`,
`dynamic_slice`.

Each computes `consumer(x, W) + scale * consumer'(x, a, b)` where the second term contracts x with one factor
first and then with the other, so neither W + delta nor its gradient is ever formed. A rule returns None where
the case is not covered, and the interpreter falls back to the materialised weight.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jlora.deferred import value
from jlora.interpreter import bind, plain
from jlora.lowrank import adapted_matmul
from jlora.tracked import Tracked
from jlora.variants import dora


def _dropout(ctx, x, rate: float):
    """loralib's `lora_dropout` on the LoRA branch input: inverted dropout, only when a dropout key was given."""
    if rate == 0.0 or ctx.key is None:
        return x
    keep = jax.random.bernoulli(ctx.next_key(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def _pick_tracked(ctx, eqn, invals, allowed=(0, 1)):
    """(index of the Tracked operand, operands with any other Tracked materialised), or (None, _)."""
    sides = [i for i, v in enumerate(invals) if isinstance(v, Tracked) and i in allowed]
    if not sides:
        return None, invals
    side = sides[-1]
    return side, [v if i == side else plain(ctx, v, eqn.primitive.name) for i, v in enumerate(invals)]


def _rows_matmul(x, w):
    """`x @ w` for x (..., k) and w (k, m) as one 2-D matmul (rows flattened; see `_matrix_branch`)."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def _factor_matrices(f1, f1_order, f2, n_in: int):
    """The factors as matrices: a2 shape=(in, r) with its axes in `f1_order`, b2 shape=(r, out); and out's dims."""
    a2 = jnp.transpose(f1, [*f1_order, f1.ndim - 1]).reshape(n_in, -1)
    b2 = jnp.moveaxis(f2, -1, 0).reshape(f2.shape[-1], -1)
    return a2, b2, f2.shape[:-1]


def _matrix_branch(x, x_contract, f1, f1_order, f2, tracked_is_lhs: bool, scale: float, kw):
    """The LoRA branch as two 2-D matmuls: x's free dims flattened to rows, its contracted dims to columns.

    XLA on CPU runs a dot with several contracting dims (the gradient of lora_a for a (batch, seq, in) input) several
    times slower than the same dot on 2-D operands, so the branch is computed on matrices and reshaped back.
    """
    free = [i for i in range(x.ndim) if i not in x_contract]
    x2 = jnp.transpose(x, free + list(x_contract))
    rows = x2.shape[: len(free)]
    x2 = x2.reshape(math.prod(rows), -1)  # shape=(rows, in)
    a2, b2, cols = _factor_matrices(f1, f1_order, f2, x2.shape[1])
    tmp = lax.dot(x2, a2, **kw)
    low = lax.dot(tmp * jnp.asarray(scale, tmp.dtype), b2, **kw).reshape(rows + cols)
    if tracked_is_lhs:  # dot_general puts the lhs's free dims first
        low = jnp.transpose(low, [*range(len(rows), low.ndim), *range(len(rows))])
    return low


def _plain_layer(x, xd, t: Tracked, k: int, f1, f1_order, f2, kw):
    """`x @ W` with x's last k dims contracted with W's first k (nn.Dense, DenseGeneral): the whole adapted product
    through `adapted_matmul`, whose derivative rule keeps one output buffer (see jlora.lowrank)."""
    rows = x.shape[: x.ndim - k]
    x2, xd2 = (v.reshape(math.prod(rows), -1) for v in (x, xd))  # shape=(rows, in)
    a2, b2, cols = _factor_matrices(f1, f1_order, f2, x2.shape[1])
    w2 = value(t.w.reshape(x2.shape[1], -1))  # shape=(in, out)
    out = adapted_matmul(x2, xd2, w2, a2, b2, t.leaf.scale, kw["precision"], kw["preferred_element_type"])
    return out.reshape(rows + cols)


def _dot_general(ctx, eqn, invals):
    side, invals = _pick_tracked(ctx, eqn, invals)
    if side is None:
        return None
    t: Tracked = invals[side]
    x = invals[1 - side]
    p = eqn.params
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    t_contract, t_batch = (lc, lb) if side == 0 else (rc, rb)
    if t.analysis:
        ctx.record(t, "dot", ([t.axes[i] for i in t_contract], [t.axes[i] for i in t_batch]))
        return bind(eqn, [t.w if i == side else v for i, v in enumerate(invals)])
    groups = [t.axis_group(i) for i in range(len(t.axes))]
    if None in groups or any(groups[i] == "P" for i in t_contract):
        return None
    if any(groups[i] == "" for i in range(len(groups)) if i not in t_contract):
        return None
    # einsum labels: contracting and batch pairs share one; free dims get their own
    nl, nr = x.ndim if side == 1 else t.w.ndim, t.w.ndim if side == 1 else x.ndim
    lhs, rhs = list(range(nl)), list(range(nl, nl + nr))
    for i, j in zip(lc, rc):
        rhs[j] = lhs[i]
    for i, j in zip(lb, rb):
        rhs[j] = lhs[i]
    out = [lhs[i] for i in lb] + [lhs[i] for i in range(nl) if i not in lc and i not in lb]
    out += [rhs[j] for j in range(nr) if j not in rc and j not in rb]
    t_labels, x_labels = (lhs, rhs) if side == 0 else (rhs, lhs)
    r_label = nl + nr
    contracted = {groups[i] for i in t_contract} - {""}
    first, second = ("b", "a") if contracted == {"B"} else ("a", "b")
    f1, sel1 = t.view(first)
    f2, sel2 = t.view(second)
    xd = _dropout(ctx, x, t.leaf.dropout)
    g = None if t.gain is None else _dora_gain(t, eqn, side, t_contract, t_batch)
    if t.gain is not None and g is None:
        return None  # DoRA's gain on a contracted axis (a tied embedding's attend): the fallback applies it
    kw = dict(precision=p["precision"], preferred_element_type=p["preferred_element_type"])
    matrix = not lb and sorted(sel1) == sorted(t_contract) and set(groups) <= {"A", "B"}
    k = len(t_contract)
    plain_layer = side == 1 and tuple(t_contract) == tuple(range(k)) and tuple(lc) == tuple(range(x.ndim - k, x.ndim))
    if matrix and plain_layer and not ctx.routed and (g is None or xd is x):  # routed: [W; B] would copy W per row
        out = _plain_layer(x, xd, t, k, f1, [sel1.index(i) for i in t_contract], f2, kw)
        aval = eqn.outvars[0].aval
        if out.shape == aval.shape and out.dtype == aval.dtype:
            return [out if g is None else g.astype(out.dtype) * out]
    base = bind(eqn, [t.w if i == side else v for i, v in enumerate(invals)])[0]
    x = xd
    if matrix:
        x_contract = lc if side == 1 else rc
        low = _matrix_branch(x, x_contract, f1, [sel1.index(i) for i in t_contract], f2, side == 0, t.leaf.scale, kw)
    else:
        l1 = [t_labels[i] for i in sel1] + [r_label]
        l2 = [t_labels[i] for i in sel2] + [r_label]
        keep = set(out) | set(l2)
        tmp_labels = list(dict.fromkeys(lab for lab in x_labels + l1 if lab in keep))
        tmp = jnp.einsum(x, x_labels, f1, l1, tmp_labels, **kw)
        tmp = tmp * jnp.asarray(t.leaf.scale, tmp.dtype)
        low = jnp.einsum(tmp, tmp_labels, f2, l2, out, **kw)
    if g is not None:  # PEFT's DoRA output; with dropout, W on the dropped-out input too
        base_d = None if xd is invals[1 - side] else bind(eqn, [t.w if i == side else xd for i in range(2)])[0]
        return [dora.combine(base, low, g, base_d)]
    return [base + low.astype(base.dtype)]


def _dora_gain(t: Tracked, eqn, side: int, t_contract, t_batch):
    """DoRA's gain laid out for `eqn`'s dot_general output (batch dims, lhs free, rhs free), or None where it sits on
    a contracted axis of W."""
    gv = t.gain_view()
    if gv is None:
        return None
    ndim = len(eqn.outvars[0].aval.shape)
    free = [i for i in range(len(t.axes)) if i not in t_contract and i not in t_batch]
    start = len(t_batch) + (ndim - len(t_batch) - len(free) if side == 1 else 0)
    pos = [list(t_batch).index(i) if i in t_batch else None if i in t_contract else start + free.index(i)
           for i in range(len(t.axes))]
    return dora.place(gv, pos, ndim)


def _factor_operand(f, sel: list[int], first_kept: int, ndim: int):
    """A factor view (the value's axes `sel`, then r) as a gather operand of the value's rank: its own axes in
    place, the rank axis at axis `first_kept`, size-1 axes at the value's other axes (the rest of the kept group,
    atom-less axes)."""
    missing = [i for i in range(ndim) if i not in sel and i != first_kept]
    f = jnp.expand_dims(f, tuple(range(f.ndim, f.ndim + len(missing))))
    src = [*sel, first_kept, *missing]  # the value axis each axis of f goes to
    return jnp.transpose(f, [src.index(i) for i in range(ndim)])


def _lookup(ctx, eqn, t: Tracked, rest: list, whole: list[int], look, out_axis):
    """A lookup of W (a gather or slice in `eqn`; `rest` its other operands, the indices; `whole` the axes it keeps
    whole) run factored when it keeps every axis of one factor's group whole (a row or column of the table):
    `look(f, sizes)` applies the same gather or slice to `f`, the other factor as an operand of W's rank (its axes
    in place, the kept axes replaced by the rank axis of size r and size-1 axes), with the slice sizes `sizes`; its
    output, W's output with the kept axes as (r, 1, ...), is contracted with the kept factor afterwards.
    `out_axis(i)` is where W's axis i sits in the output. Returns `[W's lookup + scale * the low-rank term]`; in
    analysis mode records the lookup and returns W's lookup; otherwise None (the fallback)."""
    if t.analysis:
        if any(t.axes[i] for i in whole):
            ctx.record(t, "gather", [t.axes[i] for i in range(len(t.axes)) if i not in whole])  # the indexed axes
        else:  # no axis of W kept whole: no layout makes this lookup factored
            ctx.record(t, "fallback", eqn.primitive.name)
        return bind(eqn, [t.w, *rest])
    groups = [t.axis_group(i) for i in range(len(t.axes))]
    if not set(groups) <= {"A", "B", ""} or not {"A", "B"} <= set(groups):
        return None
    kept = next((g for g in ("B", "A") if all(i in whole for i, h in enumerate(groups) if h == g)), None)
    if kept is None:
        return None
    f1, sel1 = t.view("a" if kept == "B" else "b")  # the looked-up factor: its axes in the value's order, then r
    f2, sel2 = t.view("b" if kept == "B" else "a")  # the kept factor, shape=(kept axes..., r)
    f1 = _factor_operand(f1, sel1, sel2[0], len(t.axes))
    sizes = eqn.params["slice_sizes"]
    g = look(f1, tuple(s if i in sel1 else f1.shape[i] for i, s in enumerate(sizes)))
    pos = [out_axis(i) for i in sel2]  # where the kept axes sit in the output; g has them as (r, 1, ...)
    g = jnp.squeeze(g, tuple(pos[1:]))
    out_labels = list(range(g.ndim + len(pos) - 1))
    r_label = len(out_labels)
    g_labels = [r_label if k == pos[0] else k for k in out_labels if k not in pos[1:]]
    low = jnp.einsum(g, g_labels, f2, [*pos, r_label], out_labels) * jnp.asarray(t.leaf.scale, g.dtype)
    base = bind(eqn, [t.w, *rest])[0]
    if t.gain is not None:  # DoRA (PEFT's embedding: no dropout): g along the kept axes
        gv = t.gain_view()
        gain = None if gv is None else dora.place(gv, [out_axis(i) if i in sel2 else None for i in range(len(t.axes))],
                                                 base.ndim)
        return None if gain is None else [dora.combine(base, low, gain)]
    return [base + low.astype(base.dtype)]


def _gather(ctx, eqn, invals):
    """A gather that keeps every axis of one factor's group whole (a row or column lookup in any form: `table[ids]`,
    `vmap(lambda i: table[i])`, `table.T[:, ids]`, operand batching dims, a reshaped table) runs as the same gather
    on the other factor (see `_lookup`). Start-index clamping and FILL_OR_DROP masks stay those of W's gather,
    since only whole slices (start 0) change size. Anything else (a sub-slice, both groups indexed) returns None:
    the fallback."""
    t, idx = invals
    if not isinstance(t, Tracked) or isinstance(idx, Tracked):
        return None
    p = eqn.params
    dn = p["dimension_numbers"]
    dropped = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    whole = [i for i in range(len(t.axes)) if i not in dropped and p["slice_sizes"][i] == t.w.shape[i]]
    offset_of = dict(zip([i for i in range(len(t.axes)) if i not in dropped], dn.offset_dims))

    def look(f, sizes):
        params = {**p, "slice_sizes": sizes}
        if p["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
            params["fill_value"] = 0  # W's gather fills a dropped slice already; its update is zero
        return lax.gather_p.bind(f, idx, **params)

    return _lookup(ctx, eqn, t, [idx], whole, look, offset_of.__getitem__)


def _dynamic_slice(ctx, eqn, invals):
    """`table[token]` for one traced index (`dynamic_slice` of whole rows or columns, as equinox's `Embedding` of a
    scalar token lowers): the same slice of the other factor, then the kept factor (see `_lookup`). The kept axes
    are sliced whole, so their clamped start is 0 in W and in the factor alike. Only a slice that keeps one of
    W's original axes whole is a lookup: `w[layer]` of a stacked (L, in, out) weight in a `fori_loop` falls back,
    since an adapter for it as a table would not be one pair per layer (`scan` slices it per layer)."""
    t, *starts = invals  # one start index per axis
    if not isinstance(t, Tracked) or any(isinstance(s, Tracked) for s in starts):
        return None
    sizes = eqn.params["slice_sizes"]
    whole = [i for i in range(len(t.axes)) if sizes[i] == t.w.shape[i]]
    if len({a for i in whole for a in t.axes[i]}) != 1:
        whole = []  # W[i] keeping 2+ axes whole may be a stacked layer: a lookup layout would not be per layer

    def look(f, f_sizes):
        zero = jnp.zeros((), starts[0].dtype)
        return lax.dynamic_slice(f, [zero if i in whole else s for i, s in enumerate(starts)], f_sizes)

    return _lookup(ctx, eqn, t, starts, whole, look, lambda i: i)  # a slice keeps every axis in place


def _conv(ctx, eqn, invals):
    side, invals = _pick_tracked(ctx, eqn, invals, allowed=(1,))
    if side is None:
        return None
    x, t = invals
    p = eqn.params
    dn = p["dimension_numbers"]
    base = bind(eqn, [x, t.w])[0]
    out_ax, in_axes = dn.rhs_spec[0], dn.rhs_spec[1:]
    if t.analysis:
        ctx.record(t, "conv", ([t.axes[i] for i in in_axes], [t.axes[out_ax]]))
        return [base]
    g_out = t.axis_group(out_ax)
    g_in = {t.axis_group(i) for i in in_axes}
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1 or g_out not in ("A", "B"):
        return None
    if g_in != ({"A", "B"} - {g_out}):
        return None
    f_in, _ = t.view("a" if g_out == "B" else "b")  # the kernel's in/spatial axes in order, then r
    f_out, _ = t.view("b" if g_out == "B" else "a")  # shape=(out, r)
    c = dn.out_spec[1]
    g = None
    if t.gain is not None:  # DoRA: g along the output channels
        gv = t.gain_view()
        g = None if gv is None else dora.place(gv, [c if i == out_ax else None for i in range(len(t.axes))], base.ndim)
        if g is None:
            return None
    xd = _dropout(ctx, x, t.leaf.dropout)
    y = lax.conv_general_dilated_p.bind(xd, jnp.moveaxis(f_in, -1, out_ax), **p)
    low = jnp.moveaxis(_rows_matmul(jnp.moveaxis(y, c, -1), f_out.T), -1, c) * jnp.asarray(t.leaf.scale, y.dtype)
    if g is not None:
        return [dora.combine(base, low, g, None if xd is x else bind(eqn, [xd, t.w])[0])]
    return [base + low.astype(base.dtype)]


CONSUMERS = {
    "dot_general": _dot_general,
    "gather": _gather,
    "dynamic_slice": _dynamic_slice,
    "conv_general_dilated": _conv,
}

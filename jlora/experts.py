"""Mixture-of-experts weights gathered per token, `w[expert_ids]` then a batched dot, and the interpreter's table of
consumer rules (jlora.consumers' plus `ragged_dot`, jlora.ragged, and the expert gather here).

A gather of whole expert matrices, `w[ids]` of W (E, in, out) with one expert index per row (ids (T,)), followed by
a `dot_general` with the gathered row axis as a batch dimension (`einsum("ti,tio->to", x, w[ids])`), is an expert
use: W gets one pair per expert, lora_a (E, in, r) / lora_b (E, r, out) (the expert axis a stacked prefix, as
`ragged_dot` and a batched dot give it), and the gather runs on W and on both factors, so the dot sees the per-token
factors `lora_a[ids]` (T, in, r), `lora_b[ids]` (T, r, out) and runs factored. The same gather followed by anything
else (a 3-D embedding table looked up by row) keeps the lookup layout (jlora.consumers' `_gather`).

`lora.init` cannot know at the gather which of the two it is, so during analysis the gathered value is followed
under a key of its own (`gathered_key`) and `fold` decides once the whole function has been read.
"""

from __future__ import annotations

import collections
import dataclasses

import jax.numpy as jnp
from jax import lax

from jlora import consumers, ragged
from jlora.deferred import Deferred
from jlora.interpreter import bind
from jlora.tracked import Tracked


def gathered_key(index: int) -> int:
    """The analysis-records key of the per-token gather of the weight at leaf `index`."""
    return -(index + 1)


def _expert_axis(t: Tracked, eqn, idx):
    """(axis of the gathered value indexed, its atom, output row axis) when `eqn` gathers whole matrices of `t` by
    one index per row on the axis holding its lowest atom; else None."""
    p = eqn.params
    dn = p["dimension_numbers"]
    if (len(dn.collapsed_slice_dims) != 1 or tuple(dn.start_index_map) != tuple(dn.collapsed_slice_dims)
            or dn.operand_batching_dims or jnp.ndim(idx) != 2 or jnp.shape(idx)[1] != 1):
        return None
    (i,) = dn.collapsed_slice_dims
    atoms = [a for ax in t.axes for a in ax]
    rest = [j for j in range(len(t.axes)) if j != i]
    if t.axes[i] != (min(atoms),) or len([j for j in rest if t.axes[j]]) < 2:
        return None
    if any(p["slice_sizes"][j] != t.w.shape[j] for j in rest):
        return None
    (row,) = [d for d in range(len(t.axes)) if d not in dn.offset_dims]
    return i, t.axes[i][0], row


def _gathered(t: Tracked, eqn, found, out, a, b, index: int) -> Tracked:
    """The Tracked of the gathered value: the row axis holds the expert atom (now of size T), the rest in order."""
    i, atom, row = found
    kept = [t.axes[j] for j in range(len(t.axes)) if j != i]
    axes = tuple(kept[:row]) + ((atom,),) + tuple(kept[row:])
    shape = list(t.leaf.shape)
    shape[atom] = out.shape[row]
    leaf = dataclasses.replace(t.leaf, index=index, shape=tuple(shape))
    return t.replace(w=out, a=a, b=b, axes=axes, leaf=leaf)


_MODES = {lax.GatherScatterMode.CLIP: "clip", lax.GatherScatterMode.PROMISE_IN_BOUNDS: "clip",
          lax.GatherScatterMode.FILL_OR_DROP: "fill"}  # W's gather's mode as jnp.take's (a dropped row: a zero update)


def gather(ctx, eqn, invals):
    """jlora.consumers' gather, but a gather of whole expert matrices (see the module doc) yields a Tracked of the
    per-token matrices with the factors gathered alike."""
    t, idx = invals
    plain_w = not isinstance(t, Tracked) or isinstance(idx, Tracked) or not hasattr(t.w, "shape")
    other = plain_w or t.route is not None or ctx.routed or getattr(t, "gain", None) is not None  # routing, DoRA
    found = None if other else _expert_axis(t, eqn, idx)
    if found is None:
        return consumers._gather(ctx, eqn, invals)
    if t.analysis:
        ctx.record(t, "expert_gather", found[1])
        out = bind(eqn, [t.w, idx])[0]
        return [_gathered(t, eqn, found, out, None, None, gathered_key(t.leaf.index))]
    mode = _MODES.get(eqn.params["mode"])
    if t.group(found[1]) != "P" or isinstance(t.w, Deferred) or mode is None:
        return consumers._gather(ctx, eqn, invals)  # the lookup layout (or a quantized base): jlora.consumers
    ids = idx[:, 0]
    a = jnp.take(t.a, ids, axis=t.labels("a").index(found[1]), mode=mode, fill_value=0)
    b = jnp.take(t.b, ids, axis=t.labels("b").index(found[1]), mode=mode, fill_value=0)
    out = bind(eqn, [t.w, idx])[0]
    return [_gathered(t, eqn, found, out, a, b, t.leaf.index)]


def _is_expert_use(records: list, atom: int) -> bool:
    return any(kind == "dot" and (atom,) in info[1] for kind, info in records)


def fold(records: dict) -> dict:
    """The analysis records with each per-token gather decided: followed by a dot batched over the gathered rows,
    the expert axis becomes a stacked prefix (a `slice` record, as `scan` gives) and the dot's record joins the
    weight's; otherwise it is the lookup `gather` jlora.consumers records and what followed it is dropped."""
    out = {k: v for k, v in records.items() if k >= 0}
    for index, recs in out.items():
        later = records.get(gathered_key(index), [])
        atoms = {info for kind, info in recs if kind == "expert_gather"}
        if not atoms:
            continue
        experts = {a for a in atoms if _is_expert_use(later, a)}
        out[index] = [("slice", info) if kind == "expert_gather" and info in experts else
                      ("gather", [(info,)]) if kind == "expert_gather" else (kind, info) for kind, info in recs]
        if experts:
            out[index] += later
    return out


CONSUMERS = collections.ChainMap({"gather": gather, **ragged.RULES}, consumers.CONSUMERS)
"""What the interpreter looks consumer rules up in: jlora.consumers' table with ragged_dot and the expert gather
in front of it (a live view, so rules added to jlora.consumers later count too)."""

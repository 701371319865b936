"""Control-flow rules of the interpreter: `remat`, `cond` and `scan` re-issued with their bodies interpreted; a
`scan` over a stacked weight slices its LoRA factors (and a quantized weight's blocks) per step."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jlora.deferred import Deferred, value
from jlora.interpreter import _plain_outs, eval_jaxpr, plain
from jlora.tracked import Tracked


def _remat(ctx, eqn, invals):
    p = eqn.params

    def body(*args):
        return _plain_outs(ctx, eval_jaxpr(p["jaxpr"], (), args, ctx), "remat")

    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals))


def _cond(ctx, eqn, invals):
    index, *ops = invals

    def branch(closed, *args):
        return _plain_outs(ctx, eval_jaxpr(closed.jaxpr, closed.consts, args, ctx), "cond")

    return list(lax.switch(index, [functools.partial(branch, br) for br in eqn.params["branches"]], *ops))


def _scan_slice(ctx, t: Tracked):
    """Packs a Tracked scanned over its leading axis as arrays with that axis first, or None if it cannot be."""
    if len(t.axes[0]) != 1:
        return None
    atom = t.axes[0][0]
    if t.analysis:
        ctx.record(t, "slice", atom)
        return (t.w, None, None, None), atom
    if t.group(atom) != "P":
        return None
    ia, ib = t.labels("a").index(atom), t.labels("b").index(atom)
    k = 0 if t.route is None else 1  # routed factors keep their adapter axis first
    g = None if t.gain is None else jnp.moveaxis(t.gain, t.atoms().index(atom), 0)  # DoRA's gain, sliced alike
    return (t.w, jnp.moveaxis(t.a, ia + k, k), jnp.moveaxis(t.b, ib + k, k), g), atom


def _stack(w):
    """A scanned base weight as scan `xs` and the rebuild of one step's slice: a Deferred one by its blocks."""
    split = w.split_leading() if isinstance(w, Deferred) else None
    return split if split is not None else (value(w), None)


def _scan(ctx, eqn, invals):
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts = invals[:n_consts]
    carry = _plain_outs(ctx, invals[n_consts : n_consts + n_carry], "scan carry")
    xs, rebuild = [], []
    for x in invals[n_consts + n_carry :]:
        packed = _scan_slice(ctx, x) if isinstance(x, Tracked) else None
        if packed is not None:
            (w, a, b, g), atom = packed
            w, unpack = _stack(w)
            xs.append((w, a, b, g))
            rebuild.append((x, atom, unpack))
        elif isinstance(x, Deferred):
            stacked, unpack = _stack(x)
            xs.append(stacked)
            rebuild.append(unpack)
        else:
            xs.append(plain(ctx, x, "scan"))
            rebuild.append(None)
    keys = jax.random.split(ctx.next_key(), p["length"]) if ctx.key is not None else None
    closed = p["jaxpr"]

    def body(c, inputs):
        x_slices, key = inputs
        args = []
        for x, how in zip(x_slices, rebuild):
            if how is None:
                args.append(x)
            elif callable(how):  # a Deferred weight's blocks for this step
                args.append(how(x))
            else:
                t, atom, unpack = how
                w, a, b, g = x
                w = w if unpack is None else unpack(w)
                args.append(t.replace(w=w, a=a, b=b, gain=g, axes=t.axes[1:], removed=t.removed | {atom}))
        sub = ctx.child(key) if key is not None else dataclasses.replace(ctx, key=None)
        outs = _plain_outs(ctx, eval_jaxpr(closed.jaxpr, closed.consts, [*consts, *c, *args], sub), "scan")
        return outs[:n_carry], outs[n_carry:]

    xs = [_adapter_axis_second(x, how) for x, how in zip(xs, rebuild)]
    c, ys = lax.scan(body, carry, (xs, keys), length=p["length"], reverse=p["reverse"], unroll=p["unroll"],
                     _split_transpose=p.get("_split_transpose", False))
    return [*c, *ys]


def _adapter_axis_second(x, how):
    """Routed factors sliced per step: the scanned axis first, the adapter axis after it."""
    if isinstance(how, tuple) and how[0].route is not None:
        w, a, b, g = x
        return w, jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0), g
    return x


CONTROL = {
    "remat2": _remat,
    "checkpoint": _remat,
    "cond": _cond,
    "scan": _scan,
}

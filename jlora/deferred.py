"""`Deferred`: a quantized weight followed through the structural ops a model applies to it, dequantized only at
the primitive that consumes it.

`lora.apply` on a frozen tree holding `QuantizedArray`s feeds each one to the interpreter as a `Deferred` (the
base of a targeted weight's `Tracked` too). Transposes, reshapes and casts are recorded, not run; `jit` calls are
inlined and a `scan` over a stacked weight slices the packed blocks per step. At the consumer (a dot, a gather,
anything else) the interpreter dequantizes inside `jax.checkpoint`, so a differentiated step keeps the packed
codes, not the float weight, alive for the backward pass and dequantizes again there (as QLoRA does).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jlora import quant_codes as qc
from jlora.qarray import QuantizedArray


@jax.tree_util.register_pytree_node_class
class Deferred:
    """`ops` applied in order to `q.dequantize()`: ("transpose", perm), ("reshape", sizes), ("astype", dtype name).
    `after`, when set, is a float32 scalar that is always 0.0 but computed from another value, added to the
    stored codes so that XLA cannot start dequantizing before that value exists (see `consume`)."""

    def __init__(self, q: QuantizedArray, ops: tuple = (), after=None):
        self.q, self.ops, self.after = q, ops, after
        shape, dtype = tuple(q.shape), jnp.dtype(q.dtype)
        for kind, arg in ops:
            if kind == "transpose":
                shape = tuple(shape[p] for p in arg)
            elif kind == "reshape":
                shape = tuple(arg)
            else:
                dtype = jnp.dtype(arg)
        self.shape, self.dtype = shape, dtype

    def tree_flatten(self):
        return (self.q, self.after), self.ops

    @classmethod
    def tree_unflatten(cls, ops, children):
        return cls(children[0], ops, children[1])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def transpose(self, perm) -> Deferred:
        return Deferred(self.q, (*self.ops, ("transpose", tuple(int(p) for p in perm))), self.after)

    def reshape(self, *sizes) -> Deferred:
        sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
        if -1 in sizes:
            known = math.prod(s for s in sizes if s != -1)
            sizes = tuple(math.prod(self.shape) // known if s == -1 else s for s in sizes)
        return Deferred(self.q, (*self.ops, ("reshape", tuple(int(s) for s in sizes))), self.after)

    def astype(self, dtype) -> Deferred:
        return Deferred(self.q, (*self.ops, ("astype", jnp.dtype(dtype).name)), self.after)

    def value(self):
        """The float array: dequantized, then the recorded ops."""
        q = self.q
        if self.after is not None:  # on the codes, the root of the dequantization (its table lookups too)
            q = dataclasses.replace(q, values=q.values + self.after.astype(q.values.dtype))
        x = q.dequantize()
        for kind, arg in self.ops:
            x = jnp.transpose(x, arg) if kind == "transpose" else x.reshape(arg) if kind == "reshape" else x.astype(arg)
        return x

    def split_leading(self):
        """For a `scan` over the leading axis: `(stacked, rebuild)`, `stacked` a pytree of arrays whose leading
        axis is that one and `rebuild(slice) -> Deferred` for one step; None where the blocks do not split there
        (recorded ops, a permuted leading axis, a step whose size is not a whole number of blocks)."""
        q = self.q
        if self.ops or not q.shape or (q.perm is not None and q.perm[0] != 0):
            return None
        steps, step_size = q.shape[0], q.size // q.shape[0]
        if step_size % q.block_size:
            return None
        absmax = q.scales
        if q.double_quant:  # the second-level groups need not align with steps: undo them (1 float per block)
            absmax = qc.double_dequantize(q.scales, q.scale_scales, q.scale_offset)
        stacked = (q.values.reshape(steps, -1, *q.values.shape[1:]),
                   None if absmax is None else absmax.reshape(steps, -1))
        perm = None if q.perm is None else tuple(p - 1 for p in q.perm[1:])

        def rebuild(parts):
            values, scales = parts
            inner = QuantizedArray(values.reshape(-1, *q.values.shape[1:]), scales, shape=q.shape[1:], dtype=q.dtype,
                                   qtype=q.qtype, block_size=q.block_size, perm=perm)
            return Deferred(inner)

        return stacked, rebuild


def value(x):
    """`x.value()` for a Deferred, `x` otherwise."""
    return x.value() if isinstance(x, Deferred) else x


def _zero_after(values):
    """A float32 scalar 0.0 that depends on the first float array in `values` (None if there is none): `where(
    isfinite(v), v * 0, 0)` of its first element, which XLA does not fold (x * 0 is NaN for x = inf or NaN, the
    `where` makes it 0.0 there too), so adding it changes nothing but the order of evaluation."""
    for v in jax.tree.leaves(values):
        if jnp.issubdtype(v.dtype, jnp.floating) and v.size:
            first = v.reshape(-1)[0].astype(jnp.float32)
            return jnp.where(jnp.isfinite(first), first * 0.0, 0.0)
    return None


def _after(part, after):
    """`part` (a Deferred, or a Tracked holding one as its base) dequantized only once `after` exists."""
    if isinstance(part, Deferred):
        return Deferred(part.q, part.ops, after)
    if isinstance(getattr(part, "w", None), Deferred):
        return part.replace(w=_after(part.w, after))
    return part


def consume(fn, lazy, args):
    """`fn(lazy, args)` with the quantized weights in `lazy` (Deferred, or Tracked holding one) dequantized where
    `fn` uses them, and only once `args` (the consumer's other array inputs) exist; differentiated, the backward
    pass dequantizes again once the output's cotangent exists, so neither pass keeps a float weight alive longer
    than its one use. (Without this, XLA hoists every dequantization to the start of the program and merges the
    backward's with the forward's, so all float weights live through the step. `jax.checkpoint` does not stop
    that on CPU, where optimization barriers are dropped before scheduling; a data dependency does.)
    Returns `fn`'s outputs, a list of arrays. `fn` must trace the same computation when called again (the backward
    calls it under `jax.vjp`). It is a `jax.custom_vjp`: reverse mode only (`jax.jvp` of it raises)."""

    def tied(parts, others, after):
        return fn([_after(p, after) for p in parts], others)

    @jax.custom_vjp
    def call(parts, others):
        return tied(parts, others, _zero_after(others))

    def fwd(parts, others):
        return tied(parts, others, _zero_after(others)), (parts, others)

    def bwd(saved, cotangents):
        parts, others = saved
        after = _zero_after(cotangents)
        _, pullback = jax.vjp(lambda p, o: tied(p, o, after), parts, others)
        return pullback(cotangents)

    call.defvjp(fwd, bwd)
    return call(lazy, args)

"""A jaxpr interpreter that evaluates a function with some weights replaced by `Tracked` LoRA values.

Equations without a `Tracked` input are bound as they are. Structural ops (transpose, reshape, cast) are followed;
`jit` calls are inlined; `scan`, `cond` and `remat` are re-issued with their bodies interpreted (jlora.control);
a quantized weight (`jlora.deferred.Deferred`) is dequantized at its consumer; consumers
(`dot_general`, `conv_general_dilated`, `gather`) run factored (jlora.consumers). Anything else falls back to the
materialised `W + scale * a @ b`, with a warning naming the parameter and the primitive (an error with strict).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import warnings
from typing import Any

import jax
from jax.extend.core import Literal

from jlora.deferred import Deferred, consume, value
from jlora.tracked import Tracked


class FactoredFallbackWarning(UserWarning):
    """A targeted weight reached a primitive jlora cannot compute factored, so W + delta was materialised."""


@dataclasses.dataclass
class Context:
    """Trace-time state of one interpretation: strictness, analysis records, and the dropout key stream."""

    strict: bool = False
    records: dict[int, list] | None = None  # analysis mode: leaf index -> [(kind, info), ...]
    key: Any = None
    count: int = 0
    routed: bool = False  # inside a per-example consumer of routed adapters (jlora.routing)

    def next_key(self):
        """A fresh key for one use: `fold_in(dropout_key, n)` for the n-th LoRA branch traced."""
        self.count += 1
        return jax.random.fold_in(self.key, self.count)

    def child(self, key) -> Context:
        return Context(self.strict, self.records, key, routed=self.routed)

    def record(self, t: Tracked, kind: str, info):
        if self.records is not None:
            self.records.setdefault(t.leaf.index, []).append((kind, info))


def bind(eqn, invals):
    """`eqn`'s primitive applied to `invals`, as `jax.core.eval_jaxpr` does it (a `Deferred` one dequantized)."""
    invals = [value(v) for v in invals]
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _user_stacklevel() -> int:
    """The `stacklevel` for a warning issued by the caller that names the first frame outside jlora, jax and flax:
    the user's line that called `lora.apply` (or the function jitted around it)."""
    specs = [importlib.util.find_spec(name) for name in ("jlora", "jax", "jaxlib", "flax")]
    internal = tuple(os.path.join(d, "") for s in specs if s for d in (s.submodule_search_locations or ()))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


def plain(ctx: Context, value, prim: str):
    """A plain array for `value`, materialising a Tracked one (the fallback path) or dequantizing a Deferred one."""
    if isinstance(value, Deferred):
        return value.value()
    if not isinstance(value, Tracked):
        return value
    if value.route is not None:
        raise ValueError(f"jlora: per-row routing: the parameter {value.leaf.path!r} {value.leaf.shape} reaches "
                         f"`{prim}`, which is not a consumer jlora computes factored (dot, gather, conv), so it has no "
                         f"per-row form; route only weights that are used by those (check with lora.consumers)")
    if value.analysis:
        ctx.record(value, "fallback", prim)
        return value.w
    msg = (f"jlora: the parameter {value.leaf.path!r} {value.leaf.shape} reaches `{prim}`, which jlora cannot "
           f"compute factored")
    if ctx.strict:
        raise ValueError(msg + "; strict=True refuses the fallback (materialising W + scale * a @ b, correct but "
                         "slower). To allow it, build the transform with strict=False (a FactoredFallbackWarning "
                         "then names each fallback), or keep this weight out of targets")
    warnings.warn(msg + "; materialising W + scale * a @ b instead (correct, slower). Pass strict=True to make "
                  "this an error.", FactoredFallbackWarning, stacklevel=_user_stacklevel())
    return value.materialize()


def fallback(ctx, eqn, invals):
    return bind(eqn, [plain(ctx, v, eqn.primitive.name) for v in invals])


def eval_jaxpr(jaxpr, consts, args, ctx: Context) -> list:
    """Evaluates an open `jaxpr` on `args`, any of which may be `Tracked`."""
    from jlora.control import CONTROL
    from jlora.experts import CONSUMERS  # jlora.consumers' rules, ragged_dot and gathers of expert matrices

    env: dict = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(v, (Tracked, Deferred)) for v in invals):
            name = eqn.primitive.name
            if name in STRUCTURAL or name in CONTROL:
                outs = (STRUCTURAL.get(name) or CONTROL[name])(ctx, eqn, invals)
                outs = fallback(ctx, eqn, invals) if outs is None else outs
            elif any(_quantized(v) for v in invals):
                outs = _dequantizing(CONSUMERS.get(name), ctx, eqn, invals)
            else:
                outs = _consume(CONSUMERS.get(name), ctx, eqn, invals)
        else:
            outs = bind(eqn, invals)
        for var, val in zip(eqn.outvars, outs):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _consume(rule, ctx, eqn, invals):
    """The consumer `rule`'s outputs (None: no rule, or it declines), else the fallback; per example for routed
    adapters (`jlora.routing`)."""
    if any(isinstance(v, Tracked) and v.route is not None for v in invals):
        from jlora.routing import routed

        return routed(rule, ctx, eqn, invals)
    outs = rule(ctx, eqn, invals) if rule and any(isinstance(v, Tracked) for v in invals) else None
    return fallback(ctx, eqn, invals) if outs is None else outs


def _quantized(v) -> bool:
    return isinstance(v, Deferred) or (isinstance(v, Tracked) and isinstance(v.w, Deferred))


def _dequantizing(rule, ctx, eqn, invals):
    """`_consume` with the quantized weights dequantized at this consumer and, differentiated, again in the
    backward pass (`jlora.deferred.consume`) rather than kept alive in between."""
    lazy = [i for i, v in enumerate(invals) if isinstance(v, (Tracked, Deferred))]
    arrays = [i for i, v in enumerate(invals) if i not in lazy and isinstance(v, jax.Array)]
    start = ctx.count

    def run(parts, others):
        vals = list(invals)
        for i, v in [*zip(lazy, parts), *zip(arrays, others)]:
            vals[i] = v
        sub = dataclasses.replace(ctx, count=start)  # the same dropout keys when the backward pass re-traces it
        with warnings.catch_warnings():
            if ctx.count != start:  # a re-trace: its fallback warning was given the first time
                warnings.simplefilter("ignore", FactoredFallbackWarning)
            outs = _consume(rule, sub, eqn, vals)
        ctx.count = sub.count
        return list(outs)

    return consume(run, [invals[i] for i in lazy], [invals[i] for i in arrays])


def _plain_outs(ctx, outs, prim):
    return [plain(ctx, o, prim) for o in outs]


# --- structural rules: each returns the outputs, or None to fall back ---------------------------------------
def _transpose(ctx, eqn, invals):
    return [invals[0].transpose(eqn.params["permutation"])]


def _convert(ctx, eqn, invals):
    return [invals[0].astype(eqn.params["new_dtype"])]


def _reshape(ctx, eqn, invals):
    if eqn.params.get("dimensions") is not None:
        return None
    out = invals[0].reshape(eqn.params["new_sizes"])
    return None if out is None else [out]


def _identity(ctx, eqn, invals):
    return [invals[0]]


def _jit(ctx, eqn, invals):
    closed = eqn.params["jaxpr"]
    return eval_jaxpr(closed.jaxpr, closed.consts, invals, ctx)


def _closed_call(ctx, eqn, invals):
    closed = eqn.params["call_jaxpr"]
    return eval_jaxpr(closed.jaxpr, closed.consts, invals, ctx)


STRUCTURAL = {
    "transpose": _transpose,
    "convert_element_type": _convert,
    "reshape": _reshape,
    "copy": _identity,
    "copy_p": _identity,
    "jit": _jit,
    "pjit": _jit,
    "closed_call": _closed_call,
}

"""The factored rule for `ragged_dot` (grouped matmul, `jax.lax.ragged_dot` / `ragged_dot_general`): mixture-of-experts
weights W (E, in, out) whose expert axis is the group axis.

An expert weight consumed as `ragged_dot(x, W, group_sizes)` (rows of x sorted by expert, group e of size
`group_sizes[e]` multiplied by W[e]) gets one pair per expert: the expert axis is a stacked prefix (as `scan` makes
one), so `lora_a` (E, in, r) and `lora_b` (E, r, out), and W[e]'s update is `scale * lora_a[e] @ lora_b[e]`, rank r
per expert (PEFT's `target_parameters` gives each expert rank r too; see jlora.interop.peft_experts). The LoRA
branch is two more ragged products with the same group sizes, `ragged_dot(ragged_dot(x, lora_a), lora_b)`: no
per-expert W + delta, no (E, in, out) gradient, no gather of per-token matrices. Any layout of W works whose expert
axis is the group dimension (`x @ W[e].T` of a torch-layout (E, out, in) weight, via `transpose`, too).

Covered: the ragged dimension a non-contracting dimension of x with one-dimensional `group_sizes` (the
`jax.lax.ragged_dot` mode), no batch dimensions. Anything else (the weight as the ragged lhs, ragged contracting
or batch dimensions, an expert axis that is not a stacked prefix) returns None: the interpreter falls back to the
materialised weight with a `FactoredFallbackWarning` (an error with strict=True), so no expert is left untrained.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jlora.consumers import _dropout, _pick_tracked
from jlora.interpreter import bind
from jlora.tracked import Tracked


def _ragged(x, f, group_sizes, contract: tuple, lhs_ragged: int, rhs_group: int, kw):
    """`ragged_dot_general(x, f, group_sizes)` in mode 1 (x ragged on a free dim, f grouped), no batch dims."""
    dn = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(contract, ((), ())), lhs_ragged_dimensions=(lhs_ragged,),
                                       rhs_group_dimensions=(rhs_group,))
    return lax.ragged_dot_general(x, f, group_sizes, dn, **kw)


def ragged_dot(ctx, eqn, invals):
    """`ragged_dot_general(x, W, group_sizes)` with W Tracked: base + scale * (x @_g a) @_g b, or None (fallback).

    In analysis mode records a `dot` whose batch atoms are the expert (group) axis, so `analysis.decide` makes the
    expert axis a stacked prefix: lora_a (E, contracted axes..., r), lora_b (E, r, other axes...)."""
    side, invals = _pick_tracked(ctx, eqn, invals, allowed=(1,))
    if side is None or isinstance(invals[2], Tracked):
        return None
    x, t, group_sizes = invals
    p = eqn.params
    rdn = p["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
    if len(rdn.rhs_group_dimensions) != 1 or len(rdn.lhs_ragged_dimensions) != 1 or lb or rb:
        return None
    g, ragged = rdn.rhs_group_dimensions[0], rdn.lhs_ragged_dimensions[0]
    if ragged in lc or jnp.ndim(group_sizes) != 1:
        return None
    if t.analysis:
        ctx.record(t, "dot", ([t.axes[i] for i in rc], [t.axes[g]]))
        return bind(eqn, [x, t.w, group_sizes])
    if ctx.routed or t.route is not None or getattr(t, "gain", None) is not None:
        return None  # per-row routing has no per-example form of a grouped matmul; DoRA's gain: the fallback
    groups = [t.axis_group(i) for i in range(len(t.axes))]
    free = [i for i in range(len(t.axes)) if i != g and i not in rc]
    contracted = {groups[i] for i in rc}
    if groups[g] != "P" or len(t.axes[g]) != 1 or len(contracted) != 1 or not contracted <= {"A", "B"}:
        return None
    (first,) = contracted
    if not free or any(groups[i] != ({"A", "B"} - contracted).pop() for i in free):
        return None
    f1, sel1 = t.view("a" if first == "A" else "b")  # shape=(sel1 sizes..., r): the expert and contracted axes
    f2, sel2 = t.view("b" if first == "A" else "a")  # shape=(sel2 sizes..., r): the expert and free axes
    if sorted(sel1) != sorted([g, *rc]) or sorted(sel2) != sorted([g, *free]):
        return None
    kw = dict(precision=p["precision"], preferred_element_type=p["preferred_element_type"])
    base = bind(eqn, [x, t.w, group_sizes])[0]
    xd = _dropout(ctx, x, t.leaf.dropout)
    tmp = _ragged(xd, f1, group_sizes, (tuple(lc), tuple(sel1.index(i) for i in rc)), ragged, sel1.index(g), kw)
    tmp = tmp * jnp.asarray(t.leaf.scale, tmp.dtype)  # shape=(x's free dims..., r)
    x_free = [i for i in range(x.ndim) if i not in lc]
    f2 = jnp.moveaxis(f2, -1, 0)  # shape=(r, sel2 sizes...): rank first, the free axes after in the value's order
    low = _ragged(tmp, f2, group_sizes, ((tmp.ndim - 1,), (0,)), x_free.index(ragged), 1 + sel2.index(g), kw)
    return [base + low.astype(base.dtype)]


RULES = {"ragged_dot_general": ragged_dot}

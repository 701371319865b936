"""Tracing a function of a params pytree to a jaxpr, and reading from it how each targeted weight is consumed,
which decides the adapter layout (which axes `lora_a` covers, which leading axes are stacked by `scan`)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import numpy as np

from jlora.interpreter import Context, eval_jaxpr, plain
from jlora.layout import fitting_a_axes
from jlora.paths import path_str
from jlora.qarray import is_quantized
from jlora.tracked import Leaf, Tracked


def _is_dynamic(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval")


def _abstract(x):
    """The float array a leaf stands for, as a ShapeDtypeStruct (a QuantizedArray: its logical shape and dtype)."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def check_arrays(variables):
    """Raises a TypeError naming the first variables leaf that is neither an array nor a QuantizedArray."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables, is_leaf=is_quantized)[0]:
        if is_quantized(leaf):
            leaf.check(path_str(path))
        elif not _is_dynamic(leaf):
            raise TypeError(f"variables leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an array")


def run(fn, variables, args, kwargs, substitute, ctx: Context):
    """Evaluates `fn(variables, *args, **kwargs)` through the interpreter, with the variables' leaf i replaced by
    `substitute(i, leaf)` (a Tracked or the leaf itself). Non-array args and kwargs leaves are static. A
    `QuantizedArray` leaf counts as one leaf: `fn` is traced with the float array it stands for."""
    check_arrays(variables)
    var_leaves, var_tree = jax.tree_util.tree_flatten(variables, is_leaf=is_quantized)
    arg_leaves, arg_tree = jax.tree_util.tree_flatten((args, kwargs))
    dyn = [i for i, x in enumerate(arg_leaves) if _is_dynamic(x)]

    def flat_fn(var_vals, dyn_vals):
        leaves = list(arg_leaves)
        for i, v in zip(dyn, dyn_vals):
            leaves[i] = v
        a, k = jax.tree_util.tree_unflatten(arg_tree, leaves)
        return fn(jax.tree_util.tree_unflatten(var_tree, var_vals), *a, **k)

    dyn_vals = [arg_leaves[i] for i in dyn]
    traced = [_abstract(x) if is_quantized(x) else x for x in var_leaves]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(traced, dyn_vals)
    inputs = [substitute(i, leaf) for i, leaf in enumerate(var_leaves)] + dyn_vals
    outs = eval_jaxpr(closed.jaxpr, closed.consts, inputs, ctx)
    outs = [plain(ctx, o, "output") for o in outs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one weight is adapted: `n_prefix` leading axes P stacked (scan, or einsum batch dims), `a_axes` the
    axes of W that lora_a covers (ascending; the rest after P are lora_b's), the side x contracts with ('a' or 'b'),
    and the init family ('dense' or 'embed')."""

    n_prefix: int
    a_axes: tuple[int, ...]
    input_side: str
    kind: str


class LayoutWarning(UserWarning):
    """A targeted weight's uses contract different axes, or its axis sizes coincide so that the adapter shapes
    could not say which axes lora_a covers: the adapter then covers more axes than a use contracts (an update of
    rank above r as a map from that use's contracted axes)."""


def analyse(fn, variables, args, kwargs, targets: dict[int, str]) -> dict[int, list]:
    """Records, per targeted leaf index, the consumers it reaches: [(kind, info), ...]."""
    check_arrays(variables)
    ctx = Context(records={})
    leaves, treedef = jax.tree_util.tree_flatten(variables, is_leaf=is_quantized)

    def substitute(i, leaf):
        if i not in targets:
            return leaf
        axes = tuple((k,) for k in range(leaf.ndim))
        return Tracked(leaf, None, None, axes=axes, removed=frozenset(),
                       leaf=Leaf(targets[i], i, tuple(leaf.shape)))

    abstract = [_abstract(x) for x in leaves]
    jax.eval_shape(lambda v: run(fn, jax.tree_util.tree_unflatten(treedef, v), args, kwargs, substitute, ctx),
                   abstract)
    from jlora.experts import fold

    return fold(ctx.records)  # per-token gathers of expert matrices decided (jlora.experts)


def _contracted(use) -> list[int]:
    """The atoms of W a dot, conv or gather record contracts (a gather: the axes it indexes)."""
    kind, info = use
    return sorted(t for ax in (info if kind == "gather" else info[0]) for t in ax)


def decide(path: str, shape: tuple[int, ...], records: list) -> Plan:
    """The layout for one weight from its consumer records: lora_a covers the axes the (first) use contracts, and
    the rest after the stacked prefix go to lora_b, so the update has rank <= r as a map from the contracted axes
    to the rest, wherever those axes sit (Gemma's `BTD,NDH->BTNH`: lora_a (D, r), lora_b (r, N, H)). Axes
    contracted at the end keep the input side on lora_b (a kernel (out, in) used as x @ W.T: lora_a (out, r))."""
    ndim = len(shape)
    sliced = list(dict.fromkeys(info for kind, info in records if kind == "slice"))
    n_prefix = len(sliced) if sorted(sliced) == list(range(len(sliced))) else 0
    uses = [r for r in records if r[0] in ("dot", "gather", "conv")]
    if not records:
        raise ValueError(f"the target {path!r} is never used by the function: remove it from targets")
    gathers = [r for r in uses if r[0] == "gather"]
    use = gathers[0] if gathers else uses[0] if uses else None
    kind = "embed" if gathers else "dense"
    if use is not None and use[0] == "dot":
        batch = sorted(t for ax in use[1][1] for t in ax)
        if batch == list(range(n_prefix, n_prefix + len(batch))):
            n_prefix += len(batch)
    rest = list(range(n_prefix, ndim))
    if len(rest) < 2:
        raise ValueError(f"the target {path!r} has {ndim} axes with {n_prefix} stacked by scan: no room for a "
                         f"low-rank pair (needs two axes beyond the stacked ones)")
    c = [t for t in _contracted(use) if t >= n_prefix] if use is not None else []
    default = Plan(n_prefix, tuple(rest[:-1]), "a", kind)
    if not c or len(c) == len(rest):
        return default
    if c == rest[-len(c):]:
        plan = Plan(n_prefix, tuple(rest[: len(rest) - len(c)]), "b", kind)
    else:
        plan = Plan(n_prefix, tuple(c), "a", kind)
    b_axes = tuple(t for t in rest if t not in plan.a_axes)
    others = {tuple(t for t in _contracted(u) if t >= n_prefix) for u in uses} - {plan.a_axes, b_axes}
    if others:
        warnings.warn(f"jlora: the uses of {path!r} {shape} contract different axes ({sorted(others)} besides "
                      f"{c}); lora_a covers axes {list(plan.a_axes)}, so for the other uses the update is not of "
                      f"rank <= r from their contracted axes", LayoutWarning, stacklevel=4)
    if plan.a_axes != tuple(rest[: len(plan.a_axes)]):
        sizes = [tuple(shape[i] for i in axes) for axes in (plan.a_axes, b_axes)]
        fits = fitting_a_axes(shape, shape[:n_prefix] + sizes[0] + (1,), shape[:n_prefix] + (1,) + sizes[1],
                              n_prefix)
        if fits != [plan.a_axes]:
            warnings.warn(f"jlora: {path!r} {shape} is contracted on axes {list(plan.a_axes)}, but other axes have "
                          f"the same sizes, so the adapter shapes could not say which axes lora_a covers; it covers "
                          f"the leading axes {list(default.a_axes)} instead (an update of rank up to r times the "
                          f"other axes' size)", LayoutWarning, stacklevel=4)
            return default
    return plan


def consumers_summary(records: dict[int, list], names: dict[int, str]) -> dict[str, list[str]]:
    """{path: [primitive names reached]}: handy for a user checking what runs factored."""
    out: dict[str, Any] = {}
    for i, recs in records.items():
        out[names[i]] = [info if kind == "fallback" else kind for kind, info in recs if kind != "slice"]
    return out

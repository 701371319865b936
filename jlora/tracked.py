"""`Tracked`: a weight W followed through the structural ops a model applies to it before it is consumed.

Every axis of the current value is a tuple of *atoms*, the original axes of W it holds (a transpose permutes
them, a reshape merges or splits them, a `scan` over W slices a leading atom away). Knowing the atoms of each axis
is what lets a consumer (`dot_general`, `conv`, `gather`) be rewritten in terms of the factors `lora_a`, `lora_b`
without forming W + delta. In analysis mode (`lora.init`) the factors are absent and only the atoms are followed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora.deferred import value
from jlora.layout import Layout

R = -1  # the label of the rank axis among atom labels


@dataclasses.dataclass(frozen=True)
class Leaf:
    """Static facts about one adapted parameter."""

    path: str
    index: int  # position among the variables' leaves
    shape: tuple[int, ...]  # original W shape
    layout: Layout | None = None  # None in analysis mode
    scale: float = 0.0
    dropout: float = 0.0


@jax.tree_util.register_pytree_node_class
class Tracked:
    """The value `w + scale * (a @ b)` viewed through structural ops. `axes[i]` lists the atoms of axis i."""

    def __init__(self, w, a, b, *, axes: tuple[tuple[int, ...], ...], removed: frozenset, leaf: Leaf, route=None,
                 gain=None):
        # w: an array, or a jlora.deferred.Deferred (a quantized base, dequantized at the consumer);
        # route: None, or int (batch,) adapter indices, a and b then stacked on a leading adapter axis (jlora.routing)
        # gain: None, or DoRA's g (jlora.variants.dora): one axis per atom not removed, in atom order, size 1 on the
        # normed atoms; the value is then g * (w + scale * a @ b)
        self.w, self.a, self.b, self.route = w, a, b, route  # a: shape=P'+A+(R,), b: shape=P'+(R,)+B (b fused-expanded)
        self.axes, self.removed, self.leaf, self.gain = axes, removed, leaf, gain

    def tree_flatten(self):
        return (self.w, self.a, self.b, self.route, self.gain), (self.axes, self.removed, self.leaf)

    @classmethod
    def tree_unflatten(cls, aux, children):
        w, a, b, route, gain = children
        return cls(w, a, b, axes=aux[0], removed=aux[1], leaf=aux[2], route=route, gain=gain)

    def replace(self, **kw) -> Tracked:
        fields: dict[str, Any] = dict(w=self.w, a=self.a, b=self.b, axes=self.axes, removed=self.removed,
                                      leaf=self.leaf, route=self.route, gain=self.gain)
        fields.update(kw)
        return Tracked(fields.pop("w"), fields.pop("a"), fields.pop("b"), **fields)

    @property
    def analysis(self) -> bool:
        return self.a is None

    # --- groups and factor views -------------------------------------------------------------------------
    def group(self, atom: int) -> str:
        lay = self.leaf.layout
        return "P" if atom < lay.n_prefix else "A" if atom in lay.a_idx else "B"

    def axis_group(self, i: int) -> str | None:
        """'P', 'A' or 'B' for an axis whose atoms share one group; '' for an atom-less size-1 axis; None if mixed."""
        groups = {self.group(t) for t in self.axes[i]}
        return "" if not groups else groups.pop() if len(groups) == 1 else None

    def labels(self, factor: str) -> list[int]:
        lay = self.leaf.layout
        prefix = [k for k in range(lay.n_prefix) if k not in self.removed]
        if factor == "a":
            return prefix + list(lay.a_idx) + [R]
        return prefix + [R] + list(lay.b_idx)

    def view(self, factor: str) -> tuple[jax.Array, list[int]]:
        """The factor with its axes in this value's order: returns (array, axis indices i it covers); the array's
        axes are those axes of the value (merged atoms reshaped together) followed by the rank axis."""
        labels = self.labels(factor)
        owned = set(labels) - {R}
        sel = [i for i, ax in enumerate(self.axes) if ax and set(ax) <= owned]
        order = [t for i in sel for t in self.axes[i]]
        arr = self.a if factor == "a" else self.b
        arr = jnp.transpose(arr, [labels.index(t) for t in order] + [labels.index(R)])
        sizes = [math.prod(self.leaf.shape[t] for t in self.axes[i]) for i in sel]
        return arr.reshape(sizes + [arr.shape[-1]]).astype(self.w.dtype), sel

    def atoms(self) -> list[int]:
        """W's axes not sliced away by a scan, ascending: the axes of `gain`."""
        return [k for k in range(len(self.leaf.shape)) if k not in self.removed]

    def gain_view(self):
        """DoRA's gain in this value's axes (size 1 where it is constant), or None (see `jlora.variants.dora.view`)."""
        from jlora.variants.dora import view

        return view(self.gain, self.axes, self.atoms(), self.leaf.shape)

    def materialize(self):
        """`w + scale * delta` in the current view: the fallback for a consumer that cannot run factored."""
        if self.analysis:
            return self.w
        la, lb = self.labels("a"), self.labels("b")
        order = [t for ax in self.axes for t in ax]
        d = jnp.einsum(self.a.astype(jnp.float32), la, self.b.astype(jnp.float32), lb, order,
                       precision=jax.lax.Precision.HIGHEST)
        out = value(self.w) + (self.leaf.scale * d).reshape(self.w.shape).astype(self.w.dtype)
        if self.gain is None:
            return out
        atoms = self.atoms()
        g = jnp.transpose(self.gain, [atoms.index(t) for t in order])
        g = jnp.broadcast_to(g, [self.leaf.shape[t] for t in order]).reshape(self.w.shape)
        return (g * out).astype(out.dtype)

    # --- structural ops -----------------------------------------------------------------------------------
    def transpose(self, perm) -> Tracked:
        return self.replace(w=self.w.transpose(perm), axes=tuple(self.axes[p] for p in perm))

    def astype(self, dtype) -> Tracked:
        return self.replace(w=self.w.astype(dtype))

    def reshape(self, new_sizes) -> Tracked | None:
        """The reshaped value, or None where the reshape splits an original axis (not followed)."""
        axes = _reshape_axes(self.axes, self.w.shape, tuple(new_sizes), self.leaf.shape)
        return None if axes is None else self.replace(w=self.w.reshape(new_sizes), axes=axes)


def _reshape_axes(axes, old, new, atom_sizes):
    """Atoms per new axis for a reshape old -> new, or None where an atom would be split."""
    out, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        if j < len(new) and new[j] == 1 and (i == len(old) or old[i] != 1):
            out.append(())
            j += 1
            continue
        if i < len(old) and old[i] == 1 and (j == len(new) or new[j] != 1):
            if axes[i]:
                return None
            i += 1
            continue
        po, pn, i2, j2 = old[i], new[j], i + 1, j + 1
        while po != pn:
            if po < pn:
                po, i2 = po * old[i2], i2 + 1
            else:
                pn, j2 = pn * new[j2], j2 + 1
        atoms = [t for ax in axes[i:i2] for t in ax]
        for size in new[j:j2]:
            run, prod = [], 1
            while prod < size and atoms:
                run.append(atoms.pop(0))
                prod *= atom_sizes[run[-1]]
            if prod != size:
                return None
            out.append(tuple(run))
        if atoms:
            return None
        i, j = i2, j2
    return tuple(out)

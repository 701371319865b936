"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024; PEFT's `use_dora=True`), computed factored.

An adapted weight W (axes P + A + B, see `jlora.layout`) becomes

    W' = g * (W + s * a @ b),   g = m / stop_gradient(||W + s * a @ b||)

with the norms taken over the input axes (the group x contracts: A for `x @ W`, an embedding's vocab axis; B for a
kernel (out, in) used as `x @ W.T`), one per element of the other axes and the stacked prefix P, and treated as
constants in the backward pass (DoRA section 4.3, as PEFT does). The trained `magnitude` m, stored beside lora_a and
lora_b, has W's rank with size 1 on the normed axes, so it broadcasts against W: a Dense kernel (in, out) has m
(1, out), a conv kernel (k..., in, out) m (1, ..., 1, out), an embedding (vocab, dim) m (1, dim), a kernel (out, in)
used as `x @ W.T` m (out, 1), an `nn.scan`-stacked kernel (L, in, out) m (L, 1, out). A fused projection's m covers
its enabled slices only, (1, e * d); its disabled slices keep g = 1. `lora.init` sets m to the norms of
W + s * a @ b (||W||, since b or a starts at zero).

The norms never form an (in, out) product: with W a matrix (in, out) normed over in,

    ||W_j + s (a b)_j||^2 = ||W_j||^2 + 2 s ((W^T a) b^T)_jj + s^2 (b^T (a^T a) b)_jj,

one (out, r) product W^T a, an (r, r) Gram matrix and (r, out) work (`norms`). Each consumer (jlora.consumers) then
multiplies its output by g along W's output axes, PEFT's forward: `g * (x @ W + s * (x @ a) @ b)`, and with LoRA
dropout `x @ W + (g - 1) * (xd @ W) + g * s * (xd @ a) @ b` (xd the dropped-out input; `combine`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from jlora.deferred import value
from jlora.layout import Layout, fused_b
from jlora.paths import MAGNITUDE

_HI = lax.Precision.HIGHEST


def _normed_axes(lay: Layout, normed: str) -> tuple[int, ...]:
    return lay.a_idx if normed == "a" else lay.b_idx


def gain_shape(lay: Layout, normed: str) -> tuple[int, ...]:
    """W's shape with the normed axes set to 1: the shape of the norms and of the gain g (all fused slices)."""
    axes = _normed_axes(lay, normed)
    return tuple(1 if i in axes else n for i, n in enumerate(lay.shape))


def magnitude_shape(lay: Layout, normed: str) -> tuple[int, ...]:
    """The shape of m: `gain_shape`, a fused output axis cut to its enabled slices (e * d)."""
    shape = list(gain_shape(lay, normed))
    if lay.fused:
        shape[-1] = shape[-1] // len(lay.fused) * sum(lay.fused)
    return tuple(shape)


def read_normed(path: str, lay: Layout, m_shape) -> str:
    """Which group of W's axes the magnitude `m_shape` is normed over: 'a' (lora_a's axes, W used as x @ W) or 'b'
    (lora_b's, W used as x @ W.T); a ValueError naming the shapes where it fits neither."""
    sides = ("a",) if lay.fused else ("a", "b")
    for side in sides:
        if magnitude_shape(lay, side) == tuple(m_shape):
            return side
    want = " or ".join(f"{magnitude_shape(lay, s)}" for s in sides)
    raise ValueError(f"{path}: the DoRA magnitude {tuple(m_shape)} does not fit the weight {lay.shape} with lora_a "
                     f"{lay.a_shape}: expected {want} (W's shape with the input axes set to 1); the adapters were "
                     f"made for another model or config: re-run lora.init with this config")


def _matrices(w, a, b, lay: Layout):
    """W, a, b as float32 batched matrices: (P..., nA, nB), (P..., nA, R), (P..., R, nB) (b fused-expanded)."""
    p, shape = lay.n_prefix, lay.shape
    pre = shape[:p]
    n_a, n_b = math.prod(shape[i] for i in lay.a_idx), math.prod(shape[i] for i in lay.b_idx)
    w2 = jnp.transpose(w.astype(jnp.float32), (*range(p), *lay.a_idx, *lay.b_idx)).reshape(pre + (n_a, n_b))
    a2 = a.astype(jnp.float32).reshape(pre + (n_a, a.shape[-1]))
    bf = fused_b(b, lay)
    b2 = bf.astype(jnp.float32).reshape(pre + (bf.shape[p], n_b))
    return w2, a2, b2


def norms(w, a, b, lay: Layout, scale: float, normed: str):
    """||W + scale * a @ b|| over the normed axes, without forming an (in, out) product: float32, shape=`gain_shape`.
    w: W (an array or a `Deferred` quantized base); a, b: the pair (b as stored: fused b is expanded here)."""
    w2, a2, b2 = _matrices(value(w), a, b, lay)
    if normed == "a":  # one norm per column j of W (in, out)
        sq = jnp.sum(w2 * w2, axis=-2)
        wa = jnp.einsum("...ij,...ir->...jr", w2, a2, precision=_HI)  # shape=(P..., out, R)
        cross = jnp.sum(wa * jnp.swapaxes(b2, -1, -2), axis=-1)
        gram = jnp.einsum("...ir,...is->...rs", a2, a2, precision=_HI)
        low = jnp.sum(jnp.einsum("...rs,...sj->...rj", gram, b2, precision=_HI) * b2, axis=-2)
    else:  # one per row i
        sq = jnp.sum(w2 * w2, axis=-1)
        wb = jnp.einsum("...ij,...rj->...ir", w2, b2, precision=_HI)  # shape=(P..., in, R)
        cross = jnp.sum(wb * a2, axis=-1)
        gram = jnp.einsum("...rj,...sj->...rs", b2, b2, precision=_HI)
        low = jnp.sum(jnp.einsum("...ir,...rs->...is", a2, gram, precision=_HI) * a2, axis=-1)
    n2 = sq + 2.0 * scale * cross + scale * scale * low
    return jnp.sqrt(jnp.maximum(n2, 0.0)).reshape(gain_shape(lay, normed))


def direct_norms(v, lay: Layout, normed: str):
    """The norms of a formed weight `v` (W's shape) over the normed axes, float32 (merge and unmerge)."""
    v = v.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(v * v, axis=_normed_axes(lay, normed), keepdims=True))


def _enabled_columns(lay: Layout):
    """A bool (n * d,) mask of the fused output columns that carry an adapter."""
    d = lay.shape[-1] // len(lay.fused)
    return jnp.repeat(jnp.asarray(lay.fused), d)


def from_norms(m, n, lay: Layout):
    """g = m / n, shape=`gain_shape`; a fused m (enabled slices only) is spread out, g = 1 on disabled slices."""
    m = m.astype(jnp.float32)
    if not lay.fused:
        return m / n
    d, parts, k = lay.shape[-1] // len(lay.fused), [], 0
    for enabled in lay.fused:
        if enabled:
            parts.append(m[..., k * d : (k + 1) * d])
            k += 1
        else:
            parts.append(jnp.ones(m.shape[:-1] + (d,), m.dtype))
    on = _enabled_columns(lay)
    return jnp.concatenate(parts, axis=-1) / jnp.where(on, n, 1.0)


def gain(w, a, b, m, lay: Layout, scale: float, normed: str):
    """g = m / stop_gradient(norms): float32, shape=`gain_shape(lay, normed)` (a differentiable function of m only)."""
    return from_norms(m, lax.stop_gradient(norms(w, a, b, lay, scale, normed)), lay)


def init_magnitude(w, a, b, lay: Layout, scale: float, normed: str, dtype):
    """m's initial value, the norms of W + scale * a @ b (||W|| for a fresh pair), shape=`magnitude_shape`."""
    n = norms(w, a, b, lay, scale, normed)
    if lay.fused:
        n = n[..., _enabled_columns(lay)]
    return n.astype(dtype)


def combine(base, low, g, base_d=None):
    """A consumer's DoRA output from its parts, as PEFT computes it: `g * (base + low)`, or with LoRA dropout
    `base + (g - 1) * base_d + g * low` (base_d the consumer on the dropped-out input, W only). `g` broadcasts
    against the output; the result has base's dtype."""
    g = g.astype(base.dtype)
    low = low.astype(base.dtype)
    if base_d is None:
        return g * (base + low)
    return base + (g - 1) * base_d + g * low


def check_unrouted(pairs) -> None:
    """A ValueError for DoRA adapters given to per-row routing or a stack (`jlora.routing`, `jlora.multi`)."""
    dora = sorted(p for p, pair in pairs.items() if MAGNITUDE in pair)
    if dora:
        raise ValueError(f"DoRA adapters (a magnitude at {dora[:4]}{' ...' if len(dora) > 4 else ''}) cannot be "
                         f"stacked or routed per row: the DoRA gain rescales the base weight's output, which a stack "
                         f"shares; serve DoRA adapters one at a time, or merge them (jlora.merge)")


def merge_weight(w32, d, m, lay: Layout, normed: str):
    """W' = g * (W + d) with g from the norms of W + d formed here (PEFT's merge): float32, W's shape."""
    v = w32 + d
    return v * from_norms(m, direct_norms(v, lay, normed), lay)


def unmerge_weight(merged32, minus_d, m, n, lay: Layout):
    """W = W' / g - d (given `minus_d` = -d), g = m / n with `n` the norms `jlora.merge.dora_norms` took before
    merging: float32, W's shape."""
    return merged32 / from_norms(m, n, lay) + minus_d


def view(g, t_axes, atoms, atom_sizes):
    """`g` (one axis per atom of W, in `atoms` order, size 1 on the normed atoms) in a consumed value's axes:
    `t_axes[i]` are the atoms of the value's axis i. Each axis gets size 1 (g constant along it) or its full size;
    None where an axis merges normed atoms with others (g then varies inside it: no broadcastable form)."""
    g = jnp.transpose(g, [atoms.index(t) for ax in t_axes for t in ax])
    flat, k = [], 0
    for ax in t_axes:
        size = math.prod(g.shape[k : k + len(ax)])
        k += len(ax)
        if size not in (1, math.prod(atom_sizes[t] for t in ax)):
            return None
        flat.append(size)
    return g.reshape(flat)


def place(gv, out_pos, ndim: int):
    """`gv` (a `view`) laid out for a consumer's output of rank `ndim`: the value's axis i sits at output axis
    `out_pos[i]`, or leaves the output (None: contracted, indexed), where gv must be constant. None where it is not
    (g on an input axis: the consumer falls back)."""
    if any(gv.shape[i] != 1 for i, p in enumerate(out_pos) if p is None):
        return None
    kept = [i for i, p in enumerate(out_pos) if p is not None]
    g = gv.reshape([gv.shape[i] for i in kept])
    shape = [1] * ndim
    for i in kept:
        shape[out_pos[i]] = gv.shape[i]
    return jnp.transpose(g, sorted(range(len(kept)), key=lambda k: out_pos[kept[k]])).reshape(shape)

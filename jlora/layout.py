"""Adapter layout: how `lora_a` and `lora_b` sit against a weight's axes, and the update `delta` they define.

A weight W has leading axes P stacked by `scan` (or batch dims of an einsum), the axes A that `lora_a` covers
and the rest B, A and B each in W's order: `lora_a` has shape `P + A + (r,)`, `lora_b` `P + (r,) + B`, and
`delta = scale * tensordot(lora_a, lora_b)` (batched over P) with its axes put back in W's order, so the update
has rank <= r as a map from A to B. A is usually leading (a 2-D kernel (in, out): lora_a (in, r), lora_b (r, out);
an embedding (vocab, dim): lora_a (vocab, r), lora_b (r, dim)), but it is whichever axes the model contracts: a
Gemma-style einsum `BTD,NDH->BTNH` on W (N, D, H) gets lora_a (D, r), lora_b (r, N, H), as `gemma.peft` does.

The layout is read back from the three shapes alone: `len(P) = a.ndim + b.ndim - W.ndim - 2`, and A is the
leading run of W's remaining axes when the shapes fit it, else the one set of axes whose sizes fit (`read_layout`;
`lora.init` never makes a layout that reads back otherwise).

A fused projection (loralib MergedLinear) with an enable mask of n slices, e enabled, on a W of shape
`P + A + (n * d,)` has lora_a `P + A + (e * r,)` and lora_b `P + (r, e * d)`: enabled slice j (the k-th enabled)
gets the pair `lora_a[..., k*r:(k+1)*r]`, `lora_b[..., k*d:(k+1)*d]`, disabled slices no update.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of one adapter: W's shape split into P, A and B, the rank, and an optional fused mask.

    `a_axes` lists the axes of W that lora_a covers (ascending, after the prefix); None means the leading `n_a`
    axes after the prefix, the usual case, to which an explicit leading `a_axes` is normalised."""

    shape: tuple[int, ...]  # W's shape
    n_prefix: int  # len(P)
    n_a: int  # len(A)
    rank: int
    fused: tuple[bool, ...] | None = None
    a_axes: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.a_axes is not None:
            axes = tuple(sorted(self.a_axes))
            leading = axes == tuple(range(self.n_prefix, self.n_prefix + len(axes)))
            object.__setattr__(self, "a_axes", None if leading else axes)
            object.__setattr__(self, "n_a", len(axes))

    @property
    def a_idx(self) -> tuple[int, ...]:
        """The axes of W that lora_a covers, ascending."""
        return self.a_axes if self.a_axes is not None else tuple(range(self.n_prefix, self.n_prefix + self.n_a))

    @property
    def b_idx(self) -> tuple[int, ...]:
        """The axes of W that lora_b covers, ascending."""
        return tuple(k for k in range(self.n_prefix, len(self.shape)) if k not in self.a_idx)

    @property
    def n_b(self) -> int:
        return len(self.shape) - self.n_prefix - self.n_a

    @property
    def a_shape(self) -> tuple[int, ...]:
        k = sum(self.fused) if self.fused else 1
        return self.shape[: self.n_prefix] + tuple(self.shape[i] for i in self.a_idx) + (k * self.rank,)

    @property
    def b_shape(self) -> tuple[int, ...]:
        tail = tuple(self.shape[i] for i in self.b_idx)
        if self.fused:
            tail = (tail[0] // len(self.fused) * sum(self.fused),)
        return self.shape[: self.n_prefix] + (self.rank,) + tail

    def check(self, path: str):
        if self.n_a < 1 or self.n_b < 1:
            raise ValueError(f"{path}: weight of shape {self.shape} leaves no axes for one LoRA factor")
        if self.fused:
            n = len(self.fused)
            if self.n_b != 1 or self.a_axes is not None or self.shape[-1] % n:
                raise ValueError(
                    f"{path}: fused mask {self.fused} needs one output axis divisible by {n}, but W has shape "
                    f"{self.shape} with output axes {tuple(self.shape[i] for i in self.b_idx)}"
                )


def fitting_a_axes(w_shape, a_shape, b_shape, n_prefix: int) -> list[tuple[int, ...]]:
    """Every set of W's axes (after the prefix, ascending) that lora_a can cover given the three shapes."""
    rest = range(n_prefix, len(w_shape))
    n_a = len(a_shape) - 1 - n_prefix
    if n_a < 1 or n_a >= len(rest):
        return []
    return [axes for axes in itertools.combinations(rest, n_a)
            if tuple(w_shape[i] for i in axes) == tuple(a_shape[n_prefix:-1])
            and tuple(w_shape[i] for i in rest if i not in axes) == tuple(b_shape[n_prefix + 1:])]


def read_layout(path: str, w_shape, a_shape, b_shape, fused=None) -> Layout:
    """Recovers the layout from the shapes of W, lora_a and lora_b; a ValueError names the mismatch.

    A is the leading run of W's axes after the prefix when it fits; otherwise the single set of axes that fits
    (several that fit, with the leading one not among them, is an error: the shapes do not say which)."""
    w_shape, a_shape, b_shape = tuple(w_shape), tuple(a_shape), tuple(b_shape)
    n_prefix = len(a_shape) + len(b_shape) - len(w_shape) - 2
    n_a = len(a_shape) - 1 - n_prefix
    rank = b_shape[n_prefix] if 0 <= n_prefix < len(b_shape) else -1
    layout = Layout(w_shape, n_prefix, n_a, rank, fused)
    fits = n_prefix >= 0 and n_a >= 1 and layout.n_b >= 1 and rank >= 1
    if fits and not fused and (layout.a_shape, layout.b_shape) != (a_shape, b_shape):
        options = fitting_a_axes(w_shape, a_shape, b_shape, n_prefix)
        if len(options) > 1:
            raise ValueError(f"{path}: adapter shapes lora_a {a_shape} and lora_b {b_shape} fit the weight {w_shape} "
                             f"with lora_a on axes {options[0]} or {options[1]}: the shapes do not say which")
        if options:
            layout = Layout(w_shape, n_prefix, n_a, rank, fused, a_axes=options[0])
    if not fits or (layout.a_shape, layout.b_shape) != (a_shape, b_shape):
        raise ValueError(
            f"{path}: adapter shapes lora_a {a_shape} and lora_b {b_shape} do not fit the weight {w_shape}"
            + (f" with fused mask {fused}" if fused else "")
            + "; expected lora_a = P + A + (r,) and lora_b = P + (r,) + B, W's axes split into P, A, B. The adapters "
            "were made for another model or config: re-run lora.init on this model"
        )
    return layout


def fused_b(b, layout: Layout):
    """Expands a fused lora_b `P + (r, e*d)` into a block-structured `P + (e*r, n*d)` (zeros off the blocks)."""
    if not layout.fused:
        return b
    r, n = layout.rank, len(layout.fused)
    d = layout.shape[-1] // n
    prefix = b.shape[: layout.n_prefix]
    rows, k = [], 0
    for enabled in layout.fused:
        if enabled:
            blocks = [jnp.zeros(prefix + (r, d), b.dtype)] * n
            j = [i for i, e in enumerate(layout.fused) if e][k]
            blocks = blocks[:j] + [b[..., k * d : (k + 1) * d]] + blocks[j + 1 :]
            rows.append(jnp.concatenate(blocks, axis=-1))
            k += 1
    return jnp.concatenate(rows, axis=-2)


def delta(a, b, layout: Layout, scale: float, *, dtype=jnp.float32):
    """`scale * a @ b` shaped like W, computed in float32 at HIGHEST precision, cast to `dtype`."""
    b = fused_b(b, layout)
    p = layout.n_prefix
    a32 = a.astype(jnp.float32).reshape(a.shape[:p] + (-1, a.shape[-1]))
    b32 = b.astype(jnp.float32).reshape(b.shape[: p + 1] + (-1,))
    d = jnp.matmul(a32, b32, precision=lax.Precision.HIGHEST) * scale
    order = tuple(range(p)) + layout.a_idx + layout.b_idx  # d's axes as W's axes
    d = d.reshape(tuple(layout.shape[i] for i in order))
    return jnp.transpose(d, [order.index(i) for i in range(len(order))]).astype(dtype)


def init_factors(key, layout: Layout, *, kind: str, input_side: str, init: str, dtype):
    """Initial `(lora_a, lora_b)` following loralib.

    kind='dense' (and conv): the input-side factor ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform(a=sqrt(5))),
    or N(0, 1/r^2) with init='gaussian'; the output side zeros. kind='embed': the looked-up side zeros, the other
    N(0, 1). With stacked (scan) prefixes every layer is drawn from its own key.
    """
    sides = {"a": layout.a_shape, "b": layout.b_shape}
    other = "b" if input_side == "a" else "a"
    n_p = layout.n_prefix
    if kind == "embed":
        zero_side, rand_side = input_side, other
    else:
        zero_side, rand_side = other, input_side
    rand_shape = sides[rand_side]
    body = rand_shape[n_p:]
    fan_in = math.prod(layout.shape[i] for i in (layout.a_idx if input_side == "a" else layout.b_idx))
    if kind == "embed":
        def draw(k):
            return jax.random.normal(k, body, dtype)
    elif init == "gaussian":
        def draw(k):
            return jax.random.normal(k, body, dtype) / layout.rank
    else:
        bound = 1.0 / math.sqrt(fan_in)

        def draw(k):
            return jax.random.uniform(k, body, dtype, -bound, bound)

    prefix = rand_shape[:n_p]
    keys = jax.random.split(key, math.prod(prefix)) if prefix else key
    rand = jax.vmap(draw)(keys).reshape(rand_shape) if prefix else draw(keys)
    out = {rand_side: rand, zero_side: jnp.zeros(sides[zero_side], dtype)}
    return out["a"], out["b"]

"""The adapted matmul on matrices, `x @ W + scale * (xd @ A) @ B`, with a derivative rule that keeps training lean.

Evaluated plainly (inference), it is two products and an add, which XLA fuses into whatever consumes the result.
Differentiated, that fusion costs memory: XLA recomputes the sum inside both the forward consumer (a GELU, say) and
the backward one, so it keeps *both* addends alive for the backward pass instead of the one sum (measured on
GPT-2 small, batch 8: 36 saved (1024, 3072) buffers where full fine-tuning keeps 12). So the JVP rule forms the
primal output as ONE product, `[x, scale * xd @ A] @ [W; B]`, whose result is a single buffer like a plain
layer's, and gives the tangent in factored form (no dW unless W itself is perturbed). Copying W into `[W; B]` costs
a pass over W, worth it only when the activations are at least as large: the rule uses it when rows >= in and the
dtypes agree, and the plain sum otherwise. `jax.jvp`, `jax.grad`, `jax.vmap` and `jax.checkpoint` all apply.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


def _dot(x, y, precision, preferred):
    return lax.dot(x, y, precision=precision, preferred_element_type=preferred)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7))
def adapted_matmul(x, xd, w, a, b, scale: float, precision=None, preferred=None):
    """`x @ w + scale * (xd @ a) @ b`: x, xd shape=(rows, in) (xd is x after LoRA dropout, or x itself),
    w shape=(in, out), a shape=(in, r), b shape=(r, out) -> shape=(rows, out) in the dtype of `x @ w`.
    `scale`, `precision` and `preferred` (element type) are static."""
    base = _dot(x, w, precision, preferred)
    low = _dot(_dot(xd, a, precision, preferred) * jnp.asarray(scale, base.dtype), b, precision, preferred)
    return base + low.astype(base.dtype)


def _one_product(x, w, b) -> bool:
    """Whether the primal of a differentiated call is formed as one product (see the module docstring)."""
    return x.shape[0] >= x.shape[1] and x.dtype == w.dtype == b.dtype


@adapted_matmul.defjvp
def _adapted_matmul_jvp(scale, precision, preferred, primals, tangents):
    x, xd, w, a, b = primals
    tx, txd, tw, ta, tb = (None if isinstance(t, SymbolicZero) else t for t in tangents)
    tmp = _dot(xd, a, precision, preferred)  # shape=(rows, r)
    u = tmp * jnp.asarray(scale, tmp.dtype)
    if _one_product(x, w, b):
        out = _dot(jnp.concatenate([x, u.astype(x.dtype)], 1), jnp.concatenate([w, b], 0), precision, preferred)
    else:
        base = _dot(x, w, precision, preferred)
        out = base + _dot(u, b, precision, preferred).astype(base.dtype)
    terms = []
    if tx is not None:
        terms.append(_dot(tx, w, precision, preferred))
    if tw is not None:
        terms.append(_dot(x, tw, precision, preferred))
    t_low = []  # the two low-rank tangents share the one product with b
    if txd is not None:
        t_low.append(_dot(txd, a, precision, preferred))
    if ta is not None:
        t_low.append(_dot(xd, ta, precision, preferred))
    if t_low:
        t_sum = sum(t_low[1:], t_low[0])
        terms.append(_dot(t_sum * jnp.asarray(scale, t_sum.dtype), b, precision, preferred))
    if tb is not None:
        terms.append(_dot(u, tb, precision, preferred))
    if not terms:
        return out, jnp.zeros_like(out)
    return out, sum((t.astype(out.dtype) for t in terms[1:]), terms[0].astype(out.dtype))

"""The arithmetic of combining adapters, as PEFT's `peft.utils.merge_utils` and `LoraModel.add_weighted_adapter` do it,
on JAX arrays. `jlora.combination.combine_adapters` validates the inputs and calls these per target.

A task tensor is one adapter's factor (lora_a or lora_b) or its full update (the *_svd methods); the K task tensors
of a target all have one shape. Every function here is pure and jit-safe: `density`, `rank` and `clamp` are static
Python numbers, the weights may be traced.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def magnitude_prune(t, density: float):
    """`t` with all but its `int(density * t.size)` largest-magnitude entries zeroed (PEFT's
    `magnitude_based_pruning`); unchanged at density >= 1."""
    if density >= 1:
        return t
    k = int(density * t.size)
    flat = t.reshape(-1)
    _, idx = lax.top_k(jnp.abs(flat), k)
    keep = jnp.zeros(flat.shape, t.dtype).at[idx].set(1)
    return t * keep.reshape(t.shape)


def dare_masks(key, indices, shapes, density: float) -> list:
    """DARE's keep masks for the tensors of `shapes` (one adapter's lora_a and lora_b, or its update), one row per
    adapter: `flat = bernoulli(fold_in(key, indices[j]), density, (n,))`, n the sizes' sum, cut in order into the
    shapes. Returns a (len(indices),) + shape bool array per shape; one vmapped draw (one random-number generator
    to compile, whatever the number of adapters and tensors)."""
    sizes = [math.prod(shape) for shape in shapes]
    flat = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), density, (sum(sizes),)))(indices)
    cuts = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
    return [flat[:, lo:hi].reshape((-1, *shape)) for lo, hi, shape in zip(cuts, cuts[1:], shapes)]


def random_prune(t, density: float, keep):
    """DARE's drop and rescale: `t` where `keep` (a Bernoulli(density) mask, `dare_masks`), divided by `density`
    so the expectation is `t` (PEFT's `random_pruning(rescale=True)`); unchanged at density >= 1."""
    if density >= 1:
        return t
    return t * keep.astype(t.dtype) / density


def majority_sign_mask(stacked, method: str):
    """TIES' sign election over axis 0 of `stacked` (K, ...): True where an entry's sign is the elected one, the
    sign of the sum of the entries ('total') or of their signs ('frequency'), ties to +."""
    sign = jnp.sign(stacked)
    magnitude = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == jnp.where(magnitude >= 0, 1, -1).astype(stacked.dtype)


def merge_tensors(method: str, tensors, weights, *, density=None, majority_sign_method="total", masks=None):
    """PEFT's task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune on a list of K same-shaped tensors.

    `method` is one of 'linear', 'ties', 'dare_linear', 'dare_ties', 'magnitude_prune' (the *_svd methods' first
    stage); `weights` a (K,) array; `masks` the K keep masks of the DARE methods. Each tensor is pruned (magnitude for
    ties / magnitude_prune, random with rescaling for dare_*), then weighted and summed; ties and dare_ties keep only
    entries of the elected sign (elected before weighting) and divide by how many were kept (at least 1)."""
    if method in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties") and density < 1:
        tensors = [random_prune(t, density, m) for t, m in zip(tensors, masks)]
    stacked = jnp.stack(tensors)
    weighted = stacked * weights.astype(stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
    if method in ("ties", "dare_ties"):
        mask = majority_sign_mask(stacked, majority_sign_method)
        return (weighted * mask).sum(0) / jnp.maximum(mask.sum(0), 1).astype(stacked.dtype)
    return weighted.sum(0)


def factor_weights(weights, scales):
    """PEFT's per-factor weights for the methods that combine factors: with ws = weight * scale, lora_A gets
    sign(ws) * sqrt(|ws|) (sign +1 at 0) and lora_B sqrt(|ws|), so each product a @ b is weighted by ws."""
    ws = weights * scales
    root = jnp.sqrt(jnp.abs(ws))
    return root * jnp.where(ws >= 0, 1, -1).astype(root.dtype), root


def truncated_svd(update, rank: int, *, clamp=None, full_matrices: bool = True):
    """`(us, vh)`, `us @ vh` the best rank-`rank` approximation of `update` (m, n): its SVD U S Vh truncated, `us`
    = U S (m, rank), `vh` = Vh (rank, n), as PEFT splits it. With `clamp` (a quantile in (0, 1]),
    every entry of both is clipped to [-q, q], q the `clamp` quantile (linear interpolation) of all their entries
    (PEFT's svd_clamp, after kohya-ss' svd_merge_lora).

    Singular vectors are defined up to sign, and LAPACK builds choose differently (torch's and JAX's do); the
    product does not care, the clamp does. So each pair (u_i, v_i) is flipped to make the largest-magnitude entry
    of u_i positive (scikit-learn's `svd_flip`): the result is the same on every backend, and equals PEFT's when
    PEFT's SVD is given the same signs."""
    u, s, vh = jnp.linalg.svd(update, full_matrices=full_matrices)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank, :]
    sign = jnp.sign(u[jnp.argmax(jnp.abs(u), axis=0), jnp.arange(u.shape[1])])
    sign = jnp.where(sign == 0, 1, sign).astype(u.dtype)
    us, vh = u * (sign * s), vh * sign[:, None]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([us.reshape(-1), vh.reshape(-1)]), clamp)
        us, vh = jnp.clip(us, -hi, hi), jnp.clip(vh, -hi, hi)
    return us, vh

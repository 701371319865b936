"""Initialisations that rewrite the base: PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024), PEFT's
`init_lora_weights="pissa"` / `"pissa_niter_K"` / `"olora"`.

Each targeted weight W is seen as a matrix M (batched over the scan prefix P): rows the axes `lora_a` covers (A,
`m = prod A`), columns the rest (B, `n = prod B`); for a 2-D Dense kernel M = W (in, out), PEFT's `weight.T`.

- PiSSA: `M = U S Vh`; `lora_a = U_r sqrt(S_r / s)` (m, r), `lora_b = sqrt(S_r / s) Vh_r` (r, n), the r principal
  singular directions, so `s * lora_a @ lora_b` is the best rank-r approximation of M. `pissa_niter_K` finds them by
  randomized SVD (Halko et al., torch's `svd_lowrank(M, q=r, niter=K)`): K subspace iterations from a Gaussian
  sketch drawn from the init key.
- OLoRA: `M^T = Q R` (QR of PEFT's weight (out, in)); `lora_b = Q_r^T` (r, n) orthonormal rows, `lora_a = R_r^T`
  (m, r), not divided by the scale (PEFT's).

The frozen weight becomes the residual `W - s * lora_a @ lora_b` (computed in float32, cast to W's dtype), so the
model's output is unchanged at step 0; `lora.init` returns it in `frozen`. A fused projection gets one factorisation
per enabled slice. Training then adapts the principal (PiSSA) or leading (OLoRA) subspace of W.

`convert_to_plain_lora` (jlora.variants.convert) turns the trained pair into a plain LoRA of rank 2r on the
original W, PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=)`.
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from jlora import layout as layout_mod
from jlora.paths import path_str
from jlora.qarray import is_quantized

REWRITING = ("pissa", "olora")  # and pissa_niter_<K>
_NITER = re.compile(r"pissa_niter_(\d+)")


def rewrites_base(init: str) -> bool:
    """True for an init that rewrites the frozen weight to a residual: 'pissa', 'pissa_niter_<K>', 'olora'."""
    return isinstance(init, str) and (init in REWRITING or _NITER.fullmatch(init) is not None)


def niter(init: str) -> int | None:
    """K of 'pissa_niter_K'; None for the exact 'pissa' and for 'olora'."""
    m = _NITER.fullmatch(init)
    return None if m is None else int(m[1])


def _matrix(w32, lay: layout_mod.Layout):
    """W as `P + (m, n)`: its A axes as rows, B axes as columns."""
    p = lay.n_prefix
    order = tuple(range(p)) + lay.a_idx + lay.b_idx
    m = math.prod(lay.shape[i] for i in lay.a_idx)
    return jnp.transpose(w32, order).reshape(lay.shape[:p] + (m, -1))


def _mm(x, y):
    return jnp.matmul(x, y, precision=lax.Precision.HIGHEST)


def _qr(x):
    return jnp.linalg.qr(x, mode="reduced")[0]


def _randomized_svd(key, m, r: int, iters: int):
    """A randomized SVD as torch's `svd_lowrank(m, q=r, niter=iters)` computes it (Halko et al. 2011, no
    oversampling; the sketch drawn from `key`): `(U_r, S_r, Vh_r)`, batched over m's leading axes."""
    t = jnp.swapaxes
    sketch = jax.random.normal(key, m.shape[:-2] + (m.shape[-1], r), m.dtype)
    q = _qr(_mm(m, sketch))
    q = lax.fori_loop(0, iters, lambda _, q: _qr(_mm(m, _qr(_mm(t(m, -1, -2), q)))), q)
    u, s, vh = jnp.linalg.svd(_mm(t(q, -1, -2), m), full_matrices=False)
    return _mm(q, u), s, vh


def _pair(key, m, r: int, init: str, scale: float):
    """`(a (.., m, r), b (.., r, n))` of one matrix stack `m` (float32)."""
    if init == "olora":
        q, rr = jnp.linalg.qr(jnp.swapaxes(m, -1, -2), mode="reduced")  # M^T = Q R: PEFT's weight (out, in)
        return jnp.swapaxes(rr[..., :r, :], -1, -2), jnp.swapaxes(q[..., :, :r], -1, -2)
    iters = niter(init)
    if iters is None:
        u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    else:
        u, s, vh = _randomized_svd(key, m, r, iters)
    root = jnp.sqrt(s[..., :r] / scale)
    return u[..., :, :r] * root[..., None, :], root[..., :, None] * vh[..., :r, :]


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _rewrite(key, w, lay: layout_mod.Layout, init: str, scale: float, dtype):
    """`rewrite_init`'s arithmetic, one compiled program per weight shape and layout."""
    w32 = w.astype(jnp.float32)
    mat = _matrix(w32, lay)
    if lay.fused:
        d = mat.shape[-1] // len(lay.fused)
        blocks = [mat[..., j * d:(j + 1) * d] for j, on in enumerate(lay.fused) if on]
    else:
        blocks = [mat]
    keys = jax.random.split(key, len(blocks))
    pairs = [_pair(k, blk, lay.rank, init, scale) for k, blk in zip(keys, blocks)]
    a = jnp.concatenate([pa for pa, _ in pairs], axis=-1).reshape(lay.a_shape).astype(dtype)
    b = jnp.concatenate([pb for _, pb in pairs], axis=-1).reshape(lay.b_shape).astype(dtype)
    return a, b, (w32 - layout_mod.delta(a, b, lay, scale)).astype(w.dtype)


def rewrite_init(key, w, lay: layout_mod.Layout, *, init: str, scale: float, dtype, path: str):
    """`(lora_a, lora_b, residual)` for the weight `w` at `path` by `init` ('pissa', 'pissa_niter_K', 'olora'):
    lora_a `lay.a_shape` and lora_b `lay.b_shape` in `dtype`, residual `w - scale * lora_a @ lora_b` of w's shape
    and dtype (see the module docstring). `key` draws the randomized SVD's sketch (pissa_niter_K only).

    Raises ValueError for a quantized `w` (the residual would need re-quantizing; dequantize the base, init, then
    quantize the residual) and for a rank above min(m, n), where W has no r directions to take.
    """
    if is_quantized(w):
        raise ValueError(f"{path}: init={init!r} rewrites the base weight to the residual W - s*A*B, but this base is "
                         f"quantized ({w.qtype}); initialise on the float weights (jlora.dequantize), then quantize "
                         f"the frozen tree lora.init returns (jlora.quantize(frozen, ...)), PEFT's recommended order "
                         f"for a quantized PiSSA")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{path}: init={init!r} needs a floating weight, got {w.dtype}")
    m = math.prod(w.shape[i] for i in lay.a_idx)
    n = math.prod(w.shape[i] for i in lay.b_idx) // (len(lay.fused) if lay.fused else 1)
    if lay.rank > min(m, n):
        per = " per fused slice" if lay.fused else ""
        raise ValueError(f"{path}: init={init!r} takes r = {lay.rank} directions of the weight {tuple(w.shape)} seen "
                         f"as a ({m}, {n}) matrix{per}, which has only {min(m, n)}: use rank <= {min(m, n)} there "
                         f"(rank_pattern), or init='loralib'")
    a, b, residual = _rewrite(key, jnp.asarray(w), lay, init, scale, jnp.dtype(dtype))
    if isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer):
        residual = jax.device_put(residual, w.sharding)  # where W was: sharded like it
    return a, b, residual


def with_residuals(frozen, residuals: dict):
    """`frozen` with the leaf at each '/'-joined path of `residuals` replaced by its residual array."""
    return jax.tree_util.tree_map_with_path(lambda p, x: residuals.get(path_str(p), x), frozen)


class RewrittenBaseWarning(UserWarning):
    """Adapters of an init that rewrote the base (PiSSA / OLoRA) loaded onto weights that could not be checked to be
    that rewritten base (the residual)."""


def rewritten_base_hint(config) -> str:
    """For a base-check error: how to load adapters whose init rewrote the base; '' for a plain init."""
    if not rewrites_base(config.init):
        return ""
    return (f"\nThese adapters were initialised with init={config.init!r}, which rewrote each targeted weight to the "
            f"residual W - s*A0*B0 (lora.init's frozen tree): load them with that residual base, not the original "
            f"weights, or convert them for the original weights with jlora.convert_to_plain_lora (keep the initial "
            f"adapters)")


def warn_unverified(config, where: str, paths: list[str]) -> None:
    """Warns (`RewrittenBaseWarning`) when adapters of a base-rewriting init load onto variables whose weights at
    `paths` could not be compared with the saved residual's content digest."""
    if paths and rewrites_base(config.init):
        warnings.warn(f"jlora: the adapters at {where} were initialised with init={config.init!r}, which rewrote the "
                      f"base to the residual W - s*A0*B0, but the weights at {paths[:4]}"
                      f"{f' and {len(paths) - 4} more' if len(paths) > 4 else ''} could not be checked to be that "
                      f"residual (saved without variables=, or check_weights=False): on the original weights the "
                      f"outputs are wrong. Load with the residual base (save with variables=frozen to have it checked)"
                      f", or convert with jlora.convert_to_plain_lora", RewrittenBaseWarning, stacklevel=4)

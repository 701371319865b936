"""`combine_adapters`: one adapter made of several, by the methods of PEFT's `LoraModel.add_weighted_adapter`.

    combined, config = jlora.combine_adapters([adapters1, adapters2], [0.7, 0.3], configs=[config1, config2],
                                              method="ties", density=0.5)
    y = jlora.lora_transform(fn, config).apply(frozen, combined, x)   # or jlora.merge(frozen, combined, config)

Methods, as PEFT computes them (ws_i = weights[i] * adapter i's scale at the target, alpha / r or alpha / sqrt(r)):
- 'linear', 'ties', 'dare_linear', 'dare_ties', 'magnitude_prune' combine the factors: lora_a of adapter i weighted
  by sign(ws_i) sqrt(|ws_i|), lora_b by sqrt(|ws_i|), then summed ('linear'), pruned to the largest `density` of
  each factor's entries ('magnitude_prune'), randomly dropped with rescaling by 1 / density ('dare_*'), and for the
  TIES ones summed only over entries of the elected sign, divided by their count. The product of sums is not the
  sum of products, so these are approximations even at density 1; all adapters need the same rank at a target.
- 'cat' concatenates the pairs along the rank axis (lora_a_i * ws_i): exact, rank = the sum of the ranks.
- 'svd' and 'ties_svd', 'dare_linear_svd', 'dare_ties_svd', 'magnitude_prune_svd' form each update
  scale_i * lora_a_i @ lora_b_i, combine the updates (weights[i]; 'svd' is their weighted sum), and keep the best
  rank-`svd_rank` factorisation (default: the largest rank of the adapters, as PEFT), optionally clamped at the
  `svd_clamp` quantile; exact for svd when svd_rank >= the rank of the sum.
The result carries the scales in its factors: its config has alpha = rank (scale 1, 'alpha_over_r' whatever the
inputs used), rank = the largest target rank (rank_pattern / alpha_pattern where a target's differs), targets = the
union of the adapters' targets (an adapter without a target contributes nothing there, as PEFT skips it), bias
'none', no modules_to_save, and configs[0]'s dropout, init and dtype.

Where jlora differs from PEFT: the combined scale is 1 also when configs[0] is rsLoRA (PEFT 0.21 inherits
use_rslora and scales the result by sqrt(r), huggingface/peft#3449); one adapter is combined by the method asked
(PEFT switches to 'linear', ignoring svd_rank and density); an svd rank above min(in, out) of a target is lowered
to min(in, out) there (exact: every singular value kept), where PEFT fails; options the method does not use are a
ValueError (PEFT ignores them); the singular vectors' signs are fixed (`truncated_svd`), so svd_clamp gives one
answer on every backend (PEFT's follows its LAPACK's arbitrary signs); the DARE masks come from `key`, not torch's
global RNG: adapter i's at a target is
`bernoulli(fold_in(fold_in(key, crc32(path)), i), density, (n,))` cut into lora_a's (the first lora_a.size entries)
and lora_b's (the rest), or reshaped to the update (out, in) for the *_svd methods, as in PEFT's orientation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import zlib

import jax
import jax.numpy as jnp
from jax import lax

from jlora.combination_math import dare_masks, factor_weights, merge_tensors, truncated_svd
from jlora.config import LoraConfig
from jlora.paths import MAGNITUDE, flatten_adapters, nest
from jlora.validate import check_pairs

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = FACTOR_METHODS + ("cat",) + SVD_METHODS


def _stage(method: str) -> str:
    """The task-arithmetic stage of a method: 'svd' -> 'linear', 'ties_svd' -> 'ties', a factor method itself."""
    return "linear" if method == "svd" else method.removesuffix("_svd")


def _check_options(method, svd_rank, svd_clamp, svd_full_matrices, density, majority_sign_method, key):
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (PEFT's combination_type), got {method!r}")
    stage, svd = _stage(method), method in SVD_METHODS
    unused = [f"{name}={value!r}" for name, value, default, used in (
        ("svd_rank", svd_rank, None, svd), ("svd_clamp", svd_clamp, None, svd),
        ("svd_full_matrices", svd_full_matrices, True, svd),
        ("density", density, None, stage != "linear" and method != "cat"),
        ("majority_sign_method", majority_sign_method, "total", stage in ("ties", "dare_ties")),
        ("key", key, None, stage.startswith("dare")))
        if not used and ((value is not None) if default is None else (value != default))]
    if unused:
        raise ValueError(f"method={method!r} does not use {', '.join(unused)}: drop it, or pick a method that "
                         f"uses it (svd_*: the *svd methods; density: ties, dare_*, magnitude_prune and their _svd "
                         f"forms; majority_sign_method: ties, dare_ties; key: dare_*)")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, numbers.Integral)
                                 or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive int (the combined adapter's rank) or None (the largest rank "
                         f"of the adapters), got {svd_rank!r}")
    for name, value in (("svd_clamp", svd_clamp), ("density", density)):
        ok = value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value <= 1)
        if not ok:
            raise ValueError(f"{name} must be a fraction in (0, 1] or None, got {value!r}"
                             + (" (density=1 keeps every entry)" if name == "density" else ""))
    if density is None and stage != "linear" and method != "cat":
        raise ValueError(f"method={method!r} prunes each task tensor to a fraction of its entries: pass density= "
                         f"in (0, 1], e.g. density=0.5 (1 keeps every entry)")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if stage.startswith("dare"):
        if key is None:
            raise TypeError(f"method={method!r} drops entries at random: pass key=jax.random.key(0) (keyword-only; "
                            f"the same key gives the same masks)")
        is_key = hasattr(key, "dtype") and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                            or (key.dtype == jnp.uint32 and tuple(key.shape) == (2,)))
        if not is_key:
            raise TypeError(f"key must be one JAX PRNG key (jax.random.key(0)), got {type(key).__name__} "
                            f"{getattr(key, 'shape', '')}")


def _check_lists(adapters, weights, configs):
    """`weights` as a (K,) float array after checking the three lists agree."""
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise TypeError(f"adapters must be a non-empty list of adapter trees (one per adapter, as lora.init returns "
                        f"them), got {type(adapters).__name__}; for one tree pass [adapters]")
    if not isinstance(configs, (list, tuple)) or len(configs) != len(adapters):
        got = f"{len(configs)} configs" if isinstance(configs, (list, tuple)) else type(configs).__name__
        raise ValueError(f"configs must be a list of {len(adapters)} jlora.LoraConfigs, one per adapter (the config "
                         f"each was trained with), got {got}")
    bad = [i for i, c in enumerate(configs) if not isinstance(c, LoraConfig)]
    if bad:
        raise TypeError(f"configs{bad} are not jlora.LoraConfigs: pass the config each adapter was made with")
    def number(x):
        return isinstance(x, numbers.Real) or (hasattr(x, "dtype") and getattr(x, "shape", None) == ())

    if isinstance(weights, (list, tuple)) and weights and all(number(x) for x in weights):
        w = jnp.stack([jnp.asarray(x) for x in weights])
    elif hasattr(weights, "dtype") and hasattr(weights, "shape"):
        w = jnp.asarray(weights)
    else:
        raise TypeError(f"weights must be {len(adapters)} real numbers, one per adapter, got {weights!r}")
    if w.shape != (len(adapters),) or not jnp.issubdtype(w.dtype, jnp.number) or jnp.iscomplexobj(w):
        raise ValueError(f"weights must be {len(adapters)} real numbers, one per adapter, got shape {w.shape} "
                         f"dtype {w.dtype}: {weights!r}")
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"weights must be finite, got {weights!r}")
    return w


def _gather(adapters, configs) -> dict[str, list[tuple[int, object, object]]]:
    """`{path: [(i, lora_a, lora_b), ...]}` over the adapters holding a pair at path, after the checks."""
    found: dict[str, list] = {}
    for i, (tree, config) in enumerate(zip(adapters, configs)):
        pairs, full = flatten_adapters(tree)
        if full:
            raise ValueError(f"adapters[{i}] holds leaves trained in full at {sorted(full)} (bias / modules_to_save), "
                             f"which have no weighted combination: fold them into the base first (jlora.combine"
                             f"(frozen, full_leaves)) and pass only the lora pairs")
        if not pairs:
            raise ValueError(f"adapters[{i}] holds no lora_a / lora_b pair: pass the tree lora.init returned")
        try:
            check_pairs(tree, config)
        except ValueError as e:
            raise ValueError(f"adapters[{i}] does not match configs[{i}]: {e}") from None
        for path, pair in sorted(pairs.items()):
            a, b = pair["lora_a"], pair["lora_b"]
            if MAGNITUDE in pair:
                raise ValueError(f"adapters[{i}] at {path} is a DoRA adapter (config.dora): its magnitude rescales "
                                 f"the whole weight, so it has no weighted combination with other adapters; merge "
                                 f"it (jlora.merge) or combine plain LoRA adapters")
            if config.fused_for(path) or b.ndim != 2:
                raise ValueError(f"adapters[{i}] at {path}: lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} is "
                                 f"a {'fused' if config.fused_for(path) else 'stacked or einsum'} layout, which "
                                 f"combine_adapters does not support: it takes the layouts PEFT has (lora_b of "
                                 f"shape (r, out): Dense, conv and embedding adapters)")
            found.setdefault(path, []).append((i, a, b))
    for path, entries in found.items():
        shapes = {(tuple(a.shape[:-1]), tuple(b.shape[1:])) for _, a, b in entries}
        if len(shapes) > 1:
            listed = ", ".join(f"adapters[{i}] lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)}"
                               for i, a, b in entries)
            raise ValueError(f"the adapters at {path} are for weights of different shapes ({listed}): were they "
                             f"made for different models? Combine adapters of one base model")
    return found


def _peft_rank(configs) -> int:
    """PEFT's default svd rank: the largest of each config's rank and rank_pattern values."""
    return max(max([c.rank, *(r for _, r in c.rank_pattern)]) for c in configs)


def combine_adapters(adapters, weights, *, configs, method: str = "svd", svd_rank: int | None = None,
                     svd_clamp: float | None = None, svd_full_matrices: bool = True, density: float | None = None,
                     majority_sign_method: str = "total", key=None) -> tuple[dict, LoraConfig]:
    """`(combined, config)`: K adapters combined into one, by PEFT's `add_weighted_adapter` method `method`.

    Args:
      adapters: K adapter trees of one base model (`lora.init`'s nested dicts of {"lora_a", "lora_b"}: Dense
        kernels lora_a (in, r) / lora_b (r, out), conv lora_a (k..., in, r), embeddings (vocab, r) / (r, dim)).
      weights: K real numbers (or a (K,) array, which may be traced), one per adapter; negative subtracts.
      configs: the K `LoraConfig`s the adapters were made with (each pair's scale comes from its own).
      method: one of METHODS: 'svd' (PEFT's default), 'linear', 'cat', 'ties', 'dare_linear', 'dare_ties',
        'magnitude_prune', or 'ties_svd' / 'dare_linear_svd' / 'dare_ties_svd' / 'magnitude_prune_svd'.
      svd_rank: the rank the *svd methods keep (None: the largest rank of the adapters); at most min(in, out)
        per target. svd_clamp: a quantile in (0, 1] at which the SVD factors are clipped. svd_full_matrices:
        passed to `jnp.linalg.svd` (no effect on the result).
      density: the fraction in (0, 1] of entries ties / dare_* / magnitude_prune keep.
      majority_sign_method: 'total' (sign of the sum) or 'frequency' (of the count) for ties and dare_ties.
      key: a JAX PRNG key, required by the dare methods (keyword-only).

    Returns the combined tree (nested dicts of lora pairs, float32 or the inputs' promoted dtype) and its
    `LoraConfig` (scale 1: the weights and scales are in the factors), for `lora_transform(fn, config)`, `merge`,
    `save_adapters`, `save_peft`. Raises a ValueError / TypeError naming the bad argument, path or shapes and the fix.
    Jit-able over the adapter trees and the weights (the other arguments are static)."""
    _check_options(method, svd_rank, svd_clamp, svd_full_matrices, density, majority_sign_method, key)
    w = _check_lists(adapters, weights, configs)
    found = _gather(adapters, configs)
    stage = _stage(method)
    if method in FACTOR_METHODS:
        for path, entries in sorted(found.items()):
            if len({a.shape[-1] for _, a, _ in entries}) > 1:
                listed = ", ".join(f"adapters[{i}] rank {a.shape[-1]}" for i, a, _ in entries)
                raise ValueError(f"method={method!r} combines the factors entry by entry, so every adapter needs the "
                                 f"same rank at a target (as PEFT requires), but at {path}: {listed}; use "
                                 f"method='cat' (exact), 'svd' or {stage + '_svd'!r} (on the updates) instead")
    dtype = jnp.dtype(jnp.result_type(*(x for entries in found.values() for _, a, b in entries for x in (a, b))))
    static = dict(method=method, rank=svd_rank or _peft_rank(configs), clamp=svd_clamp,
                  full_matrices=bool(svd_full_matrices), density=density, sign=majority_sign_method, dtype=dtype)
    paths = sorted(found)
    keys = [None] * len(paths)
    if _stage(method).startswith("dare"):  # each target's key: fold_in(key, crc32(path)), all in one draw
        crc = jnp.asarray([zlib.crc32(p.encode()) for p in paths], jnp.uint32)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, crc)
    out = {}
    for path, target_key in zip(paths, keys):
        idx = [i for i, _, _ in found[path]]
        scales = jnp.asarray([configs[i].scale_for(path) for i in idx], jnp.float32)
        out[path] = _combine_target([(a, b) for _, a, b in found[path]], w, jnp.asarray(idx, jnp.uint32), scales,
                                    target_key, **static)
    return nest(out), _combined_config(configs[0], {path: pair["lora_a"].shape[-1] for path, pair in out.items()})


@functools.partial(jax.jit, static_argnames=("method", "rank", "clamp", "full_matrices", "density", "sign", "dtype"))
def _combine_target(pairs, w, idx, scales, key, *, method, rank, clamp, full_matrices, density, sign, dtype):
    """`{"lora_a", "lora_b"}` of one target from `pairs` [(lora_a, lora_b)] of the adapters `idx` present there,
    `scales` their scales; `w` all K weights, `key` the target's DARE key. Compiled once per signature: the
    targets of a model share a few shapes, so a few programs serve them all."""
    stage = _stage(method)
    cdt = jnp.result_type(dtype, jnp.float32)
    a_s = [a.astype(cdt) for a, _ in pairs]
    b_s = [b.astype(cdt) for _, b in pairs]
    wk, scales = w.astype(cdt)[idx], scales.astype(cdt)
    masks = [None, None]
    if stage.startswith("dare") and density < 1:
        shapes = ([a_s[0].shape, b_s[0].shape] if method in FACTOR_METHODS
                  else [(b_s[0].shape[-1], math.prod(a_s[0].shape[:-1]))])
        masks = dare_masks(key, idx, shapes, density)
    opts = dict(density=density, majority_sign_method=sign)
    if method == "cat":
        a = jnp.concatenate([x * ws for x, ws in zip(a_s, wk * scales)], axis=-1)
        b = jnp.concatenate(b_s, axis=0)
    elif method in FACTOR_METHODS:
        wa, wb = factor_weights(wk, scales)
        a = merge_tensors(stage, a_s, wa, masks=masks[0], **opts)
        b = merge_tensors(stage, b_s, wb, masks=masks[1], **opts)
    else:  # the updates, in PEFT's (out, in) orientation: lora_B = U S, lora_A = Vh
        updates = [(s * jnp.matmul(x.reshape(-1, x.shape[-1]), y, precision=lax.Precision.HIGHEST)).T
                   for s, x, y in zip(scales, a_s, b_s)]
        update = merge_tensors(stage, updates, wk, masks=masks[0], **opts)
        us, vh = truncated_svd(update, min(rank, *update.shape), clamp=clamp, full_matrices=full_matrices)
        a, b = vh.T.reshape(a_s[0].shape[:-1] + (vh.shape[0],)), us.T
    return {"lora_a": a.astype(dtype), "lora_b": b.astype(dtype)}


def _combined_config(first: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """configs[0] with the union of targets, alpha = rank at every target (scale 1), no full leaves."""
    top = max(ranks.values())
    pattern = {"^" + re.escape(p): r for p, r in ranks.items() if r != top}
    return dataclasses.replace(
        first, targets="|".join(re.escape(p) for p in sorted(ranks)), rank=top, alpha=float(top),
        scaling="alpha_over_r", rank_pattern=pattern, alpha_pattern={k: float(r) for k, r in pattern.items()},
        fused=(), bias="none", modules_to_save=())


__all__ = ["METHODS", "combine_adapters"]

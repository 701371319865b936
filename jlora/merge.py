"""`merge` and `unmerge`: pure functions between (frozen, adapters) and plain variables for inference."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.config import LoraConfig
from jlora.layout import delta, read_layout
from jlora.partition import combine
from jlora.paths import flatten_adapters, path_str
from jlora.qarray import is_quantized
from jlora.quant import requantize_like
from jlora.validate import check_adapters
from jlora.variants import dora


def _apply_deltas(variables, adapters, config: LoraConfig, sign: float, dtype=None, requantize=None, norms=None):
    """Each adapted weight + sign * its delta (DoRA: g * (W + delta), or with sign -1 W / g - delta, g from `norms`).
    A QuantizedArray leaf: dequantized (to `dtype`, default its own) first; with `requantize` (a dict it fills with
    {path: error report}) quantized again as it was."""
    pairs, _ = flatten_adapters(adapters)
    seen = set()

    def update(path, w):
        p = path_str(path)
        q = w if is_quantized(w) else None
        if q is not None:
            w = q.dequantize(dtype if requantize is None else jnp.float32)
        if p not in pairs:
            return q if requantize is not None and q is not None else w
        seen.add(p)
        a, b = pairs[p]["lora_a"], pairs[p]["lora_b"]
        lay = read_layout(p, w.shape, a.shape, b.shape, config.fused_for(p))
        d = delta(a, b, lay, sign * config.scale_for(p))
        m = pairs[p].get(dora.MAGNITUDE)
        if m is None:
            merged = (w.astype(jnp.float32) + d).astype(w.dtype)
        elif sign > 0:
            merged = dora.merge_weight(w.astype(jnp.float32), d, m, lay, dora.read_normed(p, lay, m.shape))
            merged = merged.astype(w.dtype)
        else:
            merged = dora.unmerge_weight(w.astype(jnp.float32), d, m, norms[p], lay).astype(w.dtype)
        if requantize is None or q is None:
            return merged
        out = requantize_like(q, merged)
        requantize[p] = {**_error_report(out.dequantize(jnp.float32) - merged, d), "qtype": out.qtype}
        return out

    out = jax.tree_util.tree_map_with_path(update, variables, is_leaf=is_quantized)
    missing = sorted(set(pairs) - seen)
    if missing:
        raise ValueError(f"adapters at {missing} have no parameter of that path in the variables")
    return out


def _error_report(err, d) -> dict[str, float]:
    """The quantization error requantizing added, relative to the delta it is to carry: max |err| / max |delta|
    and rms(err) / rms(delta), and the delta's own rms."""
    d_max, d_rms = jnp.max(jnp.abs(d)), jnp.sqrt(jnp.mean(jnp.square(d)))
    e_max, e_rms = jnp.max(jnp.abs(err)), jnp.sqrt(jnp.mean(jnp.square(err)))
    return {"max": float(e_max / d_max) if d_max > 0 else float("inf") if e_max > 0 else 0.0,
            "rms": float(e_rms / d_rms) if d_rms > 0 else float("inf") if e_rms > 0 else 0.0,
            "delta_rms": float(d_rms)}


def merge(frozen, adapters, config: LoraConfig, *, dtype=None):
    """Plain variables with every `W + scale * lora_a @ lora_b` folded in (float32, HIGHEST precision, cast back
    to W's dtype) and the leaves trained in full put back: `model.apply(merge(...), x)` equals `lora.apply`.
    The inputs are not modified. Raises a ValueError (`validate.check_adapters`) where the adapters do not match
    `config` and `frozen` (a pair of another rank or layout, a target with no pair, a missing leaf trained in full).

    On a quantized frozen tree (`jlora.quantize`, or a GGUF loaded with quantized=True) every `QuantizedArray` is
    dequantized, to `dtype` (e.g. jnp.bfloat16) or, by default, the dtype it was quantized from: a float tree.
    `merge_requantized` keeps the base quantized instead."""
    check_adapters(frozen, adapters, config)
    return _apply_deltas(combine(frozen, adapters), adapters, config, 1.0, dtype=dtype)


def merge_requantized(frozen, adapters, config: LoraConfig) -> tuple[object, dict[str, dict]]:
    """`(merged, report)`: as `merge`, but each adapted `QuantizedArray` is requantized as it was (same qtype,
    block size, double quantization; GGUF blocks in their ggml type), other quantized leaves kept as they are.
    Requantizing adds error on top of the base's own: `report[path]` gives it relative to the delta the weight
    had to carry, `{"max": max|err| / max|delta|, "rms": rms(err) / rms(delta), "delta_rms": rms(delta), "qtype":
    the qtype written}`, with err = dequantize(requantized) - (dequantize(base) + delta). GGUF K-quants (q4_k,
    q6_k, ...) are written in the nearest type the `gguf` package can encode (`jlora.quant_gguf.FALLBACK`). An
    rms ratio near or above 1 means the adapter's update is mostly lost to the base's quantization step: merge to
    a float tree (`merge`) then. Not jit-able (the report holds Python floats). Adapted leaves that are not
    quantized merge as in `merge`."""
    check_adapters(frozen, adapters, config)
    report: dict[str, dict] = {}
    merged = _apply_deltas(combine(frozen, adapters), adapters, config, 1.0, requantize=report)
    return merged, dict(sorted(report.items()))


def dora_norms(frozen, adapters, config: LoraConfig) -> dict:
    """`{path: ||W + scale * a @ b||}` for each DoRA pair: the column norms (float32, W's rank with size 1 on the
    normed axes) that `merge` divides by and that the merged weights no longer hold; `unmerge` of DoRA adapters
    needs them (`norms=`). Take them from the frozen tree before merging."""
    check_adapters(frozen, adapters, config)
    pairs, _ = flatten_adapters(adapters)
    leaves = dict(jax.tree_util.tree_flatten_with_path(combine(frozen, adapters), is_leaf=is_quantized)[0])
    leaves = {path_str(k): v for k, v in leaves.items()}
    out = {}
    for p, pair in sorted(pairs.items()):
        if dora.MAGNITUDE in pair:
            w = leaves[p].dequantize(jnp.float32) if is_quantized(leaves[p]) else leaves[p]
            a, b, m = pair["lora_a"], pair["lora_b"], pair[dora.MAGNITUDE]
            lay = read_layout(p, w.shape, a.shape, b.shape, config.fused_for(p))
            v = w.astype(jnp.float32) + delta(a, b, lay, config.scale_for(p))
            out[p] = dora.direct_norms(v, lay, dora.read_normed(p, lay, m.shape))
    return out


def unmerge(merged, adapters, config: LoraConfig, *, norms=None):
    """The inverse of `merge`: subtracts each update again and returns the frozen tree (the leaves trained in
    full set back to None), up to float rounding. The same checks as `merge`. DoRA adapters (config.dora) need
    `norms`, the `dora_norms(frozen, adapters, config)` taken before merging: merging W' = m * V / ||V|| keeps
    only the direction of V = W + scale * a @ b, not its norm, so W cannot be recovered without them."""
    check_adapters(merged, adapters, config)
    pairs, full = flatten_adapters(adapters)
    need = sorted(p for p, pair in pairs.items() if dora.MAGNITUDE in pair)
    missing = [p for p in need if not isinstance(norms, dict) or p not in norms]
    if missing:
        raise ValueError(f"unmerge of DoRA adapters needs norms= for {missing[:4]}: merging keeps only the direction "
                         f"of W + scale * a @ b, not its column norms; take them before merging with "
                         f"norms = jlora.dora_norms(frozen, adapters, config) and pass unmerge(..., norms=norms)")
    base = _apply_deltas(merged, adapters, config, -1.0, norms=norms)
    return jax.tree_util.tree_map_with_path(lambda p, x: None if path_str(p) in full else x, base)

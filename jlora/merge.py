"""`merge` and `unmerge`: pure functions between (frozen, adapters) and plain variables for inference."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.config import LoraConfig
from jlora.layout import delta, read_layout
from jlora.partition import combine
from jlora.paths import flatten_adapters, path_str
from jlora.validate import check_adapters


def _apply_deltas(variables, adapters, config: LoraConfig, sign: float):
    pairs, _ = flatten_adapters(adapters)
    seen = set()

    def update(path, w):
        p = path_str(path)
        if p not in pairs:
            return w
        seen.add(p)
        a, b = pairs[p]["lora_a"], pairs[p]["lora_b"]
        lay = read_layout(p, w.shape, a.shape, b.shape, config.fused_for(p))
        d = delta(a, b, lay, sign * config.scale_for(p))
        return (w.astype(jnp.float32) + d).astype(w.dtype)

    out = jax.tree_util.tree_map_with_path(update, variables)
    missing = sorted(set(pairs) - seen)
    if missing:
        raise ValueError(f"adapters at {missing} have no parameter of that path in the variables")
    return out


def merge(frozen, adapters, config: LoraConfig):
    """Plain variables with every `W + scale * lora_a @ lora_b` folded in (float32, HIGHEST precision, cast back
    to W's dtype) and the leaves trained in full put back: `model.apply(merge(...), x)` equals `lora.apply`.
    The inputs are not modified. Raises a ValueError (`validate.check_adapters`) where the adapters do not match
    `config` and `frozen` (a pair of another rank or layout, a target with no pair, a missing leaf trained in full)."""
    check_adapters(frozen, adapters, config)
    return _apply_deltas(combine(frozen, adapters), adapters, config, 1.0)


def unmerge(merged, adapters, config: LoraConfig):
    """The inverse of `merge`: subtracts each update again and returns the frozen tree (the leaves trained in
    full set back to None), up to float rounding. The same checks as `merge`."""
    check_adapters(merged, adapters, config)
    _, full = flatten_adapters(adapters)
    base = _apply_deltas(merged, adapters, config, -1.0)
    return jax.tree_util.tree_map_with_path(lambda p, x: None if path_str(p) in full else x, base)

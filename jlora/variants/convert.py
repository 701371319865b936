"""PiSSA / OLoRA adapters (trained on the residual base) -> a plain LoRA of rank 2r on the original base, PEFT's
`save_pretrained(..., path_initial_model_for_weight_conversion=)` (`LoraModel.subtract_mutated_init`).

With W = W_res + s A0 B0 (the init) and the trained pair A, B, the fine-tuned weight is
W_res + s A B = W + s (A B - A0 B0) = W + s [A | A0] [B ; -B0]: a LoRA of rank 2r with the same scale.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jlora import layout
from jlora.config import LoraConfig
from jlora.paths import flatten_adapters, named_leaves, nest
from jlora.variants.init import rewrites_base


def _rank_axis(path: str, a, b, rank: int, w_shape) -> int:
    """The axis of lora_b that holds the rank (the length of the scan prefix P)."""
    if w_shape is not None:
        return len(a.shape) + len(b.shape) - len(w_shape) - 2
    options = [p for p in range(min(a.ndim, b.ndim) - 1) if a.shape[:p] == b.shape[:p] and b.shape[p] == rank]
    if len(options) != 1:
        raise ValueError(f"{path}: the shapes lora_a {a.shape} / lora_b {b.shape} do not say which axis of lora_b "
                         f"holds the rank {rank} (a stacked prefix of that length); pass variables= (the frozen "
                         f"tree) so the weight's shape settles it")
    return options[0]


def doubled_alpha(alpha: float, rslora: bool) -> float:
    """The alpha that keeps the scale of a pair whose rank doubled: x2, or x sqrt(2) with rsLoRA."""
    return alpha * (math.sqrt(2) if rslora else 2)


def _doubled(config: LoraConfig) -> LoraConfig:
    """The config of rank 2r and the same scale per target: alpha doubled (`doubled_alpha`), init 'loralib'."""
    rslora = config.scaling == "rslora"
    return dataclasses.replace(config, rank=2 * config.rank, alpha=doubled_alpha(config.alpha, rslora),
                               init="loralib", rank_pattern={p: 2 * r for p, r in config.rank_pattern},
                               alpha_pattern={p: doubled_alpha(a, rslora) for p, a in config.alpha_pattern})


def convert_to_plain_lora(adapters, initial_adapters, config: LoraConfig, *, variables=None) -> tuple[dict, LoraConfig]:
    """`(adapters, config)` of a plain LoRA of rank 2r for the ORIGINAL base W, equal to PiSSA / OLoRA `adapters`
    trained on the residual W_res that `lora.init` returned (`config.init` 'pissa', 'pissa_niter_K' or 'olora').

        frozen, initial = lora.init(variables, x, key=key)     # frozen: W_res
        ... train adapters from initial ...
        plain, plain_config = jlora.convert_to_plain_lora(adapters, initial, lora.config)
        lora_transform(model.apply, plain_config).apply(variables, plain, x)   # == lora.apply(frozen, adapters, x)
        save_peft(out_dir, plain, plain_config, ...)                            # PEFT's converted file

    Each pair becomes lora_a' = [lora_a | lora_a0] (P + A + (2r,)) and lora_b' = [lora_b ; -lora_b0]
    (P + (2r,) + B), in the adapters' dtype (a fused projection: per enabled slice); leaves trained in full are taken
    from `adapters`. The config gets rank 2r, alpha x2 (x sqrt(2) with rsLoRA: the scale is unchanged), the
    rank / alpha patterns likewise, and init 'loralib' (the base is no longer rewritten).

    Args:
      adapters: the trained adapter tree.
      initial_adapters: the adapters exactly as `lora.init` returned them (save them before training).
      config: the PiSSA / OLoRA config both were made with.
      variables: optional, the frozen (or full) tree: reads the rank axis from the weights' shapes where a scan
        prefix makes the pair shapes ambiguous.

    Raises ValueError for a config whose init does not rewrite the base (nothing to convert), or initial adapters
    whose pairs or shapes differ from the adapters'.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jlora.LoraConfig, got {type(config).__name__}")
    if not rewrites_base(config.init):
        raise ValueError(f"config.init is {config.init!r}, which leaves the base as it is: these adapters already "
                         f"apply to the original weights; only 'pissa', 'pissa_niter_K' and 'olora' adapters need "
                         f"converting")
    pairs, full = flatten_adapters(adapters)
    initial, _ = flatten_adapters(initial_adapters)
    problems = [f"{p}: missing from initial_adapters" for p in sorted(set(pairs) - set(initial))]
    problems += [f"{p}: in initial_adapters only" for p in sorted(set(initial) - set(pairs))]
    problems += [f"{p}: {k} {tuple(pairs[p][k].shape)} trained, {tuple(initial[p][k].shape)} initial"
                 for p in sorted(set(pairs) & set(initial)) for k in ("lora_a", "lora_b")
                 if tuple(pairs[p][k].shape) != tuple(initial[p][k].shape)]
    if problems:
        raise ValueError("initial_adapters are not the init of these adapters (pass the tree lora.init returned, "
                         "saved before training):\n  " + "\n  ".join(problems))
    weights = dict(named_leaves(variables)) if variables is not None else {}
    out = dict(full)
    for path, pair in pairs.items():
        a, b = jnp.asarray(pair["lora_a"]), jnp.asarray(pair["lora_b"])
        a0 = jnp.asarray(initial[path]["lora_a"]).astype(a.dtype)
        b0 = jnp.asarray(initial[path]["lora_b"]).astype(b.dtype)
        r, mask = config.rank_for(path), config.fused_for(path)
        w = weights.get(path)
        p = _rank_axis(path, a, b, r, None if w is None else tuple(w.shape))
        if mask:  # per enabled slice k: [a_k | a0_k]
            e = sum(mask)
            split = a.shape[:-1] + (e, r)
            a2 = jnp.concatenate([a.reshape(split), a0.reshape(split)], axis=-1).reshape(a.shape[:-1] + (2 * e * r,))
        else:
            a2 = jnp.concatenate([a, a0], axis=-1)
        b2 = jnp.concatenate([b, -b0], axis=p)
        out[path] = {**pair, "lora_a": a2, "lora_b": b2}
    new = _doubled(config)
    for path in pairs:  # the doubled pair must read back as a layout of rank 2r (shape sanity)
        w = weights.get(path)
        if w is not None:
            layout.read_layout(path, w.shape, out[path]["lora_a"].shape, out[path]["lora_b"].shape,
                               new.fused_for(path))
    return nest(out), new

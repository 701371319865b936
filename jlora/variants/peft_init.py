"""PiSSA / OLoRA adapters in PEFT's files, unconverted (`init_lora_weights` "pissa" / "olora" in
`adapter_config.json`).

PEFT saves such an adapter with the trained factors A, B and the init's name, and `PeftModel.from_pretrained` runs
the init again on the ORIGINAL base it is given (rewriting W to W - s A0 B0 with its own SVD / QR) before loading A
and B. So the file means `W - s A0 B0 + s A B`, and:

- `load_peft` recomputes A0, B0 from the variables' W (jlora.variants.init: the exact SVD / the QR, the same
  product as PEFT's up to float rounding) and returns the plain rank-2r LoRA `[A | A0] [B ; -B0]` for W, as PEFT's
  `path_initial_model_for_weight_conversion` would (`pair_for_original_base`);
- `save_peft` writes the init's name for 'pissa' and 'olora' adapters on Dense kernels (`peft_init_value`), which
  PEFT loads onto the original base.

Refused, with the fix: 'pissa_niter_K' (PEFT redoes the randomized SVD with torch's RNG, so A0 B0 cannot be
rebuilt: convert first), and base rewrites PEFT does not make (embeddings, which PEFT initialises plainly even
under PiSSA; convolutions and fused projections, where PEFT's PiSSA / OLoRA raise; OLoRA on a fan_in_fan_out
Conv1D, which PEFT factorises untransposed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.config import LoraConfig
from jlora.layout import read_layout
from jlora.variants.init import niter, rewrite_init, rewrites_base

CONVERT = ("convert the adapters to a plain LoRA first: jlora.convert_to_plain_lora(adapters, initial_adapters, "
           "config) in jlora, or save_pretrained(..., path_initial_model_for_weight_conversion=...) in PEFT")


def peft_init_value(config: LoraConfig, pairs: dict, *, fan_in_fan_out: bool):
    """`init_lora_weights` for `save_peft`: True for a plain LoRA; 'pissa' / 'olora' where PEFT, loading the file
    onto the original base, rebuilds exactly the residual these adapters were trained on; else a ValueError."""
    if not rewrites_base(config.init):
        return True
    if getattr(config, "dora", False):
        raise ValueError(f"init={config.init!r} with dora=True: PEFT would re-initialise the DoRA magnitude on its "
                         f"rebuilt base; {CONVERT}")
    if niter(config.init) is not None:
        raise ValueError(f"these adapters were initialised with init={config.init!r}: PEFT would redo that randomized "
                         f"SVD with torch's RNG on load and rebuild another base; {CONVERT}")
    for path, pair in sorted(pairs.items()):
        a = pair["lora_a"]
        why = None
        if path.rsplit("/", 1)[-1] != "kernel" or a.ndim != 2:
            why = "PEFT rewrites only Linear / Conv1D weights (an embedding gets its plain init, a conv an error)"
        elif config.fused_for(path):
            why = "a fused projection has no PEFT equivalent that PEFT would re-initialise per slice"
        elif config.init == "olora" and fan_in_fan_out:
            why = "PEFT's OLoRA factorises a fan_in_fan_out (Conv1D) weight untransposed"
        if why:
            raise ValueError(f"{path}: init={config.init!r} adapters cannot be saved for PEFT unconverted: {why}; "
                             f"{CONVERT}")
    return config.init


def pair_for_original_base(path: str, w, a, b, *, init: str, scale: float, where: str) -> dict:
    """`{"lora_a": [a | a0] (in, 2r), "lora_b": [b ; -b0] (2r, out)}` for the original weight `w` (in, out):
    the plain LoRA equal to a PEFT PiSSA / OLoRA pair `a` (in, r), `b` (r, out) trained on W - scale * a0 @ b0,
    where a0, b0 are the init's factors of `w` (in a's dtype). `where` names the file in errors."""
    if niter(init) is not None:
        raise ValueError(f"{where}: init_lora_weights={init!r}: PEFT rebuilt the base with a randomized SVD drawn from "
                         f"torch's RNG, which cannot be reproduced here. Convert it in PEFT to a plain LoRA "
                         f"(save_pretrained(..., path_initial_model_for_weight_conversion=INIT), see PEFT's PiSSA "
                         f"example), or save it with init_lora_weights='pissa' (the exact SVD)")
    if w is None or isinstance(w, jax.ShapeDtypeStruct) or not hasattr(w, "dtype"):
        raise ValueError(f"{where}: init_lora_weights={init!r} adapters were trained on the base less its initial "
                         f"factors, which jlora recomputes from the base weight at {path}; the variables hold no "
                         f"values there ({type(w).__name__}): pass the concrete original base weights")
    if a.ndim != 2:
        raise ValueError(f"{where}: init_lora_weights={init!r} on {path} (lora_a {a.shape}): PEFT applies it only to "
                         f"Linear layers, so this file was not written by PEFT; convert it to a plain LoRA first")
    lay = read_layout(path, w.shape, a.shape, b.shape)
    a0, b0, _ = rewrite_init(jax.random.key(0), w, lay, init=init, scale=scale, dtype=a.dtype, path=path)
    return {"lora_a": jnp.concatenate([a, a0], axis=-1), "lora_b": jnp.concatenate([b, -b0.astype(b.dtype)], axis=0)}


def rebuilt_init(cfg: dict, file) -> str | None:
    """For `load_peft`: the init ('pissa', 'pissa_niter_K', 'olora') whose initial factors must be rebuilt from the
    base for the PEFT config `cfg` (read from `file`), or None for a plain LoRA. A ValueError where jlora cannot
    rebuild what PEFT did (DoRA on top, OLoRA on fan_in_fan_out Conv1D weights)."""
    init = cfg.get("init_lora_weights", True)
    name = init.lower() if isinstance(init, str) else None
    if name is None or not rewrites_base(name):
        return None
    if cfg.get("use_dora"):
        raise ValueError(f"{file}: init_lora_weights={init!r} with use_dora: jlora does not rebuild a DoRA magnitude "
                         f"on PEFT's residual base; {CONVERT}")
    if name == "olora" and cfg.get("fan_in_fan_out"):
        raise ValueError(f"{file}: init_lora_weights='olora' with fan_in_fan_out: PEFT factorises those Conv1D weights "
                         f"untransposed, which jlora does not reproduce; {CONVERT}")
    return name

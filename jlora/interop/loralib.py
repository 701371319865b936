"""microsoft/LoRA (`loralib`) state dicts <-> jlora adapters, e.g. the released GPT-2 E2E checkpoints.

    adapters, config = load_loralib("gpt2_md_lora_e2e.pt", variables, rank=4, alpha=32)  # torch needed for a path
    state = to_loralib(adapters, config)  # {key: np.ndarray}; model.load_state_dict(state, strict=False) in torch

Keys are the torch module names (`transformer.h.0.attn.c_attn`), which jlora's models mirror: flax
`params/<module with '/'>/kernel` (or `/embedding`). Layouts, loralib (torch) -> jlora:

- Linear `X.lora_A` (r, in), `X.lora_B` (out, r) -> lora_a = A^T (in, r), lora_b = B^T (r, out);
- MergedLinear (`enable_lora`, n slices, e enabled): `X.lora_A` (e*r, in), `X.lora_B` (e*d, r) with d = out / n ->
  lora_a = A^T (in, e*r), lora_b = B^T (r, e*d) and `config.fused = {X: enable_lora}`;
- Embedding `X.lora_A` (r, vocab), `X.lora_B` (dim, r) -> lora_a = A^T (vocab, r), lora_b = B^T (r, dim).

The scale is loralib's alpha / r. `fan_in_fan_out` (GPT-2's Conv1D) changes only how torch stores the base weight
W ((in, out) rather than (out, in)), never the factors; it is used to check an `X.weight` the dict may also hold.
loralib's ConvLoRA ((r*k, in*k) factors) has no jlora equivalent and raises. Biases trained in full
(`lora_state_dict(model, bias=...)`) are read with `bias='all'` / `'lora_only'`; with `bias='none'` every key that
is not a LoRA factor is ignored, so a whole-model state dict can be passed.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from jlora.config import LoraConfig
from jlora.interop.peft import all_leaves, lookup_leaf, module_name
from jlora.models.hf import default_key
from jlora.paths import flatten_adapters, nest, trains_in_full


def _numpy(t) -> np.ndarray:
    """A torch tensor or array-like -> numpy (torch bfloat16 -> float32, which numpy lacks)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def read_state_dict(state_dict_or_path) -> dict[str, np.ndarray]:
    """A loralib state dict from a `.pt` / `.bin` path (`torch.load(weights_only=True)`, so torch is needed for
    this path only) or a mapping of numpy / torch tensors, unwrapped from `{"model_state_dict": ...}` and from a
    DistributedDataParallel `module.` prefix."""
    sd = state_dict_or_path
    if isinstance(sd, (str, os.PathLike)):
        try:
            import torch
        except ImportError:
            raise ImportError(f"reading {sd} needs PyTorch (torch.load); pass the state dict as numpy arrays "
                              f"instead") from None
        sd = torch.load(sd, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and set(sd) == {"model_state_dict"}:
        sd = sd["model_state_dict"]
    if not isinstance(sd, dict):
        raise TypeError(f"expected a state dict (a mapping of name -> tensor), got {type(sd).__name__}")
    if sd and all(str(k).startswith("module.") for k in sd):  # saved from a DistributedDataParallel wrapper
        sd = {str(k).removeprefix("module."): v for k, v in sd.items()}
    return {str(k): _numpy(v) for k, v in sd.items()}


def load_loralib(state_dict_or_path, variables, *, rank: int, alpha: float,
                 enable_lora: tuple[bool, ...] = (True, False, True), fan_in_fan_out: bool = True,
                 bias: str = "none", dropout: float = 0.0) -> tuple[dict, LoraConfig]:
    """Reads loralib `lora_A` / `lora_B` factors into `(adapters, config)` for `variables` (full, frozen or
    abstract). A kernel whose lora_B has `out // len(enable_lora) * sum(enable_lora)` rows is a MergedLinear with
    that mask. ValueErrors name the key and both shapes, or the missing module with close candidates."""
    sd = read_state_dict(state_dict_or_path)
    leaves = all_leaves(variables)
    index = {default_key(p): (p, w) for p, w in leaves}
    modules = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith((".lora_A", ".lora_B"))})
    if not modules:
        raise ValueError(f"no '<module>.lora_A' / '<module>.lora_B' keys in the state dict (keys: {list(sd)[:20]})")
    flat, fused = {}, {}
    n, e = len(enable_lora), sum(enable_lora)
    for module in modules:
        ka, kb = f"{module}.lora_A", f"{module}.lora_B"
        if ka not in sd or kb not in sd:
            raise ValueError(f"{module}: the state dict has only one of {ka}, {kb}")
        A, B = sd[ka], sd[kb]
        path, w = lookup_leaf(index, f"{module}.weight", "the adapter")
        leaf = path.rsplit("/", 1)[-1]
        if leaf not in ("kernel", "embedding") or A.ndim != 2 or B.ndim != 2 or w is None or w.ndim != 2:
            raise ValueError(f"{ka} {A.shape} / {kb} {B.shape} on {path} {getattr(w, 'shape', None)}: only loralib "
                             f"Linear, MergedLinear and Embedding on a weight in the variables have a jlora "
                             f"equivalent (ConvLoRA does not)")
        out = w.shape[1]
        merged = leaf == "kernel" and out % n == 0 and B.shape[0] == out // n * e != out
        want_a, want_b = ((rank * e if merged else rank), w.shape[0]), (B.shape[0] if merged else out, rank)
        for key, t, want in ((ka, A, want_a), (kb, B, want_b)):
            if t.shape != want:
                raise ValueError(f"{key} has shape {t.shape}, but rank={rank} on {path} of shape {tuple(w.shape)} "
                                 f"needs {want}")
        if f"{module}.weight" in sd:
            stored = sd[f"{module}.weight"].shape
            if stored != (tuple(w.shape) if fan_in_fan_out or leaf == "embedding" else tuple(w.shape)[::-1]):
                raise ValueError(f"{module}.weight has shape {stored}, the variables' {path} {tuple(w.shape)} "
                                 f"(fan_in_fan_out={fan_in_fan_out})")
        flat[path] = {"lora_a": jnp.asarray(A.T), "lora_b": jnp.asarray(B.T)}
        if merged:
            fused[path] = tuple(bool(x) for x in enable_lora)
    config = LoraConfig(rank=rank, alpha=alpha, targets=tuple(flat), bias=bias, dropout=dropout,
                        fused=fused).with_targets(flat)
    if bias != "none":
        lora_modules = {p.rpartition("/")[0] for p in flat}
        for path, w in leaves:
            if trains_in_full(path, config, lora_modules):
                key = default_key(path)
                if key not in sd:
                    raise ValueError(f"bias={bias!r} needs {key} (for {path}), which the state dict lacks")
                flat[path] = jnp.asarray(sd[key], w.dtype if w is not None else None)
    return nest(flat), config


def to_loralib(adapters, config: LoraConfig) -> dict[str, np.ndarray]:
    """loralib keys for jlora adapters: `X.lora_A` = lora_a^T, `X.lora_B` = lora_b^T (Linear, MergedLinear with
    `config.fused`, Embedding) and `X.bias` for biases trained in full. Other layouts and modules_to_save leaves
    have no loralib equivalent and raise (save those with `save_peft`)."""
    pairs, full = flatten_adapters(adapters)
    out = {}
    for path, pair in sorted(pairs.items()):
        a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
        if a.ndim != 2 or b.ndim != 2 or path.rsplit("/", 1)[-1] not in ("kernel", "embedding"):
            raise ValueError(f"{path}: lora_a {a.shape} / lora_b {b.shape} has no loralib equivalent (Linear, "
                             f"MergedLinear and Embedding only)")
        module = module_name(path)
        out[f"{module}.lora_A"], out[f"{module}.lora_B"] = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    for path, x in sorted(full.items()):
        if path.rsplit("/", 1)[-1] != "bias":
            raise ValueError(f"{path}: loralib saves LoRA factors and biases only; this leaf trained in full "
                             f"(modules_to_save) has no loralib key")
        out[default_key(path)] = np.asarray(x)
    return out


def save_loralib(path, adapters, config: LoraConfig) -> None:
    """`torch.save(to_loralib(adapters, config), path)`; needs PyTorch."""
    try:
        import torch
    except ImportError:
        raise ImportError("save_loralib needs PyTorch (torch.save); use to_loralib for numpy arrays") from None
    state = {}
    for k, v in to_loralib(adapters, config).items():
        bf16 = v.dtype.name == "bfloat16"
        t = torch.from_numpy(np.array(v, dtype=np.float32) if bf16 else np.array(v))
        state[k] = t.to(torch.bfloat16) if bf16 else t
    torch.save(state, path)

"""The base a checkpoint's adapters were trained on: its fingerprint (shapes, dtypes, content digests) and the check
that the variables given on load are that base.

The content digest of a weight is `"strided4096-sha256:<hex>"`, the sha256 of its shape, its dtype and the raw bytes
of a fixed sample of its flattened (row-major) elements: 4096 evenly strided ones, first and last included (every
element of a weight with at most 4096). It is read without copying the weight: a numpy array or a single-device CPU
jax array is sampled in place, a single-device GPU/TPU array is gathered on its device, and an array on several
devices (sharded on a mesh of Auto or Explicit axes, or replicated) is gathered by a jitted gather whose result is
replicated on all its devices, so only the sample moves, and with several processes (`jax.distributed`), whose
shards no process holds all of, every process computes the same digest (a collective then: every process must
fingerprint the same weights in the same order, as `save_adapters` and `load_adapters` called on all do). It
tells another fine-tune of the same architecture from the base (a full fine-tune, or a merge of adapters, moves
every element), but not a change confined to unsampled elements.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import layout
from jlora.config import LoraConfig
from jlora.paths import PAIR_KEYS, flatten_adapters, path_str
from jlora.qarray import is_quantized
from jlora.transform import as_variables
from jlora.variants.init import rewritten_base_hint, warn_unverified

SAMPLE = 4096
DIGEST = f"strided{SAMPLE}-sha256"


def _spec(x) -> dict:
    """Shape and dtype (of the float array a `QuantizedArray` stands for), and for one its quantization."""
    spec = {"shape": [int(d) for d in x.shape], "dtype": jnp.dtype(x.dtype).name}
    if is_quantized(x):
        spec["quant"] = {"qtype": x.qtype, "block_size": x.block_size, "double_quant": x.double_quant}
    return spec


def _key(spec: dict) -> tuple:
    return tuple(spec["shape"]), spec["dtype"], spec.get("quant")


def _text(spec: dict, other: dict | None = None) -> str:
    """`(11, 19) float32`, with `(quantized nf4, block_size 64)` or, where `other` is quantized, `(not quantized)`."""
    q = spec.get("quant")
    if q is None and (other or {}).get("quant") is None:
        return f"{tuple(spec['shape'])} {spec['dtype']}"
    how = "not quantized" if q is None else (f"quantized {q['qtype']}, block_size {q['block_size']}"
                                             + (", double_quant" if q.get("double_quant") else ""))
    return f"{tuple(spec['shape'])} {spec['dtype']} ({how})"


def _indices(n: int) -> np.ndarray:
    k = min(n, SAMPLE)
    if k <= 1:
        return np.zeros(k, np.int64)
    return np.arange(k, dtype=np.int64) * (n - 1) // (k - 1)


@jax.jit
def _take(x, idx):
    return x.reshape(-1)[idx]


@functools.partial(jax.jit, static_argnums=1)
def _take_replicated(x, out: jax.sharding.NamedSharding):
    """The strided sample of a sharded `x` (axes Auto or Explicit), replicated on `out`'s devices: a gather of
    per-axis indices, so no reshape of the sharded weight; each device reads its own elements."""
    idx = np.unravel_index(_indices(int(np.prod(x.shape, dtype=np.int64))), x.shape)
    return x.at[tuple(jnp.asarray(i, jnp.int32) for i in idx)].get(out_sharding=out)


def _replicated(sharding) -> jax.sharding.NamedSharding:
    """Replicated on the devices of `sharding` (on its mesh when it has one)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
    return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("devices",)), jax.sharding.PartitionSpec())


def _sample(x) -> np.ndarray:
    idx = _indices(int(np.prod(x.shape, dtype=np.int64)))
    if isinstance(x, jax.Array):
        devices = x.devices()
        if len(devices) > 1 and x.ndim:  # sharded or replicated, maybe across processes: each computes the sample
            return np.asarray(_take_replicated(x, _replicated(x.sharding))).reshape(-1)
        if next(iter(devices)).platform != "cpu":
            return np.asarray(_take(x, jnp.asarray(idx)))
    return np.asarray(x).reshape(-1)[idx]  # a view of the host buffer, then only the sample is copied


def digest(x) -> str | None:
    """`"strided4096-sha256:<64 hex>"` for an array `x` of any shape and dtype (see the module docstring), or None
    for a leaf without values (a `jax.ShapeDtypeStruct`)."""
    if is_quantized(x):  # its stored codes and scales, sampled the same way
        parts = [c for c in (x.values, x.scales) if c is not None]
        if any(digest(c) is None for c in parts):
            return None
        h = hashlib.sha256(f"{tuple(x.shape)}|{x.dtype}|{x.qtype}|{x.block_size}|".encode())
        for c in parts:
            h.update(np.ascontiguousarray(_sample(c)).tobytes())
        return f"{DIGEST}:{h.hexdigest()}"
    if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "__array__"):
        return None
    h = hashlib.sha256(f"{tuple(int(d) for d in x.shape)}|{jnp.dtype(x.dtype).name}|".encode())
    h.update(np.ascontiguousarray(_sample(x)).tobytes())
    return f"{DIGEST}:{h.hexdigest()}"


def _slots(variables) -> dict[str, Any]:
    """`{path: leaf}` over `variables`, None slots (leaves trained in full, in a frozen tree) included."""
    flat = jax.tree_util.tree_flatten_with_path(as_variables(variables),
                                                is_leaf=lambda x: x is None or is_quantized(x))[0]
    return {path_str(p): x for p, x in flat}


def _base_leaves(variables, pairs, full) -> tuple[dict[str, Any], list[str]]:
    """`({path: base leaf, or None where the variables hold a None slot}, [missing paths])`."""
    slots, leaves, missing = _slots(variables), {}, []
    for path in sorted({*pairs, *full}):
        leaf = slots.get(path)
        if leaf is None and not (path in slots and path in full):
            missing.append(path)
        else:
            leaves[path] = leaf
    return leaves, missing


def fingerprint(variables, adapters) -> dict[str, dict]:
    """`{path: {"shape": [in, out], "dtype": "float32", "digest": "strided4096-sha256:<hex>" | None}}`, sorted by
    path, JSON-able: the base parameter at every path that has an adapter (a lora pair or a leaf trained in full).
    A quantized base weight (`QuantizedArray`) also records `"quant": {"qtype", "block_size", "double_quant"}`,
    its shape and dtype are those of the float array it stands for, and its digest samples its stored codes.

    `variables` is the full variables tree or the frozen one (or an NNX State). `digest` is the content digest of
    the base weight under a lora pair (see the module docstring; a few microseconds per weight), and None for a leaf
    trained in full (the adapters replace its value) or an abstract leaf (`jax.ShapeDtypeStruct`). Where frozen
    holds None (a leaf trained in full) shape and dtype are those of the adapter array itself. Raises a ValueError
    naming paths absent from `variables`.
    """
    pairs, full = flatten_adapters(adapters)
    leaves, missing = _base_leaves(variables, pairs, full)
    if missing:
        raise ValueError(f"the adapters have paths {missing} that the variables lack")
    return {p: {**_spec(full[p] if x is None else x), "digest": digest(x) if p in pairs else None}
            for p, x in leaves.items()}


def check_base(meta: dict, config: LoraConfig, variables, where: str, check_weights: bool) -> None:
    """Raises one ValueError naming every path whose base differs from the saved fingerprint (shape, dtype and,
    with `check_weights`, the content digest where one was saved), or is missing from `variables`."""
    arrays, base = meta["arrays"], meta["base"]
    pairs = {p.rsplit("/", 1)[0] for p in arrays if p.rsplit("/", 1)[-1] in ("lora_a", "lora_b")}
    full = set(arrays) - {f"{p}/{k}" for p in pairs for k in PAIR_KEYS}
    leaves, missing = _base_leaves(variables, pairs, full)
    problems = [f"{p}: missing from the variables" for p in missing]
    content, requant, verified = [], False, set()
    for path, leaf in leaves.items():
        if leaf is None:  # a None slot of a frozen tree: the saved array is the base
            continue
        spec = _spec(leaf)
        if base is not None:
            saved = base.get(path)
            if saved is None or _key(saved) != _key(spec):
                was = "not recorded" if saved is None else _text(saved, spec)
                problems.append(f"{path}: saved base {was}, variables have {_text(spec, saved)}")
                if saved is not None and saved.get("quant") != spec.get("quant"):
                    requant = True
            elif check_weights and saved.get("digest") is not None:
                content += _content_problem(path, leaf, saved["digest"])
                verified.add(path)
        elif path in full:
            if arrays[path] != spec:
                problems.append(f"{path}: saved array {_text(arrays[path])}, variables have {_text(spec)}")
        else:
            a, b = arrays[f"{path}/lora_a"]["shape"], arrays[f"{path}/lora_b"]["shape"]
            try:
                layout.read_layout(path, spec["shape"], a, b, config.fused_for(path))
            except ValueError as e:
                problems.append(str(e))
    if problems or content:
        hint = ("\nThe base weights at those paths differ from the ones the adapters were saved with (same shapes and "
                "dtypes: another fine-tune, or a differently converted copy, of this architecture). Load onto the "
                "base the adapters were trained on, or pass check_weights=False to compare only shapes and dtypes."
                + rewritten_base_hint(config) if content else "")
        if requant:
            hint += ("\nThe base is quantized differently from the one the adapters were trained on: quantize it as "
                     "the saved base says (jlora.quantize(frozen, qtype=..., block_size=..., double_quant=...)); to "
                     "apply them to another base on purpose (e.g. the float weights a QLoRA base was quantized "
                     "from), load them without variables= and check the result yourself")
        raise ValueError(f"the checkpoint at {where} does not fit these variables (base fingerprint differs):\n  "
                         + "\n  ".join(problems + content) + hint)
    warn_unverified(config, where, sorted(pairs - verified))  # PiSSA / OLoRA onto a base not checked to be theirs


def _content_problem(path: str, leaf, saved: str) -> list[str]:
    method = saved.split(":", 1)[0]
    if method != DIGEST:
        return [f"{path}: the saved content digest is of an unknown kind {method!r} (this jlora writes {DIGEST!r})"]
    got = digest(leaf)
    if got is None:
        return [f"{path}: the variables hold no values here ({type(leaf).__name__}), so the weights cannot be "
                f"compared with the saved content digest"]
    return [] if got == saved else [f"{path}: weights differ from the saved base (content digest)"]

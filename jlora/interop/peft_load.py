"""`load_peft`: a PEFT LoRA directory (e.g. trained in PyTorch) -> jlora `(adapters, config)`; the file layouts are
described in jlora.interop.peft.

The directory must hold exactly the adapter `adapter_config.json` describes for these variables: every module PEFT
would adapt (its `target_modules`, `exclude_modules`, `layers_to_transform` / `layers_pattern` and
`modules_to_save`, matched as PEFT 0.21 matches them) has its factors, and every tensor is used. Otherwise a
ValueError lists the missing modules and the unused tensors; `strict=False` loads the rest and warns listing them
instead (PEFT's `from_pretrained` warns about missing adapter keys and ignores unexpected ones).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import jax.numpy as jnp

from jlora.config import LoraConfig
from jlora.interop.coverage import layer_modules, peft_targets, report
from jlora.interop.peft import PREFIX, all_leaves, close_names, full_to_torch, lookup_leaf
from jlora.interop.peft_experts import take as take_experts
from jlora.interop.peft_files import CONFIG_NAME, WEIGHTS_NAME, peft_pattern, read_peft_config, read_weights
from jlora.layout import Layout, fused_b
from jlora.models.hf import default_key
from jlora.paths import MAGNITUDE, nest, trains_in_full
from jlora.variants.convert import doubled_alpha
from jlora.variants.peft_init import pair_for_original_base, rebuilt_init

MAGNITUDE_KEY = "lora_magnitude_vector"  # DoRA's: (out,) for Linear / Embedding, (1, out, 1...) for Conv
_LORA_KEY = re.compile(rf"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|{MAGNITUDE_KEY})")
_COPY = re.compile(r"(.+)\.(modules_to_save|original_module)\..+")  # PEFT's duplicates of a saved module's leaves


def _check_shape(key: str, t, expected: tuple, path: str, w):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{key} has shape {tuple(t.shape)}, but {path} of shape {tuple(w.shape)} needs "
                         f"{tuple(expected)}")


def _unfuse(a, b, r: int, mask: tuple[bool, ...]):
    """lora_b (r, e*d) from a block-structured (e*r, n*d), or None if it has entries off the enabled blocks."""
    d = b.shape[1] // len(mask)
    slices = [j for j, on in enumerate(mask) if on]
    if b.shape[0] != len(slices) * r or b.shape[1] % len(mask):
        return None
    small = jnp.concatenate([b[k * r:(k + 1) * r, j * d:(j + 1) * d] for k, j in enumerate(slices)], axis=1)
    exact = bool(jnp.array_equal(fused_b(small, Layout((a.shape[0], b.shape[1]), 0, 1, r, mask)), b))
    return small if exact else None


def _magnitude(item, a, b, fused: bool):
    """jlora's DoRA magnitude (1, ..., 1, out) (W's rank: a's for a kernel, 2 for an embedding) from PEFT's."""
    key, t = item
    if fused or t.size != b.shape[-1] or sorted(t.shape, reverse=True)[1:] != [1] * (t.ndim - 1):
        raise ValueError(f"{key} has shape {tuple(t.shape)}; jlora takes DoRA magnitudes of one entry per output "
                         f"({b.shape[-1]}) on Linear, Conv and Embedding layers (not on fused projections)")
    return t.reshape((1,) * (a.ndim - 1) + (b.shape[-1],))


def _split(tensors: dict) -> tuple[dict, dict, dict]:
    """`(factors {module: {part: (key, t)}}, full {torch name: (key, t)}, copies {key: owner module})`."""
    factors, full, copies = {}, {}, {}
    for key, t in tensors.items():
        k = key.removeprefix(PREFIX)
        if m := _LORA_KEY.fullmatch(k):
            factors.setdefault(m[1], {})[m[2]] = (key, t)
        elif m := _COPY.fullmatch(k):
            copies[key] = m[1]
        elif "lora_" in k:
            raise ValueError(f"{key}: an adapter tensor jlora does not support (only lora_A / lora_B / "
                             f"lora_embedding_A / lora_embedding_B)")
        else:
            full[k.replace(".base_layer.", ".")] = (key, t)
    return factors, full, copies


def _unused(cfg, factors, full, copies, index, modules, targeted) -> dict[str, str]:
    """{tensor or module: why nothing uses it}."""
    unused = {}
    for module in sorted(set(factors) - targeted):
        name = f"{PREFIX}{module}.{'/'.join(sorted(factors[module]))}"
        if f"{module}.weight" not in index:
            unused[name] = (f"{module}.weight is not a parameter of the variables; close candidates: "
                            f"{close_names(index, f'{module}.weight')}")
        elif module not in modules:
            path = index[f"{module}.weight"][0]
            unused[name] = f"LoRA on {path} (layer -> flax {path.rsplit('/', 1)[-1]!r}) has no jlora equivalent"
        else:
            unused[name] = "target_modules does not cover it: PEFT ignores these tensors"
    saved = cfg.get("modules_to_save") or []
    for key, owner in copies.items():
        if not any(owner == m or owner.endswith(f".{m}") for m in saved):
            unused[key] = f"a copy of a module to save, but modules_to_save {saved} does not list {owner}"
    for k, (key, _) in full.items():
        if k not in index:
            unused[key] = f"not a parameter of the variables; close candidates: {close_names(index, k)}"
    return unused


def load_peft(directory, variables, *, dtype=None, strict: bool = True) -> tuple[dict, LoraConfig]:
    """Reads a PEFT LoRA directory (e.g. trained in PyTorch) into `(adapters, config)` for `variables`.

    Each module in the file is found as the leaf `params/<module with '/'>/kernel` (or `/embedding`) of
    `variables` (the full tree, `frozen`, or `jax.eval_shape`'s); factors are transposed to jlora's layout
    (lora_a (in, r), lora_b (r, out); conv lora_a (k..., in, r)) and cast to `dtype` (default: as stored). The
    config targets exactly the adapted paths (a regex, `with_targets`), with rank_pattern / alpha_pattern / fused per
    path. A PiSSA / OLoRA adapter (init_lora_weights 'pissa' / 'olora': trained on PEFT's residual base, which PEFT
    rebuilds on load) comes back as the plain LoRA of rank 2r for the original `variables` (jlora.variants.peft_init:
    the initial factors recomputed from their concrete weights); its embeddings, which PEFT leaves plain, stay rank r.

    Raises FileNotFoundError for a missing file; ValueError, naming the file: a damaged or foreign file
    (`peft_files.read_peft_config` / `read_weights`), an unsupported feature or a base-rewriting init jlora cannot
    rebuild (pissa_niter_K, CorDA, LoRA-GA, LoftQ; PiSSA / OLoRA on abstract variables), a tensor rank that
    contradicts r / rank_pattern, a shape that does not fit (naming the tensor and both shapes), or, unless
    `strict=False` (a warning, and the unused tensors are skipped), modules
    target_modules covers with no tensors and tensors nothing uses.
    """
    directory = Path(directory)
    cfg = read_peft_config(directory)
    file = directory / WEIGHTS_NAME
    tensors, meta = read_weights(file)
    tensors, experts, expert_meta, expert_missing = take_experts(cfg, tensors, all_leaves(variables), source=file,
                                                                 peft_pattern=peft_pattern)  # target_parameters
    factors, full, copies = _split(tensors)
    leaves = all_leaves(variables)
    index = {default_key(p): (p, w) for p, w in leaves}
    modules = layer_modules(leaves)
    targeted = peft_targets(cfg, modules)
    unused = _unused(cfg, factors, full, copies, index, modules, targeted)
    report(directory, missing=(targeted - set(factors)) | expert_missing, unused=unused,
           strict=strict, missing_why="that target_modules covers",
           fix="Load the adapter trained for these variables (the same model and number of layers)")
    factors = {m: parts for m, parts in factors.items() if m in targeted}
    full = {k: v for k, v in full.items() if k in index}
    fan = bool(cfg.get("fan_in_fan_out"))
    cast = (lambda x: x.astype(dtype)) if dtype is not None else (lambda x: x)
    flat, ranks, alphas, fused = {}, {}, {}, {}
    rebuilt = rebuilt_init(cfg, directory / CONFIG_NAME)
    for module, parts in sorted(factors.items()):
        embed = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        names = ("lora_embedding_A", "lora_embedding_B") if embed else ("lora_A.weight", "lora_B.weight")
        names += (MAGNITUDE_KEY,) if cfg.get("use_dora") else ()  # DoRA: jlora.variants.dora
        if set(parts) != set(names):
            raise ValueError(f"{PREFIX}{module}: expected the tensors {names} (use_dora={bool(cfg.get('use_dora'))} "
                             f"in {CONFIG_NAME}), found {sorted(parts)}")
        (ka, ta), (kb, tb) = parts[names[0]], parts[names[1]]
        path, w = lookup_leaf(index, f"{module}.weight", f"the adapter {ka}")
        leaf = path.rsplit("/", 1)[-1]
        if leaf != ("embedding" if embed else "kernel") or (embed and ta.ndim != 2):
            raise ValueError(f"{ka}: LoRA on {path} ({'embedding' if embed else 'layer'} -> flax {leaf!r}) has no "
                             f"jlora equivalent")
        r = ta.shape[0]
        if r != (want := peft_pattern(cfg.get("rank_pattern"), module, cfg["r"])):
            raise ValueError(f"{ka} has rank {r} (shape {tuple(ta.shape)}), but {directory / CONFIG_NAME} gives "
                             f"{module} rank {want} (r / rank_pattern): PEFT refuses this file too; fix the config "
                             f"or the tensors")
        if w is not None:  # expected torch shapes: Linear / conv A (r, in, k...), B (out, r, 1...); Embedding
            _check_shape(ka, ta, (r, w.shape[0]) if embed else (r, w.shape[-2], *w.shape[:-2]), path, w)
            _check_shape(kb, tb, (w.shape[1], r) if embed else (w.shape[-1], r, *(1,) * (w.ndim - 2)), path, w)
        if not embed and tb.ndim >= 2 and tb.shape[2:] != (1,) * (tb.ndim - 2):
            raise ValueError(f"{kb} has shape {tb.shape}; jlora's conv lora_B is a 1x1 convolution (out, r, 1...)")
        a = ta.T if embed else jnp.transpose(ta, (*range(2, ta.ndim), 1, 0))
        b = tb.T if embed else tb.reshape(tb.shape[:2]).T
        alpha = peft_pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        spec = meta.get("fused", {}).get(module)
        small = _unfuse(a, b, spec["rank"], tuple(spec["enable_lora"])) if spec and not embed else None
        if small is not None:
            e = sum(spec["enable_lora"])
            expected_alpha = spec["alpha"] * (math.sqrt(e) if cfg.get("use_rslora") else e)
            if not math.isclose(alpha, expected_alpha, rel_tol=1e-6):
                raise ValueError(f"{PREFIX}{module}: lora_alpha {alpha} disagrees with the jlora metadata "
                                 f"(alpha {spec['alpha']} on {e} fused slices)")
            b, r, alpha = small, spec["rank"], spec["alpha"]
            fused[path] = tuple(spec["enable_lora"])
        flat[path] = {"lora_a": cast(a), "lora_b": cast(b)}
        if MAGNITUDE_KEY in parts:
            flat[path][MAGNITUDE] = cast(_magnitude(parts[MAGNITUDE_KEY], a, b, bool(fused.get(path))))
        ranks[path], alphas[path] = r, alpha
        if rebuilt and not embed:  # PiSSA / OLoRA: trained on W - s A0 B0, which PEFT rebuilds on load
            scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
            flat[path] = pair_for_original_base(path, w, flat[path]["lora_a"], flat[path]["lora_b"], init=rebuilt,
                                                scale=scale, where=f"{directory / CONFIG_NAME} ({ka})")
            ranks[path], alphas[path] = 2 * r, doubled_alpha(alpha, bool(cfg.get("use_rslora")))
    for path, pair in experts.items():  # 3-D expert tensors (jlora.interop.peft_experts)
        flat[path], (ranks[path], alphas[path]) = {k: cast(v) for k, v in pair.items()}, expert_meta[path]
    if not flat:
        raise ValueError(f"{file} holds no LoRA tensors for these variables")
    saved_patterns = cfg.get("modules_to_save") or []
    to_save = set()
    for k, (key, t) in sorted(full.items()):
        path, w = index[k]
        ancestors = [k.rsplit(".", i)[0] for i in range(k.count("."), 0, -1)]  # a.b.weight -> a, a.b
        owner = next((m for m in ancestors if any(m.endswith(s) for s in saved_patterns)), None)
        if owner is None and path.rsplit("/", 1)[-1] != "bias":
            raise ValueError(f"{key}: a full tensor that is neither a bias nor in modules_to_save {saved_patterns}")
        if owner is not None:
            to_save.add("/".join(path.split("/")[: 1 + owner.count(".") + 1]))
        value = full_to_torch(path, t, fan_in_fan_out=fan, inverse=True)
        if w is not None and value.shape != tuple(w.shape):
            raise ValueError(f"{key} has shape {tuple(t.shape)} (in jlora's layout {value.shape}), but {path} has "
                             f"shape {tuple(w.shape)}")
        flat[path] = value.astype(dtype or (w.dtype if w is not None else value.dtype))
    config = LoraConfig(
        rank=cfg["r"], alpha=cfg["lora_alpha"], targets=tuple(sorted(ranks)),
        dropout=float(cfg.get("lora_dropout") or 0), bias=cfg.get("bias") or "none",
        scaling="rslora" if cfg.get("use_rslora") else "alpha_over_r",
        rank_pattern={p: r for p, r in ranks.items() if r != cfg["r"]},
        alpha_pattern={p: a for p, a in alphas.items() if a != cfg["lora_alpha"]},
        modules_to_save=tuple(sorted(to_save)), fused=fused, dora=bool(cfg.get("use_dora")),
    ).with_targets(ranks)
    lora_modules = {p.rpartition("/")[0] for p in ranks}
    expected = {p for p, _ in leaves if trains_in_full(p, config, lora_modules)}
    loaded = set(flat) - set(ranks)
    if expected != loaded:
        raise ValueError(f"the leaves trained in full in {directory} ({sorted(loaded)}) are not those bias="
                         f"{config.bias!r} and modules_to_save select in the variables ({sorted(expected)})")
    return nest(flat), config

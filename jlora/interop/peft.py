"""Hugging Face PEFT adapter directories <-> jlora adapters: `save_peft` writes what `PeftModel.from_pretrained`
loads, `load_peft` reads what PEFT's `save_pretrained` writes.

    save_peft(out_dir, adapters, config, base_model_name_or_path="gpt2", fan_in_fan_out=True)
    adapters, config = load_peft(peft_dir, variables)  # variables: the full tree, `frozen`, or `jax.eval_shape`'s

jlora's models name modules as Hugging Face does: the flax leaf `params/a/b/kernel` is the torch parameter `a.b.weight`
(kernel, embedding, LayerNorm scale <-> weight), so a target's PEFT module name is its path without the collection.

- `adapter_config.json`: peft_type "LORA", r = config.rank, lora_alpha = config.alpha, target_modules = the exact list
  of full module names adapted, rank_pattern / alpha_pattern (full module names) where a target's rank or alpha
  differs from the default, use_rslora (scaling='rslora'), lora_dropout, bias, modules_to_save (full names of the
  modules whose leaves train in full), fan_in_fan_out (a keyword: True for GPT-2, whose Conv1D weights are stored
  (in, out)), init_lora_weights and inference_mode true.
- `adapter_model.safetensors`, PEFT's keys and torch layouts (the factors keep their dtype):
  Linear `base_model.model.<module>.lora_A.weight` (r, in) = lora_a^T and `.lora_B.weight` (out, r) = lora_b^T;
  Embedding `.lora_embedding_A` (r, vocab) = lora_a^T and `.lora_embedding_B` (dim, r) = lora_b^T;
  Conv `.lora_A.weight` (r, in, k...) from lora_a (k..., in, r), `.lora_B.weight` (out, r, 1...) from lora_b (r, out);
  leaves trained in full as PEFT's `save_pretrained` names them: a target's bias `<module>.base_layer.bias`, other
  biases `<module>.bias`, modules_to_save leaves `<module>.weight` / `.bias` (torch layout: Linear kernels transposed,
  conv kernels OIHW, GPT-2 Conv1D kernels with fan_in_fan_out as they are). PEFT's duplicate `.modules_to_save.*` /
  `.original_module.*` keys (bias='all') are not written and are skipped on reading.

A fused projection (GPT-2's c_attn with `fused={"c_attn": (True, False, True)}`: lora_a (in, e*r), lora_b (r, e*d))
has no PEFT equivalent. It is exported exactly as an ordinary LoRA of rank e*r: lora_A = lora_a^T (e*r, in), lora_B
(n*d, e*r) = the block-structured `fused_b(lora_b)^T` (zeros off the enabled blocks), with rank_pattern {c_attn: e*r}
and alpha_pattern {c_attn: alpha*e} (alpha*sqrt(e) with rsLoRA) so that PEFT's scale equals jlora's. The mask, rank
and alpha go into the safetensors metadata (`{"jlora": json}`); `load_peft` restores the fused layout from them while
the off-block entries are still zero (else it loads the exact rank-e*r LoRA that PEFT trained).

Not output-exact: an adapter on a tied embedding (GPT-2's wte, whose `Embed.attend` is the head) changes the head too
in jlora, but only the lookup in PEFT.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp

from jlora.config import LoraConfig, path_matches
from jlora.layout import Layout, fused_b
from jlora.models.hf import LEAF_TO_HF, default_key
from jlora.paths import flatten_adapters, nest, path_str, trains_in_full, under

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
CONV1D_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")  # transformers' GPT-2 Conv1D modules: weight (in, out)
UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "lora_bias": "a bias on lora_B (lora_bias)", "use_qalora": "QALoRA",
               "target_parameters": "LoRA on bare parameters", "layer_replication": "layer_replication",
               "trainable_token_indices": "trainable_token_indices", "alora_invocation_tokens": "aLoRA"}
_LORA_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")


def module_name(path: str) -> str:
    """`params/a/b/kernel` -> `a.b`, the PEFT / torch module name of a flax leaf."""
    return default_key(path).rsplit(".", 1)[0]


def all_leaves(variables) -> list[tuple[str, object]]:
    """`[(path, leaf)]` including None leaves (the holes `lora.init` leaves in `frozen`)."""
    flat = jax.tree_util.tree_flatten_with_path(variables, is_leaf=lambda x: x is None)[0]
    return [(path_str(p), x) for p, x in flat]


def full_to_torch(path: str, x, *, fan_in_fan_out: bool = False, inverse: bool = False):
    """A leaf trained in full in torch layout: Dense kernel (in, out) -> (out, in) (not a GPT-2 Conv1D's with
    fan_in_fan_out), conv kernel (k..., in, out) -> (out, in, k...); others unchanged. `inverse`: torch -> flax."""
    conv1d = fan_in_fan_out and module_name(path).rsplit(".", 1)[-1] in CONV1D_NAMES
    if path.rsplit("/", 1)[-1] != "kernel" or conv1d or x.ndim < 2:
        return x
    if x.ndim == 2:
        return x.T
    return jnp.transpose(x, (*range(2, x.ndim), 1, 0) if inverse else (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))


def save_peft(directory, adapters, config: LoraConfig, *, base_model_name_or_path: str, variables=None,
              task_type: str | None = None, fan_in_fan_out: bool = False) -> Path:
    """Writes `adapters` (from `lora.init` / training with `config`) as a PEFT adapter directory; returns its path.

    `variables` (optional) checks each pair's shapes against its weight. A ValueError names an adapter with no
    PEFT equivalent (scan-stacked or DenseGeneral layouts, or a full leaf that is neither a bias nor under
    modules_to_save).
    """
    from safetensors.flax import save_file

    pairs, full = flatten_adapters(adapters)
    if not pairs:
        raise ValueError("the adapters hold no lora_a / lora_b pair: nothing to export")
    weights = dict(all_leaves(variables)) if variables is not None else {}
    rslora = config.scaling == "rslora"
    tensors, rank_pattern, alpha_pattern, fused_meta = {}, {}, {}, {}
    for path, pair in sorted(pairs.items()):
        a, b = jnp.asarray(pair["lora_a"]), jnp.asarray(pair["lora_b"])
        module, leaf = module_name(path), path.rsplit("/", 1)[-1]
        r, alpha, mask = config.rank_for(path), config.alpha_for(path), config.fused_for(path)
        ok = (leaf == "embedding" and a.ndim == 2) or (leaf == "kernel" and (a.ndim == 2 or not mask))
        ok = ok and b.ndim == 2 and b.shape[0] == r and a.shape[-1] == (sum(mask) if mask else 1) * r
        if not ok:
            raise ValueError(f"{path}: lora_a {a.shape} / lora_b {b.shape} (rank {r}) has no PEFT equivalent; PEFT "
                             f"takes Dense kernels (in, out), conv kernels (k..., in, out) and embeddings")
        w = weights.get(path)
        out = b.shape[1] // sum(mask) * len(mask) if mask else b.shape[1]
        if w is not None and tuple(w.shape) != a.shape[:-1] + (out,):
            raise ValueError(f"{path}: lora_a {a.shape} / lora_b {b.shape} do not fit the weight {tuple(w.shape)}")
        if mask:
            fused_meta[module] = {"enable_lora": list(mask), "rank": r, "alpha": alpha}
            b = fused_b(b, Layout((a.shape[0], out), 0, 1, r, mask))  # (e*r, n*d)
            e = sum(mask)
            r, alpha = e * r, alpha * (math.sqrt(e) if rslora else e)
        key = PREFIX + module
        if leaf == "embedding":
            tensors[key + ".lora_embedding_A"], tensors[key + ".lora_embedding_B"] = a.T, b.T
        else:
            tensors[key + ".lora_A.weight"] = jnp.transpose(a, (a.ndim - 1, a.ndim - 2, *range(a.ndim - 2)))
            tensors[key + ".lora_B.weight"] = b.T.reshape(b.shape[1], r, *(1,) * (a.ndim - 2))
        if r != config.rank:
            rank_pattern[module] = r
        if alpha != config.alpha:
            alpha_pattern[module] = alpha
    lora_modules = {module_name(p) for p in pairs}
    saved = set()
    for path, x in sorted(full.items()):
        module, leaf = module_name(path), path.rsplit("/", 1)[-1]
        to_save = any(path_matches(path, m) or under(path, m) for m in config.modules_to_save)
        if not to_save and leaf != "bias":
            raise ValueError(f"{path}: a leaf trained in full that is neither a bias nor under modules_to_save has "
                             f"no PEFT equivalent")
        saved |= {module} if to_save else set()
        name = "base_layer.bias" if leaf == "bias" and module in lora_modules and not to_save else LEAF_TO_HF.get(
            leaf, leaf)
        tensors[f"{PREFIX}{module}.{name}"] = full_to_torch(path, jnp.asarray(x), fan_in_fan_out=fan_in_fan_out)
    peft_config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "target_modules": sorted(lora_modules),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": rslora,
        "lora_dropout": config.dropout, "bias": config.bias, "modules_to_save": sorted(saved) or None,
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    meta = {"format": "pt", "jlora": json.dumps({"version": 1, "fused": fused_meta}, sort_keys=True)}
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, directory / WEIGHTS_NAME, metadata=meta)
    return directory


def read_peft_config(directory) -> dict:
    """adapter_config.json, checked to be a LoRA jlora can represent (ValueError naming the feature if not)."""
    file = Path(directory) / CONFIG_NAME
    if not file.exists():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a PEFT adapter directory")
    cfg = json.loads(file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters can be loaded")
    used = [what for field, what in UNSUPPORTED.items() if cfg.get(field)]
    if used:
        raise ValueError(f"{file} uses {', '.join(used)}, which jlora does not support")
    return cfg


def _peft_pattern(pattern: dict | None, module: str, default):
    """PEFT's rank/alpha_pattern lookup: the first key that regex-matches a '.'-suffix of the module name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lookup_leaf(index: dict, key: str, what: str):
    """`index[key]` (a torch name -> (flax path, leaf)); a ValueError lists close names if it is missing."""
    if key not in index:
        close = difflib.get_close_matches(key, list(index), n=5, cutoff=0.5)
        raise ValueError(f"{what} {key!r} names a parameter the variables do not have; close candidates: {close}")
    return index[key]


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


def load_peft(directory, variables, *, dtype=None) -> tuple[dict, LoraConfig]:
    """Reads a PEFT LoRA directory (e.g. trained in PyTorch) into `(adapters, config)` for `variables`.

    Each module in the file is found as the leaf `params/<module with '/'>/kernel` (or `/embedding`) of
    `variables`; factors are transposed to jlora's layout and cast to `dtype` (default: as stored). The config
    targets exactly the adapted paths (a regex, `with_targets`), with rank_pattern / alpha_pattern / fused per path.
    ValueErrors: not a LoRA, unsupported features, a module the variables lack (with close candidates), a shape
    that does not fit (naming the tensor and both shapes).
    """
    from safetensors import safe_open

    directory = Path(directory)
    cfg = read_peft_config(directory)
    if not (directory / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME} (an adapter_model.bin, from "
                                f"safe_serialization=False, is not read: re-save it with safetensors)")
    with safe_open(directory / WEIGHTS_NAME, framework="flax") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        meta = json.loads((f.metadata() or {}).get("jlora", "{}"))
    leaves = all_leaves(variables)
    index = {default_key(p): (p, w) for p, w in leaves}
    factors, full = {}, {}
    for key, t in tensors.items():
        k = key.removeprefix(PREFIX)
        if m := _LORA_KEY.fullmatch(k):
            factors.setdefault(m[1], {})[m[2]] = (key, t)
        elif ".modules_to_save." in k or ".original_module." in k:
            continue  # PEFT's duplicates of a saved module's leaves (bias='all')
        elif "lora_" in k:
            raise ValueError(f"{key}: an adapter tensor jlora does not support (only lora_A / lora_B / "
                             f"lora_embedding_A / lora_embedding_B)")
        else:
            full[k.replace(".base_layer.", ".")] = (key, t)
    fan = bool(cfg.get("fan_in_fan_out"))
    cast = (lambda x: x.astype(dtype)) if dtype is not None else (lambda x: x)
    flat, ranks, alphas, fused = {}, {}, {}, {}
    for module, parts in sorted(factors.items()):
        embed = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        names = ("lora_embedding_A", "lora_embedding_B") if embed else ("lora_A.weight", "lora_B.weight")
        if set(parts) != set(names):
            raise ValueError(f"{PREFIX}{module}: expected the tensors {names}, found {sorted(parts)}")
        (ka, ta), (kb, tb) = parts[names[0]], parts[names[1]]
        path, w = lookup_leaf(index, f"{module}.weight", f"the adapter {ka}")
        leaf = path.rsplit("/", 1)[-1]
        if leaf != ("embedding" if embed else "kernel") or (embed and ta.ndim != 2):
            raise ValueError(f"{ka}: LoRA on {path} ({'embedding' if embed else 'layer'} -> flax {leaf!r}) has no "
                             f"jlora equivalent")
        r = ta.shape[0]
        if w is not None:  # expected torch shapes: Linear / conv A (r, in, k...), B (out, r, 1...); Embedding
            _check_shape(ka, ta, (r, w.shape[0]) if embed else (r, w.shape[-2], *w.shape[:-2]), path, w)
            _check_shape(kb, tb, (w.shape[1], r) if embed else (w.shape[-1], r, *(1,) * (w.ndim - 2)), path, w)
        if not embed and tb.ndim >= 2 and tb.shape[2:] != (1,) * (tb.ndim - 2):
            raise ValueError(f"{kb} has shape {tb.shape}; jlora's conv lora_B is a 1x1 convolution (out, r, 1...)")
        a = ta.T if embed else jnp.transpose(ta, (*range(2, ta.ndim), 1, 0))
        b = tb.T if embed else tb.reshape(tb.shape[:2]).T
        alpha = _peft_pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
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
        ranks[path], alphas[path] = r, alpha
    if not flat:
        raise ValueError(f"{directory / WEIGHTS_NAME} holds no LoRA tensors")
    saved_patterns = cfg.get("modules_to_save") or []
    to_save = set()
    for k, (key, t) in sorted(full.items()):
        path, w = lookup_leaf(index, k, "the tensor")
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
        rank=cfg["r"], alpha=cfg["lora_alpha"], targets=tuple(sorted(ranks)), dropout=float(cfg.get("lora_dropout", 0)),
        bias=cfg.get("bias", "none"), scaling="rslora" if cfg.get("use_rslora") else "alpha_over_r",
        rank_pattern={p: r for p, r in ranks.items() if r != cfg["r"]},
        alpha_pattern={p: a for p, a in alphas.items() if a != cfg["lora_alpha"]},
        modules_to_save=tuple(sorted(to_save)), fused=fused,
    ).with_targets(ranks)
    lora_modules = {p.rpartition("/")[0] for p in ranks}
    expected = {p for p, _ in leaves if trains_in_full(p, config, lora_modules)}
    loaded = set(flat) - set(ranks)
    if expected != loaded:
        raise ValueError(f"the leaves trained in full in {directory} ({sorted(loaded)}) are not those bias="
                         f"{config.bias!r} and modules_to_save select in the variables ({sorted(expected)})")
    return nest(flat), config


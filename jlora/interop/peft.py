"""Hugging Face PEFT adapter directories <-> jlora adapters: `save_peft` writes what `PeftModel.from_pretrained`
loads, `load_peft` (jlora.interop.peft_load) reads what PEFT's `save_pretrained` writes.

    save_peft(out_dir, adapters, config, base_model_name_or_path="gpt2", fan_in_fan_out=True)
    adapters, config = load_peft(peft_dir, variables)  # variables: the full tree, `frozen`, or `jax.eval_shape`'s

jlora's models name modules as Hugging Face does: the flax leaf `params/a/b/kernel` is the torch parameter `a.b.weight`
(kernel, embedding, LayerNorm scale <-> weight), so a target's PEFT module name is its path without the collection.

- `adapter_config.json`: peft_type "LORA", r = config.rank, lora_alpha = config.alpha, target_modules = the exact list
  of full module names adapted, rank_pattern / alpha_pattern (full module names) where a target's rank or alpha
  differs from the default, use_rslora (scaling='rslora'), lora_dropout, bias, modules_to_save (full names of the
  modules whose leaves train in full), fan_in_fan_out (a keyword: True for GPT-2, whose Conv1D weights are stored
  (in, out)), inference_mode true and init_lora_weights true ('pissa' / 'olora' for such adapters on Dense kernels,
  which PEFT re-initialises on the original base it loads onto: jlora.variants.peft_init; other base-rewriting
  adapters are refused: convert them first, `jlora.convert_to_plain_lora`).
- `adapter_model.safetensors`, PEFT's keys and torch layouts (the factors keep their dtype):
  Linear `base_model.model.<module>.lora_A.weight` (r, in) = lora_a^T and `.lora_B.weight` (out, r) = lora_b^T;
  Embedding `.lora_embedding_A` (r, vocab) = lora_a^T and `.lora_embedding_B` (dim, r) = lora_b^T;
  Conv `.lora_A.weight` (r, in, k...) from lora_a (k..., in, r), `.lora_B.weight` (out, r, 1...) from lora_b (r, out);
  leaves trained in full as PEFT's `save_pretrained` names them: a target's bias `<module>.base_layer.bias`, other
  biases `<module>.bias`, modules_to_save leaves `<module>.weight` / `.bias` (torch layout: Linear kernels transposed,
  conv kernels OIHW, GPT-2 Conv1D kernels with fan_in_fan_out as they are). PEFT's duplicate `.modules_to_save.*` /
  `.original_module.*` keys (bias='all') are not written, and on reading only checked to belong to a module to save.

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
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from jlora.atomic import replace_dir
from jlora.config import LoraConfig, path_matches
from jlora.interop.peft_experts import export as export_experts
from jlora.interop.peft_experts import is_expert_pair
from jlora.interop.peft_files import CONFIG_NAME, WEIGHTS_NAME, is_peft_dir
from jlora.layout import Layout, fused_b
from jlora.models.hf import LEAF_TO_HF, default_key
from jlora.paths import MAGNITUDE, flatten_adapters, path_str, under
from jlora.variants.peft_init import peft_init_value

PREFIX = "base_model.model."
CONV1D_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")  # transformers' GPT-2 Conv1D modules: weight (in, out)


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
              task_type: str | None = None, fan_in_fan_out: bool = False, overwrite: bool = False) -> Path:
    """Writes `adapters` (from `lora.init` / training with `config`) as a PEFT adapter directory; returns its path.

    `variables` (optional) checks each pair's shapes against its weight. A ValueError names an adapter with no
    PEFT equivalent (scan-stacked or DenseGeneral layouts, or a full leaf that is neither a bias nor under
    modules_to_save).

    `directory` must not exist, or be empty (e.g. from `tempfile.mkdtemp()`); an existing adapter directory raises
    FileExistsError unless `overwrite=True`, which replaces it atomically: the new files are written beside it and
    swapped in only when complete, so an error or a crash during the write leaves the old adapter loadable. A
    directory holding anything but adapter_config.json and adapter_model.safetensors (a run folder, or PEFT's
    README.md) is never replaced: a ValueError, and nothing is deleted.
    """
    from safetensors.flax import save_file

    pairs, full = flatten_adapters(adapters)
    if not pairs:
        raise ValueError("the adapters hold no lora_a / lora_b pair: nothing to export")
    experts = {p: pairs.pop(p) for p in list(pairs) if is_expert_pair(p, pairs[p])}  # PEFT's target_parameters
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
        if MAGNITUDE in pair:  # DoRA (jlora.variants.dora): PEFT's (out,), a conv's (1, out, 1...)
            tensors[key + ".lora_magnitude_vector"] = _peft_magnitude(path, jnp.asarray(pair[MAGNITUDE]), a, mask,
                                                                      leaf == "embedding")
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
        "fan_in_fan_out": fan_in_fan_out, "inference_mode": True,
        "init_lora_weights": peft_init_value(config, {**pairs, **experts}, fan_in_fan_out=fan_in_fan_out),
        "use_dora": config.dora,
    }
    if experts:  # 3-D expert tensors (jlora.interop.peft_experts)
        peft_config["target_parameters"] = export_experts(experts, config, tensors, rank_pattern, alpha_pattern)
    directory = Path(directory)
    empty = directory.is_dir() and not directory.is_symlink() and not os.listdir(directory)
    meta = {"format": "pt", "jlora": json.dumps({"version": 1, "fused": fused_meta}, sort_keys=True)}
    what = "PEFT adapter directory"
    with replace_dir(directory, overwrite=overwrite or empty, is_ours=is_peft_dir, what=what) as new:
        new.mkdir()
        (new / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        save_file({k: jnp.asarray(v) for k, v in tensors.items()}, new / WEIGHTS_NAME, metadata=meta)
    return directory


def _peft_magnitude(path: str, m, a, mask, embed: bool):
    """PEFT's lora_magnitude_vector from jlora's magnitude (1, ..., 1, out): (out,), or (1, out, 1...) for a conv."""
    if mask or any(n != 1 for n in m.shape[:-1]):
        raise ValueError(f"{path}: a DoRA magnitude {tuple(m.shape)} on "
                         f"{'a fused projection' if mask else 'weight axes other than the output'} has no PEFT "
                         f"equivalent; PEFT's DoRA takes Linear and Conv layers (one magnitude per output) and "
                         f"Embedding layers")
    if embed or a.ndim == 2:
        return m.reshape(-1)
    return m.reshape(1, -1, *(1,) * (a.ndim - 2))


def close_names(index: dict, key: str) -> list[str]:
    """Up to 5 names of `index` close to `key` (a misspelt module, another model's naming)."""
    return difflib.get_close_matches(key, list(index), n=5, cutoff=0.5)


def lookup_leaf(index: dict, key: str, what: str):
    """`index[key]` (a torch name -> (flax path, leaf)); a ValueError lists close names if it is missing."""
    if key not in index:
        raise ValueError(f"{what} {key!r} names a parameter the variables do not have; close candidates: "
                         f"{close_names(index, key)}")
    return index[key]

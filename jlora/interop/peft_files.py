"""The two files of a PEFT LoRA directory, read and checked: `adapter_config.json` (a LoRA jlora represents exactly)
and `adapter_model.safetensors` (a whole file of floating-point tensors).

Each problem is a ValueError naming the file, what is wrong and what to do; a missing file is a FileNotFoundError.
`adapter_config.json` is refused when it uses a PEFT feature jlora does not implement (lora_bias, ...), an
`init_lora_weights` that rewrites the base weights in PEFT in a way jlora cannot rebuild (CorDA, LoRA-GA, LoftQ: the
factors only mean something on that rewritten base, which jlora does not have; PiSSA and OLoRA are rebuilt from the
base by `load_peft`, jlora.variants.peft_init), or a field jlora does not know (a newer PEFT's option could change
what the tensors mean).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import jax.numpy as jnp

from jlora.models.hf import read_json

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
UNSUPPORTED = {"lora_bias": "a bias on lora_B (lora_bias)", "use_qalora": "QALoRA",
               "layer_replication": "layer_replication",
               "trainable_token_indices": "trainable_token_indices", "alora_invocation_tokens": "aLoRA",
               "megatron_config": "Megatron parallel layers (megatron_config)", "use_bdlora": "BD-LoRA (use_bdlora)",
               "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA (kasa_config)",
               "arrow_config": "Arrow routing (arrow_config)", "enable_lora": "a merged linear (enable_lora)"}
USED = {"peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
        "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "bias", "modules_to_save", "fan_in_fan_out",
        "init_lora_weights", "task_type", "target_parameters", "use_dora"}
# no effect on what the tensors of a LoRA mean: bookkeeping, or options of an init / a feature checked above
INERT = {"base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "megatron_core",
         "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
         "ensure_weight_tying", "merge_weights"}
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")  # the base weights stay as they are
REBUILT_INITS = ("pissa", "olora")  # pissa_niter_<n> too: load_peft rebuilds the initial factors from the base
REWRITING_INITS = ("corda", "lora_ga")  # PEFT converts these to plain LoRA


def _init_error(file: Path, init) -> ValueError | None:
    name = init.lower() if isinstance(init, str) else None
    if isinstance(init, bool) or name in PLAIN_INITS:
        return None
    if name is not None and (name in REBUILT_INITS or re.fullmatch(r"pissa_niter_\d+", name)):
        return None  # load_peft: jlora.variants.peft_init (pissa_niter_<n> on a Linear is refused there)
    if name is not None and name in REWRITING_INITS:
        return ValueError(
            f"{file}: init_lora_weights={init!r} rewrites the base weights in PEFT (W less the initial scaled B A), "
            f"and jlora would apply the factors to the unmodified base: the outputs would be wrong. Convert the "
            f"adapter to a plain LoRA in PEFT first: right after get_peft_model (before training) set "
            f"`model.peft_config['default'].init_lora_weights = True` and `model.save_pretrained(INIT)`; after "
            f"training, `model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=INIT)`: out_dir "
            f"(rank 2r, init_lora_weights=true) loads here")
    if name == "loftq":
        return ValueError(
            f"{file}: init_lora_weights='loftq' was trained on the base weights LoftQ quantised in PEFT, which jlora "
            f"does not have: the outputs would be wrong. Merge the adapter into that base in PEFT "
            f"(`merge_and_unload()`) and load the merged model instead")
    return ValueError(f"{file}: init_lora_weights={init!r} is not an initialisation jlora knows ({PLAIN_INITS} keep "
                      f"the base weights); jlora refuses rather than risk a base that PEFT changed")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _names(x, *, regex: bool) -> bool:
    """A list of module names, or (`regex`) one regex string."""
    return (regex and isinstance(x, str)) or (isinstance(x, list) and all(isinstance(s, str) for s in x))


_FIELDS = {  # field: (check, what it must be); None is allowed for all but r, lora_alpha and target_modules
    "r": (lambda x: _is_int(x) and x > 0, "a positive integer"),
    "lora_alpha": (_is_number, "a finite number"),
    "target_modules": (lambda x: _names(x, regex=True), "a list of module names or a regex string"),
    "exclude_modules": (lambda x: _names(x, regex=True), "a list of module names or a regex string"),
    "modules_to_save": (lambda x: _names(x, regex=False), "a list of module names"),
    "layers_to_transform": (lambda x: _is_int(x) or (isinstance(x, list) and all(map(_is_int, x))),
                            "a layer index or a list of them"),
    "layers_pattern": (lambda x: _names(x, regex=True), "a name or a list of names"),
    "rank_pattern": (lambda x: isinstance(x, dict) and all(_is_int(v) and v > 0 for v in x.values()),
                     "an object of positive integers"),
    "alpha_pattern": (lambda x: isinstance(x, dict) and all(map(_is_number, x.values())), "an object of numbers"),
    "lora_dropout": (lambda x: _is_number(x) and 0 <= x < 1, "a number in [0, 1)"),
    "bias": (lambda x: x in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    "use_rslora": (lambda x: isinstance(x, bool), "true or false"),
    "fan_in_fan_out": (lambda x: isinstance(x, bool), "true or false"),
    "target_parameters": (lambda x: _names(x, regex=False), "a list of parameter names"),
}


def read_peft_config(directory) -> dict:
    """`adapter_config.json` of a PEFT directory as a dict, checked to be a LoRA jlora loads exactly.

    Raises FileNotFoundError when there is none; ValueError naming the file when it is not a JSON object, lacks r /
    lora_alpha / target_modules, holds a value of the wrong type, uses a feature or an init jlora does not support,
    or sets a field jlora does not know.
    """
    file = Path(directory) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a PEFT adapter directory")
    cfg = read_json(file)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters can be loaded")
    absent = [k for k in ("r", "lora_alpha", "target_modules") if cfg.get(k) is None]
    if absent:
        raise ValueError(f"{file} has no {', '.join(absent)}: the file is incomplete; save the adapter again with "
                         f"PEFT's save_pretrained (or jlora's save_peft)")
    for field, (ok, what) in _FIELDS.items():
        if cfg.get(field) is not None and not ok(cfg[field]):
            raise ValueError(f"{file}: {field} is {cfg[field]!r}, but must be {what}")
    used = [what for field, what in UNSUPPORTED.items() if cfg.get(field)]
    if used:
        raise ValueError(f"{file} uses {', '.join(used)}, which jlora does not support")
    if (error := _init_error(file, cfg.get("init_lora_weights", True))) is not None:
        raise error
    unknown = sorted(k for k, v in cfg.items() if k not in USED | INERT | set(UNSUPPORTED) and v)
    if unknown:
        raise ValueError(f"{file} sets {', '.join(f'{k}={cfg[k]!r}' for k in unknown)}, which jlora does not know "
                         f"(written by PEFT {cfg.get('peft_version', '?')}; jlora knows PEFT 0.21's LoRA fields): "
                         f"it may change what the tensors mean, so jlora does not guess. If it does not, delete it "
                         f"from the file")
    return cfg


def read_weights(file: Path) -> tuple[dict, dict]:
    """`(tensors, jlora metadata)` of `adapter_model.safetensors`: {key: jax array}, and the `{"fused": ...}` that
    `save_peft` records (empty for PEFT's files). A ValueError names the file when it is truncated or not
    safetensors, a tensor is not floating point, or the jlora metadata is damaged."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise FileNotFoundError(f"{file.parent} has no {file.name} (an adapter_model.bin, from "
                                f"safe_serialization=False, is not read: re-save it with safetensors)")
    try:
        with safe_open(file, framework="flax") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            raw = (f.metadata() or {}).get("jlora", "{}")
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}): it is truncated or damaged; copy or "
                         f"save the adapter again") from None
    bad = {k: str(t.dtype) for k, t in tensors.items() if not jnp.issubdtype(t.dtype, jnp.floating)}
    if bad:
        raise ValueError(f"{file} holds tensors that are not floating point: {bad}; LoRA factors and weights are "
                         f"float16 / bfloat16 / float32 / float64: the file is not a LoRA adapter or is damaged")
    try:
        meta = json.loads(raw)
        for spec in meta.get("fused", {}).values():
            mask, r, alpha = spec["enable_lora"], spec["rank"], spec["alpha"]
            if not (isinstance(mask, list) and all(isinstance(x, bool) for x in mask) and any(mask)
                    and _is_int(r) and r > 0 and _is_number(alpha)):
                raise ValueError(spec)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{file}: the 'jlora' metadata ({raw[:120]}) is damaged ({e!r}): save the adapter again "
                         f"with save_peft") from None
    return tensors, meta


def is_peft_dir(path) -> bool:
    """True when `path` holds nothing but the two files of a PEFT adapter (what `save_peft` writes), so replacing
    it loses nothing else."""
    return set(os.listdir(path)) <= {CONFIG_NAME, WEIGHTS_NAME}


def peft_pattern(pattern: dict | None, module: str, default):
    """PEFT's rank/alpha_pattern lookup: the first key that regex-matches a '.'-suffix of the module name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default

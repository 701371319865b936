"""Which modules an adapter file should hold tensors for, and the report of what it misses or holds unused.

A PEFT adapter names its modules in `adapter_config.json` (`target_modules`, `exclude_modules`,
`layers_to_transform`, `modules_to_save`): `peft_targets` selects the modules of the variables that PEFT would
adapt, with PEFT's own matching rules. A loralib state dict names none: a module is expected when it is an adapted
module in another layer (the same name with other layer numbers, `siblings`).

`report` raises a ValueError listing the missing modules and the unused tensors when `strict` (the default), or
warns listing them when `strict=False` (the loader then skips what is unused, as PEFT and torch's
`load_state_dict(strict=False)` do).
"""

from __future__ import annotations

import re
import warnings

PEFT_KINDS = {"kernel", "embedding"}  # the flax leaves of the layers PEFT adapts: Linear, Conv1D, Conv, Embedding
SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # PEFT's 'all-linear' leaves these out for SEQ_CLS models


def layer_modules(leaves) -> dict[str, tuple[str, int]]:
    """`{torch module name: (flax leaf name, ndim)}` of the leaves a LoRA can adapt (kernels, embeddings);
    `leaves` is `[(path, leaf)]`, ndim -1 for a None leaf."""
    out = {}
    for path, w in leaves:
        parts = path.split("/")
        if parts[-1] in PEFT_KINDS and len(parts) > 2:
            out[".".join(parts[1:-1])] = (parts[-1], len(w.shape) if w is not None else -1)
    return out


def _peft_layer_index(cfg: dict, key: str) -> int | None:
    patterns = cfg.get("layers_pattern")
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            if m := re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key):
                break
    return int(m["idx"]) if m else None


def peft_targeted(cfg: dict, key: str) -> bool:
    """PEFT 0.21's `check_target_module_exists`: whether the LoRA of `cfg` (adapter_config.json) adapts the module
    named `key`. `target_modules='all-linear'` is expanded by `peft_targets`."""
    exclude = cfg.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, key):
        return False
    if isinstance(exclude, list) and (key in exclude or any(key.endswith(f".{m}") for m in exclude)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.get("modules_to_save") or []):
        return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = _peft_layer_index(cfg, key)
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def peft_targets(cfg: dict, modules: dict[str, tuple[str, int]]) -> set[str]:
    """The names in `modules` (from `layer_modules`) that PEFT's LoRA of `cfg` adapts. 'all-linear' is every 2-D
    kernel (Linear, GPT-2's Conv1D) but the output layer, as PEFT picks it for a transformers model: `lm_head`, or
    with task_type SEQ_CLS a top-level `score` / `classifier`."""
    if isinstance(cfg["target_modules"], str) and cfg["target_modules"].lower() == "all-linear":
        heads = {"lm_head"} | (set(SEQ_CLS_HEAD_NAMES) if cfg.get("task_type") == "SEQ_CLS" else set())
        linear = [m for m, (kind, ndim) in modules.items() if kind == "kernel" and ndim == 2 and m not in heads
                  and m.rsplit(".", 1)[-1] != "lm_head"]
        cfg = {**cfg, "target_modules": linear}
        return {m for m in linear if peft_targeted(cfg, m)}
    return {m for m in modules if peft_targeted(cfg, m)}


def _generic(module: str) -> str:
    """`transformer.h.3.attn.c_attn` -> `transformer.h.*.attn.c_attn`: the module whatever its layer."""
    return ".".join("*" if part.isdigit() else part for part in module.split("."))


def siblings(adapted: set[str], modules) -> set[str]:
    """The modules that are an `adapted` module in another layer (same name but for the layer numbers)."""
    kinds = {_generic(m) for m in adapted}
    return {m for m in modules if m not in adapted and _generic(m) in kinds}


def _listing(items, limit: int = 8) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def report(source, *, missing, unused: dict[str, str], strict: bool, missing_why: str, fix: str) -> None:
    """Raises a ValueError (`strict`) or warns listing `missing` (module names with no tensors) and `unused`
    ({tensor or module: why nothing uses it}); nothing when both are empty."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} module(s) {missing_why} have no tensors, so they would stay unadapted: "
                     f"{_listing(missing)}")
    if unused:
        parts.append(f"{len(unused)} tensor(s) adapt nothing: " + "; ".join(
            f"{k} ({why})" for k, why in sorted(unused.items())[:8]) + (
            f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
    if not parts:
        return
    if strict:
        raise ValueError(f"{source}: {'; '.join(parts)}. {fix}, or pass strict=False to load the rest with a "
                         f"warning")
    warnings.warn(f"{source}: {'; '.join(parts)}. strict=False: loaded the rest", UserWarning, stacklevel=3)

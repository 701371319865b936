"""Parameter paths: '/'-joined names of pytree leaves, target selection, and sparse nested-dict mirrors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jlora.config import LoraConfig, _suffix_match, path_matches
from jlora.qarray import is_quantized

LORA_KEYS = ("lora_a", "lora_b")
MAGNITUDE = "magnitude"  # DoRA's trained magnitude beside a pair (jlora.variants.dora)
PAIR_KEYS = (*LORA_KEYS, MAGNITUDE)  # every trained leaf of one adapter


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path) -> str:
    """'/'-joined names of a `jax.tree_util` key path; NNX's trailing `.value` is dropped."""
    names = [_key_name(k) for k in path]
    if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] in ("value", "raw_value"):
        names = names[:-1]
    return "/".join(names)


def named_leaves(tree, *, with_none: bool = False) -> list[tuple[str, Any]]:
    """`[(path, leaf), ...]` in flattening order; `with_none` keeps None leaves (the holes of a frozen tree). A
    `QuantizedArray` is one leaf."""
    is_leaf = (lambda x: x is None or is_quantized(x)) if with_none else is_quantized
    return [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def is_weight(path: str, leaf) -> bool:
    """A LoRA candidate: a floating array of at least 2 dims whose name is not `bias`."""
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    return (
        shape is not None and len(shape) >= 2 and jnp.issubdtype(dtype, jnp.floating)
        and path.rsplit("/", 1)[-1] != "bias"
    )


def select_targets(variables, config: LoraConfig) -> list[str]:
    """Paths of the parameters `config.targets` selects (rank_pattern 0 removes one).

    Raises a ValueError listing the candidate weights when nothing matches, or when a predicate picks a leaf
    that cannot carry an adapter.
    """
    leaves = named_leaves(variables)
    candidates = [(p, x) for p, x in leaves if is_weight(p, x)]
    targets = config.targets
    if callable(targets):
        chosen = [p for p, x in leaves if targets(p, x)]
        bad = [p for p in chosen if p not in dict(candidates)]
        if bad:
            raise ValueError(
                f"LoraConfig.targets (a predicate) selected {bad}, which are not weights (floating, >= 2-D, not a "
                f"bias); make the predicate return False for them"
            )
    elif isinstance(targets, str):
        chosen = [p for p, _ in candidates if re.fullmatch(targets, p)]
        if not chosen and any(_suffix_match(p.rsplit("/", 1)[0], targets) for p, _ in candidates):
            raise ValueError(
                f"LoraConfig.targets={targets!r} is a string, so a regex that must fully match a whole parameter "
                f"path, and it matches none; modules named {targets!r} exist: to name modules, pass a tuple, "
                f"targets=({targets!r},)"
            )
    else:
        chosen = [p for p, _ in candidates if any(_suffix_match(p.rsplit("/", 1)[0], t) or _suffix_match(p, t)
                                                   for t in targets)]
        missing = [t for t in targets if not any(_suffix_match(p.rsplit("/", 1)[0], t) or _suffix_match(p, t)
                                                 for p, _ in candidates)]
        if missing and chosen:
            raise ValueError(f"LoraConfig.targets {missing} match no weight; {_candidates_text(candidates)}")
    _check_pattern_keys(config, chosen)
    chosen = [p for p in chosen if config.rank_for(p) > 0]
    if not chosen:
        raise ValueError(f"LoraConfig.targets={targets!r} selects no parameter; {_candidates_text(candidates)}")
    return chosen


def _check_pattern_keys(config: LoraConfig, chosen: list[str]):
    """A ValueError listing the targets when a rank_pattern, alpha_pattern or fused key matches none of them."""
    unused = [f"{name}[{key!r}]" for name in ("rank_pattern", "alpha_pattern", "fused")
              for key, _ in getattr(config, name) if not any(path_matches(p, key) for p in chosen)]
    if unused and chosen:
        listed = ", ".join(chosen[:40]) + (f" and {len(chosen) - 40} more" if len(chosen) > 40 else "")
        raise ValueError(
            f"LoraConfig {', '.join(unused)} match no target, so they would be ignored; a key is a module name "
            f"(a '/'-suffix of the path) or a regex that fully matches a target path. The targets are: {listed}"
        )


def _candidates_text(candidates) -> str:
    listed = ", ".join(f"{p} {tuple(x.shape)}" for p, x in candidates[:40])
    more = f" and {len(candidates) - 40} more" if len(candidates) > 40 else ""
    return f"the candidate weights are: {listed}{more}" if candidates else "the variables hold no weights at all"


def trains_in_full(path: str, config: LoraConfig, lora_modules: set[str]) -> bool:
    """True for a leaf that trains in full: under `modules_to_save`, or a bias per `config.bias` (for
    'lora_only', a bias whose module is in `lora_modules`)."""
    module, _, name = path.rpartition("/")
    if any(path_matches(path, m) or under(path, m) for m in config.modules_to_save):
        return True
    return name == "bias" and (config.bias == "all" or (config.bias == "lora_only" and module in lora_modules))


def trained_in_full(variables, config: LoraConfig, targets: list[str]) -> list[str]:
    """Paths of leaves that train in full: biases per `config.bias`, and every leaf under `modules_to_save`.

    In linen variables (a top-level "params" collection) only parameters train: a saved module's `batch_stats`
    stay in the frozen tree, where `model.apply(..., mutable=["batch_stats"])` updates them, instead of reaching the
    optimizer (which would decay them)."""
    leaves = named_leaves(variables, with_none=True)
    modules = {t.rpartition("/")[0] for t in targets}
    linen = isinstance(variables, Mapping) and "params" in variables
    out = [path for path, _ in leaves
           if trains_in_full(path, config, modules) and not (linen and not path.startswith("params/"))]
    unmatched = [m for m in config.modules_to_save if not any(path_matches(p, m) or under(p, m) for p, _ in leaves)]
    if unmatched:
        mods = sorted({p.rsplit("/", 1)[0] for p, _ in leaves if "/" in p})
        raise ValueError(f"LoraConfig.modules_to_save {unmatched} match no module; the modules are: {mods[:40]}")
    clash = sorted(set(out) & set(targets))
    if clash:
        raise ValueError(f"{clash} are both LoRA targets and trained in full (modules_to_save); choose one")
    return out


def under(path: str, module: str) -> bool:
    """True where some '/'-prefix of `path` is named by `module` (suffix or regex)."""
    parts = path.split("/")
    return any(path_matches("/".join(parts[:i]), module) for i in range(1, len(parts)))


def nest(flat: Mapping[str, Any]) -> dict:
    """`{"a/b/c": x}` -> `{"a": {"b": {"c": x}}}`."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return out


def flatten_adapters(adapters) -> tuple[dict[str, dict], dict[str, Any]]:
    """Splits an adapter tree into `{path: {"lora_a", "lora_b"}}` pairs and `{path: array}` full leaves.

    A mapping holding `lora_a` or `lora_b` is a pair (with DoRA also a `magnitude`, kept in the pair's dict): one
    that lacks either, or holds another key, raises a ValueError naming its path."""
    pairs: dict[str, dict] = {}
    full: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping) and set(node) & set(LORA_KEYS):
            missing = [k for k in LORA_KEYS if k not in node]
            extra = sorted(str(k) for k in node if k not in PAIR_KEYS)
            if missing or extra:
                what = "; ".join(([f"{' and '.join(missing)} missing"] if missing else [])
                                 + ([f"extra {extra}"] if extra else []))
                raise ValueError(
                    f"the lora pair at {prefix or '<root>'!r} must hold exactly lora_a and lora_b (and a DoRA "
                    f"magnitude), found "
                    f"{sorted(str(k) for k in node)} ({what}); rebuild it as {{'lora_a': ..., 'lora_b': ...}} "
                    f"(lora.init makes it)"
                )
            pairs[prefix] = dict(node)
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        elif node is not None:
            full[prefix] = node

    walk(adapters, "")
    return pairs, full

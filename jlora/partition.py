"""Partitioning variables into the frozen base and the leaves trained in full, and putting them back."""

from __future__ import annotations

import jax

from jlora.config import LoraConfig
from jlora.paths import PAIR_KEYS, flatten_adapters, nest, path_str, select_targets, trained_in_full, trains_in_full


def split(variables, config: LoraConfig, *, targets: list[str] | None = None) -> tuple[object, dict]:
    """`(frozen, trainable)`: frozen is `variables` with the leaves trained in full (biases per `config.bias`,
    `modules_to_save`) set to None; trainable is a nested dict of those leaves. `combine` inverts it."""
    if targets is None:
        targets = select_targets(variables, config)
    full = set(trained_in_full(variables, config, targets))
    frozen = jax.tree_util.tree_map_with_path(lambda p, x: None if path_str(p) in full else x, variables)
    trainable = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(variables)[0] if path_str(p) in full}
    return frozen, nest(trainable)


def combine(frozen, adapters) -> object:
    """The variables again: the None leaves of `frozen` filled from the arrays in `adapters` (its lora pairs are
    not applied here; `merge` does that). Raises if an adapter array has no place in `frozen`."""
    _, full = flatten_adapters(adapters)
    used = set()

    def fill(path, leaf):
        p = path_str(path)
        if leaf is None and p in full:
            used.add(p)
            return full[p]
        return leaf

    out = jax.tree_util.tree_map_with_path(fill, frozen, is_leaf=lambda x: x is None)
    extra = sorted(set(full) - used)
    if extra:
        raise ValueError(f"the adapters hold arrays at {extra}, which are not None slots of the frozen tree; "
                         f"were these adapters made for another model or config?")
    return out


def trainable_mask(tree, config: LoraConfig | None = None):
    """A bool pytree like `tree`: True at `lora_a`/`lora_b` (and DoRA `magnitude`) leaves, and (with a config) at
    leaves that train in full: every bias with bias='all', a bias beside a lora pair with bias='lora_only', leaves
    under `modules_to_save`. Works on an adapters tree, on `(frozen, adapters)`, or on any tree holding lora pairs."""
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    lora_modules = {p.rsplit("/", 2)[0] for p in paths if p.rsplit("/", 1)[-1] in PAIR_KEYS and p.count("/") >= 2}

    def is_trainable(path, leaf):
        p = path_str(path)
        if p.rpartition("/")[2] in PAIR_KEYS:
            return True
        return config is not None and trains_in_full(p, config, lora_modules)

    return jax.tree_util.tree_map_with_path(is_trainable, tree)

"""Checking adapters against a config and a model's variables: every pair's rank and layout, every target covered,
every leaf trained in full present. `apply`, `merge`, `unmerge` and `save_adapters` call these, so adapters used
with a config they were not made for raise instead of giving a silently wrong scale.

Shapes: a pair on a weight W = P + A + B (see `jlora.layout`) is lora_a `P + A + (e * r,)` and lora_b
`P + (r,) + B'` (e enabled slices of a fused mask, else 1; B' = B, or the e enabled slices of a fused output axis),
with r = `config.rank_for(path)`. All checks read shapes only, so they run on arrays, tracers or ShapeDtypeStructs.
"""

from __future__ import annotations

import math
import warnings

import jax

from jlora.config import LoraConfig
from jlora.layout import Layout, read_layout
from jlora.paths import MAGNITUDE, flatten_adapters, named_leaves, path_str, select_targets, trained_in_full
from jlora.qarray import is_quantized

FIX = ("use the config saved with the adapters: adapters, config = load_adapters(...); lora = lora_transform(fn, "
       "config) (or re-run lora.init with this config)")


class RankWarning(UserWarning):
    """A LoRA rank above min(in, out) of its weight: the pair has more parameters than a full update, no more
    expressive power."""


def _listed(paths, limit: int = 20) -> str:
    paths = sorted(paths)
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _source(config: LoraConfig, field: str, path: str, default: str) -> str:
    key = config.pattern_key(field, path)
    return default if key is None else f"config.{field}[{key!r}]"


def _want(config: LoraConfig, path: str) -> str:
    r, mask = config.rank_for(path), config.fused_for(path)
    text = f"rank {r} ({_source(config, 'rank_pattern', path, f'config.rank={config.rank}')})"
    if mask:
        text += (f" on each of the {sum(mask)} enabled slices of the fused mask {mask} "
                 f"({_source(config, 'fused', path, '')}), so lora_a's last axis {sum(mask) * r}")
    return text


def _pair_problem(path: str, a, b, config: LoraConfig) -> str | None:
    """What is wrong with one pair's rank against the config, or None."""
    shapes = f"lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)}"
    r, mask = config.rank_for(path), config.fused_for(path)
    if r == 0:
        return (f"{path}: {shapes}, but {_source(config, 'rank_pattern', path, 'config.rank')} gives it rank 0 "
                f"(no adapter); drop the pair, or the rank_pattern entry")
    e = sum(mask) if mask else 1
    # lora_b's rank axis follows the prefix P that lora_a and lora_b share
    b_ranks = [b.shape[p] for p in range(min(len(a.shape), len(b.shape)) - 1)
               if tuple(a.shape[:p]) == tuple(b.shape[:p])]
    if a.shape[-1] == e * r and r in b_ranks:
        return None
    if not mask and a.shape[-1] in b_ranks:
        got = f"rank-{a.shape[-1]} adapters"
    elif mask and a.shape[-1] % e == 0 and a.shape[-1] // e in b_ranks:
        got = f"rank-{a.shape[-1] // e} fused adapters"
    elif a.shape[-1] in b_ranks or r in b_ranks:
        got = f"adapters with lora_a's last axis {a.shape[-1]} (a {'different' if mask else 'fused'} layout?)"
    else:
        got = "adapters whose rank axes disagree"
    return f"{path}: {shapes} are {got}, but the config gives {_want(config, path)}"


def _dora_problem(path: str, pair: dict, config: LoraConfig) -> str | None:
    """A pair's DoRA magnitude against `config.dora`: present exactly when DoRA is on."""
    if config.dora and MAGNITUDE not in pair:
        return (f"{path}: config.dora is True but the pair has no 'magnitude' (DoRA's trained magnitude): these "
                f"adapters were made with dora=False")
    if not config.dora and MAGNITUDE in pair:
        return (f"{path}: the pair holds a DoRA 'magnitude' {tuple(getattr(pair[MAGNITUDE], 'shape', ()))} but "
                f"config.dora is False: these adapters were made with dora=True")
    return None


def check_pairs(adapters, config: LoraConfig) -> None:
    """Raises a ValueError naming every lora pair of `adapters` that is malformed (not exactly lora_a and
    lora_b, or not arrays of >= 2 dims) or whose rank is not `config.rank_for(path)` (times the enabled
    slices of `config.fused_for(path)`), or that sits where rank_pattern gives rank 0."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jlora.LoraConfig, got {type(config).__name__}")
    pairs, _ = flatten_adapters(adapters)
    problems = []
    for path, pair in sorted(pairs.items()):
        a, b = pair["lora_a"], pair["lora_b"]
        bad = [k for k, x in pair.items() if len(getattr(x, "shape", ())) < 2]
        if bad:
            problems.append(f"{path}: {' and '.join(bad)} must be arrays of at least 2 dims, got "
                            + ", ".join(f"{k} {type(x).__name__} {getattr(x, 'shape', '')}" for k, x in pair.items()))
        elif problem := _pair_problem(path, a, b, config) or _dora_problem(path, pair, config):
            problems.append(problem)
    if problems:
        raise ValueError("the adapters do not match the config:\n  " + "\n  ".join(problems) + f"\n{FIX}")


def _pure(variables):
    """An NNX `State` as its pure dict; anything else unchanged."""
    from flax import nnx

    return nnx.to_pure_dict(variables) if isinstance(variables, nnx.State) else variables


def check_adapters(variables, adapters, config: LoraConfig) -> None:
    """`check_pairs`, and against `variables` (the full tree, or the frozen one with None at the leaves trained
    in full; an NNX State is read as its pure dict): every target `config` selects has a pair, every pair sits
    on a selected target and fits its weight (`layout.read_layout`), and every leaf `config` trains in full
    (biases per `config.bias`, `modules_to_save`) is in `adapters` with its weight's shape, and no other.
    Raises a ValueError naming the paths, the shapes, the config value and the fix. Shapes only: jit-safe."""
    check_pairs(adapters, config)
    pairs, full = flatten_adapters(adapters)
    leaves = dict(named_leaves(_pure(variables), with_none=True))
    for path, leaf in leaves.items():
        if is_quantized(leaf):
            leaf.check(path)
    unknown = sorted(p for p in set(pairs) | set(full) if p not in leaves)
    if unknown:
        raise ValueError(f"adapters at {unknown} have no parameter of that path in the variables; were they made "
                         f"for another model? The parameters are: {_listed(leaves, 40)}")
    # the frozen tree's None slots filled from the adapters, so targets are selected as lora.init selected them
    filled = jax.tree_util.tree_map_with_path(lambda p, x: full.get(path_str(p)) if x is None else x,
                                              _pure(variables), is_leaf=lambda x: x is None)
    targets = select_targets(filled, config)
    missing = [t for t in targets if t not in pairs]
    if missing:
        raise ValueError(f"the config (targets={config.targets!r}) selects {_listed(missing)}, but the adapters have "
                         f"no lora pair there (they have pairs at: {_listed(pairs) or 'none'}); {FIX}")
    untargeted = sorted(set(pairs) - set(targets))
    if untargeted:
        raise ValueError(f"the adapters have lora pairs at {_listed(untargeted)}, which the config "
                         f"(targets={config.targets!r}) does not target; {FIX}")
    expected = trained_in_full(filled, config, targets)
    absent = [p for p in expected if p not in full]
    if absent:
        raise ValueError(f"the config trains {_listed(absent)} in full (bias={config.bias!r}, modules_to_save="
                         f"{config.modules_to_save!r}), but the adapters lack them; pass the adapters tree lora.init "
                         f"made (lora pairs and the leaves trained in full), or {FIX}")
    extra = sorted(set(full) - set(expected))
    if extra:
        raise ValueError(f"the adapters hold arrays at {_listed(extra)}, which the config (bias={config.bias!r}, "
                         f"modules_to_save={config.modules_to_save!r}) does not train in full; {FIX}")
    wrong = [f"{p}: adapters {tuple(full[p].shape)}, variables {tuple(leaves[p].shape)}" for p in sorted(full)
             if leaves[p] is not None and tuple(getattr(full[p], "shape", ())) != tuple(leaves[p].shape)]
    if wrong:
        raise ValueError("the adapters' leaves trained in full do not have their parameters' shapes:\n  "
                         + "\n  ".join(wrong) + "\nwere the adapters made for another model?")
    for path in targets:
        w, pair = leaves[path], pairs[path]
        lay = read_layout(path, w.shape, pair["lora_a"].shape, pair["lora_b"].shape, config.fused_for(path))
        if MAGNITUDE in pair:
            from jlora.variants.dora import read_normed

            read_normed(path, lay, pair[MAGNITUDE].shape)


def warn_rank(path: str, layout: Layout) -> None:
    """Warns (`RankWarning`) where the rank exceeds min(in, out) of the weight: in = the product of the axes
    lora_a covers (A), out = the product of the output axes (B, all slices of a fused one)."""
    fan_in = math.prod(layout.shape[i] for i in layout.a_idx)
    fan_out = math.prod(layout.shape[i] for i in layout.b_idx)
    if layout.rank > min(fan_in, fan_out):
        warnings.warn(f"jlora: rank {layout.rank} at {path} exceeds min(in, out) = min({fan_in}, {fan_out}) of its "
                      f"weight {layout.shape}: the pair has more parameters than a full update of W and no more "
                      f"expressive power; use rank <= {min(fan_in, fan_out)} there (rank_pattern)", RankWarning,
                      stacklevel=3)

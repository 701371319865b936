"""Stacking K adapters on a leading axis, ranks padded to one, and unstacking them (see `jlora.multi`).

Padding: at a target whose padded rank is R, an adapter of rank r < R gets R - r zero columns of lora_a (its last
axis; for a fused pair, per enabled slice, `jlora.layout`) and R - r zero rows of lora_b (its axis after the prefix
P). `(x @ a) @ b` is unchanged, and the padded slots get zero gradients (their rows of b multiply nothing but
zeros, their columns of a feed only zero rows of b), so SGD, Adam and AdamW (decay of zero is zero) keep them zero.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import LoraConfig
from jlora.layout import read_layout
from jlora.paths import flatten_adapters, named_leaves, nest
from jlora.validate import check_pairs
from jlora.variants.dora import check_unrouted


def exact(path: str) -> str:
    """A `LoraConfig` pattern key naming exactly `path` (a regex that cannot match as a '/'-suffix)."""
    return f"(?:{re.escape(path)})"


@dataclasses.dataclass(frozen=True)
class StackedConfig:
    """The static side of a stack: the K configs, the padded rank R and lora_b's rank axis (the length of the
    prefix P, without the stack axis) per target path, and whether the scales were folded into lora_a. Frozen and
    hashable: it goes into jit closures. Made by `stack`."""

    configs: tuple[LoraConfig, ...]
    ranks: tuple[tuple[str, int], ...]  # (path, R), sorted by path
    rank_axes: tuple[tuple[str, int], ...]  # (path, lora_b's rank axis in one adapter)
    folded: bool = False

    @property
    def size(self) -> int:
        """K, the number of adapters."""
        return len(self.configs)

    def scales(self) -> dict[str, np.ndarray]:
        """`{path: float32 (K,)}`: each adapter's own scale there (alpha / r, rsLoRA, alpha_pattern)."""
        return {p: np.array([c.scale_for(p) for c in self.configs], np.float32) for p, _ in self.ranks}

    def unit_config(self) -> LoraConfig:
        """The config the stack runs under, one adapter at a time: the targets exactly, each at its padded rank
        with scale exactly 1 (alpha = R), dropout, bias, modules_to_save and fused masks of the K configs (which
        agree). Two stacks whose unit configs are equal run in the same compiled program."""
        c, ranks = self.configs[0], dict(self.ranks)
        fused = {exact(p): c.fused_for(p) for p in ranks if c.fused_for(p)}
        top = max(ranks.values())
        return LoraConfig(rank=top, alpha=float(top), targets="|".join(re.escape(p) for p in sorted(ranks)),
                          dropout=c.dropout, bias=c.bias, modules_to_save=c.modules_to_save, dtype=c.dtype,
                          rank_pattern={exact(p): r for p, r in ranks.items()},
                          alpha_pattern={exact(p): float(r) for p, r in ranks.items()}, fused=fused)


def _pad(a, b, r: int, big: int, e: int, axis: int):
    """(a, b) of rank r padded to rank `big`: zero columns of a per enabled slice (e of them), zero rows of b."""
    if r == big:
        return a, b
    lead = a.shape[:-1]
    a = jnp.pad(a.reshape(*lead, e, r), [(0, 0)] * (len(lead) + 1) + [(0, big - r)]).reshape(*lead, e * big)
    b = jnp.pad(b, [(0, big - r) if i == axis else (0, 0) for i in range(b.ndim)])
    return a, b


def _cut(a, b, r: int, big: int, e: int, axis: int):
    """The inverse of `_pad`: (a, b, the padded slots of a and b)."""
    lead = a.shape[:-1]
    a = a.reshape(*lead, e, big)
    index = (slice(None),) * axis
    return (a[..., :r].reshape(*lead, e * r), b[(*index, slice(0, r))], [a[..., r:], b[(*index, slice(r, None))]])


def _rank_axis(path: str, shapes, ranks, big: int, fused, frozen) -> int:
    """lora_b's rank axis at `path` (the prefix length), from the shapes `[(a, b), ...]` of all K adapters (of
    ranks `ranks`, padded to `big`)."""
    a0, b0 = shapes[0]
    if fused:
        return len(b0) - 2
    if frozen is not None:
        w = dict(named_leaves(frozen)).get(path)
        if w is None:
            raise ValueError(f"stack: frozen has no weight at {path!r}, where the adapters have a lora pair; pass the "
                             f"frozen tree of the model the adapters were made for")
        return read_layout(path, w.shape, a0, b0).n_prefix
    options = [p for p in range(min(len(a0), len(b0)) - 1)
               if all(b[p] == r and a[:p] == b[:p] for (a, b), r in zip(shapes, ranks))]
    if not options:
        raise ValueError(f"stack: at {path!r} the adapters' lora_a / lora_b shapes {shapes} do not share one layout "
                         f"(prefix, then the rank): adapters made for different models?")
    if len(options) > 1 and min(ranks) < big:  # an ambiguity matters only where something is padded
        raise ValueError(f"stack: at {path!r} lora_b {b0} could hold the rank on axis {options[0]} or {options[1]} "
                         f"(a stacked prefix as long as the rank); pass frozen= (the frozen tree) so the layout is "
                         f"read from the weight's shape")
    return options[0]


def _agree(flats, configs):
    """ValueErrors naming what differs between the K adapter trees and configs."""
    names = [(set(pairs), set(full)) for pairs, full in flats]
    for k, (pairs, full) in enumerate(names[1:], 1):
        for what, mine, first in (("lora pairs", pairs, names[0][0]), ("leaves trained in full", full, names[0][1])):
            if mine != first:
                raise ValueError(f"stack: adapters[{k}] and adapters[0] differ in their {what}: only in adapters[{k}]: "
                                 f"{sorted(mine - first)}; only in adapters[0]: {sorted(first - mine)}; stack adapters "
                                 f"of configs that select the same targets (and bias / modules_to_save)")
    rates = sorted({c.dropout for c in configs})
    if len(rates) > 1:
        raise ValueError(f"stack: the configs have dropout rates {rates}, but a stack runs one rate (a static "
                         f"setting of the program); stack adapters of equal LoraConfig.dropout together")
    for path in sorted(names[0][0]):
        masks = {c.fused_for(path) for c in configs}
        if len(masks) > 1:
            raise ValueError(f"stack: the configs give {path!r} different fused masks {sorted(map(str, masks))}")
    for path, x in flats[0][1].items():
        for k, (_, full) in enumerate(flats[1:], 1):
            if (tuple(full[path].shape), full[path].dtype) != (tuple(x.shape), x.dtype):
                raise ValueError(f"stack: adapters[{k}] at {path!r} is {full[path].dtype}{tuple(full[path].shape)}, "
                                 f"adapters[0] {x.dtype}{tuple(x.shape)}: adapters made for another model?")


def stack(adapters_list, configs, *, max_rank: int | None = None, fold_scales: bool = False, frozen=None):
    """`(stacked, StackedConfig)`: K adapter trees (as `lora.init` makes them) and their K `LoraConfig`s, every
    array stacked on a new leading axis K, each lora pair padded to the largest rank at its path (or `max_rank`).

    The configs must agree on the targets (the same pair paths), the leaves trained in full, the dropout rate and
    fused masks; ranks, alphas, alpha/rank patterns and scaling may differ: each adapter keeps its own scale.
    `fold_scales=True` multiplies each lora_a by its scale now (for serving and hot swap: see `jlora.multi`); leave
    it False to train. `frozen` (the frozen tree) is needed only where lora_b's rank axis is ambiguous from the
    shapes (a scanned layer count equal to the rank); a ValueError says so. Shapes: lora_a `(K,) + P + A + (e*R,)`,
    lora_b `(K,) + P + (R,) + B`, a leaf trained in full `(K,) + its shape`; dtypes kept."""
    adapters_list, configs = list(adapters_list), tuple(configs)
    if not adapters_list or len(adapters_list) != len(configs):
        raise ValueError(f"stack needs one config per adapters tree and at least one of each, got "
                         f"{len(adapters_list)} adapters trees and {len(configs)} configs")
    for k, (tree, config) in enumerate(zip(adapters_list, configs)):
        if not isinstance(config, LoraConfig):
            raise TypeError(f"stack: configs[{k}] must be a jlora.LoraConfig, got {type(config).__name__}")
        try:
            check_pairs(tree, config)
        except ValueError as e:
            raise ValueError(f"stack: adapters[{k}] do not match configs[{k}]: {e}") from None
    flats = [flatten_adapters(tree) for tree in adapters_list]
    for flat in flats:
        check_unrouted(flat[0])  # DoRA: a ValueError (jlora.variants.dora)
    _agree(flats, configs)
    spec = []
    for path in sorted(flats[0][0]):
        own = tuple(c.rank_for(path) for c in configs)
        big = max(own) if max_rank is None else max_rank
        if big < max(own):
            raise ValueError(f"stack: max_rank={max_rank} is below the rank {max(own)} of adapters["
                             f"{own.index(max(own))}] at {path!r}; pass max_rank >= {max(own)} (or None: the "
                             f"largest rank)")
        pairs = [f[0][path] for f in flats]
        shapes = [(tuple(p["lora_a"].shape), tuple(p["lora_b"].shape)) for p in pairs]
        mask = configs[0].fused_for(path)
        e, axis = sum(mask) if mask else 1, _rank_axis(path, shapes, own, big, mask, frozen)
        padded = [(a[:-1], b[:axis] + b[axis + 1:], p["lora_a"].dtype, p["lora_b"].dtype)
                  for (a, b), p in zip(shapes, pairs)]
        for k in range(1, len(pairs)):
            if padded[k] != padded[0]:
                raise ValueError(f"stack: at {path!r} adapters[{k}] (lora_a {shapes[k][0]}, lora_b {shapes[k][1]}, "
                                 f"{padded[k][2]}) differ from adapters[0] (lora_a {shapes[0][0]}, lora_b "
                                 f"{shapes[0][1]}, {padded[0][2]}) in more than the rank: made for another model?")
        spec.append((path, own, big, e, axis))
    sc = StackedConfig(configs, tuple((p, big) for p, _, big, _, _ in spec), tuple((p, ax) for p, *_, ax in spec),
                       fold_scales)
    scales = np.stack(list(sc.scales().values()), axis=1) if fold_scales else None  # (K, paths)
    out = _build([{p: (f[0][p]["lora_a"], f[0][p]["lora_b"]) for p, *_ in spec} for f in flats],
                 [f[1] for f in flats], tuple(spec), scales)
    return nest(out), sc


@functools.partial(jax.jit, static_argnums=2)
def _build(pairs, full, spec, scales):
    """The flat stacked tree `{path/lora_a: ..., path/lora_b: ..., full path: ...}` (one program for all)."""
    out = {}
    for j, (path, own, big, e, axis) in enumerate(spec):
        pads = [_pad(*p[path], r, big, e, axis) for p, r in zip(pairs, own)]
        if scales is not None:
            pads = [((a * scales[k, j]).astype(a.dtype), b) for k, (a, b) in enumerate(pads)]
        out[f"{path}/lora_a"] = jnp.stack([a for a, _ in pads])
        out[f"{path}/lora_b"] = jnp.stack([b for _, b in pads])
    for path in full[0]:
        out[path] = jnp.stack([f[path] for f in full])
    return out


def unstack(stacked, stacked_config: StackedConfig) -> list[tuple[dict, LoraConfig]]:
    """`[(adapters, config), ...]`, one per stacked adapter at its own rank: the exact inverse of `stack` (bit for
    bit; a folded stack divides lora_a by the scale again, exact for power-of-two scales, else within an ulp),
    ready for `save_adapters`, `merge`, `save_peft`. The padded slots must still be zero (they are after training
    with SGD / Adam / AdamW); non-zero ones would be lost, so concrete arrays are checked and a ValueError names
    them. Non-finite ones are not an error: they come from a diverged adapter (a gradient that was not finite
    reaches its padded slots too, as 0 * nan), whose own slots are returned as they are."""
    sc = stacked_config
    pairs, full = check_stacked(stacked, sc)
    ranks, axes = dict(sc.ranks), dict(sc.rank_axes)
    spec = []
    for path in sorted(pairs):
        mask = sc.configs[0].fused_for(path)
        spec.append((path, tuple(c.rank_for(path) for c in sc.configs), ranks[path], sum(mask) if mask else 1,
                     axes[path]))
    scales = np.stack(list(sc.scales().values()), axis=1) if sc.folded else None
    flats, padded = _unbuild({p: (v["lora_a"], v["lora_b"]) for p, v in pairs.items()}, full, tuple(spec), scales)
    for (k, path), most in padded.items():
        if not isinstance(most, jax.core.Tracer) and float(most) != 0:
            r = sc.configs[k].rank_for(path)
            raise ValueError(f"unstack: adapter {k} at {path!r} has rank {r} but non-zero values (max |x| = "
                             f"{float(most):.3g}) in its padded slots {r}..{ranks[path] - 1}, which unstack would "
                             f"drop; they stay zero under SGD / Adam / AdamW: do not add noise or initialise them")
    return [(nest(flat), config) for flat, config in zip(flats, sc.configs)]


@functools.partial(jax.jit, static_argnums=2)
def _unbuild(pairs, full, spec, scales):
    """K flat adapter trees at their own ranks, and `{(k, path): max |x| over adapter k's padded slots}`."""
    flats, padded = [{p: x[k] for p, x in full.items()} for k in range(len(spec[0][1]))], {}
    for j, (path, own, big, e, axis) in enumerate(spec):
        for k, r in enumerate(own):
            a, b, rest = _cut(pairs[path][0][k], pairs[path][1][k], r, big, e, axis)
            if r < big:
                padded[k, path] = jnp.maximum(*(jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0)) for x in rest))
            if scales is not None:
                a = (a / scales[k, j]).astype(a.dtype)
            flats[k][f"{path}/lora_a"], flats[k][f"{path}/lora_b"] = a, b
    return flats, padded


def check_stacked(stacked, sc: StackedConfig):
    """`flatten_adapters(stacked)` after checking that the stack has `sc`'s paths, padded ranks and K leading."""
    pairs, full = flatten_adapters(stacked)
    ranks, axes = dict(sc.ranks), dict(sc.rank_axes)
    if set(pairs) != set(ranks):
        raise ValueError(f"the stacked adapters have lora pairs at {sorted(pairs)}, but the StackedConfig at "
                         f"{sorted(ranks)}: use the StackedConfig that stack() returned with these adapters")
    wrong = [f"{p}: {tuple(x.shape)}" for p, x in
             [*((f"{p}/{n}", v) for p, pair in pairs.items() for n, v in pair.items()), *full.items()]
             if not x.shape or x.shape[0] != sc.size]
    for p, pair in pairs.items():
        b = pair["lora_b"].shape
        if len(b) > 1 + axes[p] and b[1 + axes[p]] != ranks[p]:
            wrong.append(f"{p}/lora_b {tuple(b)}: rank {b[1 + axes[p]]} on axis {1 + axes[p]}, padded rank {ranks[p]}")
    if wrong:
        raise ValueError(f"the stacked adapters do not fit their StackedConfig (K = {sc.size} adapters leading, "
                         f"padded ranks {dict(sc.ranks)}): {'; '.join(wrong[:10])}")
    return pairs, full

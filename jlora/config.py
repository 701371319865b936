"""`LoraConfig`: the static hyperparameters of a LoRA adaptation, and the one place the scale is computed."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp

Predicate = Callable[[str, Any], bool]

BIAS_MODES = ("none", "all", "lora_only")
SCALINGS = ("alpha_over_r", "rslora")
INITS = ("loralib", "gaussian", "pissa", "olora")  # and "pissa_niter_<K>" (jlora.variants.init)


def _frozen_items(name: str, value: Any, kind: str) -> tuple[tuple[str, Any], ...]:
    """Turns a mapping (or a tuple of pairs) into a sorted tuple of pairs, so the config stays hashable."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        raise TypeError(f"LoraConfig.{name} must be a mapping of name -> {kind}, got the string {value!r}")
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = tuple((k, v) for k, v in items)
    except (TypeError, ValueError):
        raise TypeError(f"LoraConfig.{name} must be a mapping of name -> {kind}, got {value!r}") from None
    bad = [k for k, _ in pairs if not isinstance(k, str) or not k]
    if bad:
        raise TypeError(f"LoraConfig.{name} keys must be non-empty module names or regexes (str), got {bad!r}")
    return tuple(sorted(pairs))


def _real(name: str, value, *, integer: bool = False):
    """`value` as a Python int / float (numpy scalars accepted); a TypeError naming the field for a non-number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        what = "an int" if integer else "a number"
        hint = f" (write {name}={value.strip()}, a number, not a string)" if _numeric(value) else ""
        raise TypeError(f"LoraConfig.{name} must be {what}, got {type(value).__name__} {value!r}{hint}")
    if integer and isinstance(value, numbers.Integral):
        return int(value)
    return value.item() if hasattr(value, "item") else value


def _numeric(value) -> bool:
    try:
        float(value) if isinstance(value, str) else None
    except ValueError:
        return False
    return isinstance(value, str)


def _fused_mask(key: str, value) -> tuple[bool, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"LoraConfig.fused[{key!r}] must be a tuple of bools, one per slice of the fused output "
                        f"axis (e.g. (True, False, True) for q, v of q|k|v), got {value!r}")
    mask = tuple(value)
    if not all(isinstance(e, (bool, numbers.Integral)) and e in (0, 1) for e in mask):
        raise TypeError(f"LoraConfig.fused[{key!r}] must hold bools (or 0/1), got {value!r}")
    return tuple(bool(e) for e in mask)


def _suffix_match(path: str, name: str) -> bool:
    """True where `name` is a trailing run of '/'-separated components of `path` (PEFT's suffix rule)."""
    return path == name or path.endswith("/" + name)


def path_matches(path: str, pattern: str) -> bool:
    """True where `pattern` names `path`: a component suffix of the leaf path or of its module path, or a regex
    that fully matches either."""
    module = path.rsplit("/", 1)[0] if "/" in path else ""
    for candidate in (path, module):
        if candidate and (_suffix_match(candidate, pattern) or re.fullmatch(pattern, candidate)):
            return True
    return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Static LoRA hyperparameters; frozen and hashable, so it can be a `jit` static argument.

    Attributes:
      rank: r, the inner dimension of the update `a @ b` (loralib `r`).
      alpha: loralib's `lora_alpha`; the update is scaled by `alpha / rank` (or `alpha / sqrt(rank)`, rsLoRA).
      targets: which parameters get an adapter. A tuple of names matched as '/'-component suffixes of the module
        path, like PEFT's `target_modules` (`("query", "value")`); a single string, a regex that must fully match
        the '/'-joined parameter path (`"params/.*/(query|value)/kernel"`); or a predicate `(path, leaf) -> bool`.
        Only weights (floating, at least 2-D, not named `bias`) are candidates.
      dropout: dropout rate on the LoRA branch input only (loralib's `lora_dropout`).
      bias: which biases also train in full: 'none', 'all' (every leaf named bias), or 'lora_only' (biases of
        modules that carry an adapter), loralib's `mark_only_lora_as_trainable(bias=...)`.
      scaling: 'alpha_over_r' (LoRA) or 'rslora' (alpha / sqrt(r), Kalajdzievski 2023).
      rank_pattern: per-target rank overrides `{name_or_regex: rank}`; a rank of 0 removes that target.
      alpha_pattern: per-target alpha overrides `{name_or_regex: alpha}`.
      modules_to_save: module names (suffix or regex) whose every leaf trains in full, e.g. a classifier head.
      fused: per-target enable masks for fused projections, loralib's MergedLinear `enable_lora`:
        `{"c_attn": (True, False, True)}` splits c_attn's output axis into 3 equal slices and gives q and v their
        own rank-r pair each, k none.
      init: 'loralib' (input-side factor U(-1/sqrt(fan_in), 1/sqrt(fan_in)), output side zeros; embeddings:
        looked-up side zeros, other side N(0, 1)) or 'gaussian' (PEFT's: input side N(0, 1/r^2)); or one that
        rewrites the base (jlora.variants.init): 'pissa' (the r principal singular directions of each target, PEFT's
        `init_lora_weights="pissa"`), 'pissa_niter_<K>' (the same by randomized SVD, K subspace iterations, from
        `lora.init`'s key) or 'olora' (a QR factorisation); `lora.init` then returns the residual W - s*A*B in
        `frozen`, so the output is unchanged at step 0.
      dtype: dtype of the adapter factors. None (the default) makes them float32 whatever the base dtype (a
        float64 base keeps float64): a master copy, cast to the weight's dtype where it is used, as PEFT's
        `autocast_adapter_dtype`; so a bfloat16 base trains float32 adapters with float32 optimizer moments.
      dora: DoRA (Liu et al. 2024; PEFT's `use_dora`): each adapted weight becomes `m * (W + scale * a @ b) /
        ||W + scale * a @ b||`, column norms over the input axes (treated as constants in the backward pass), with a
        trained `magnitude` m beside lora_a / lora_b, initialised to ||W|| (`jlora.variants.dora`).
    """

    rank: int = 8
    alpha: float = 1.0
    targets: tuple[str, ...] | str | Predicate = ()
    dropout: float = 0.0
    bias: str = "none"
    scaling: str = "alpha_over_r"
    rank_pattern: Mapping[str, int] | tuple = ()
    alpha_pattern: Mapping[str, float] | tuple = ()
    modules_to_save: tuple[str, ...] = ()
    fused: Mapping[str, tuple[bool, ...]] | tuple = ()
    init: str = "loralib"
    dtype: Any = None
    dora: bool = False

    def __post_init__(self):
        set_ = object.__setattr__
        if isinstance(self.targets, list):
            set_(self, "targets", tuple(self.targets))
        mods = self.modules_to_save
        if mods is None:  # PEFT's default
            mods = ()
        elif isinstance(mods, str):
            mods = (mods,)
        elif isinstance(mods, (list, tuple)):
            mods = tuple(mods)
        else:
            raise TypeError(f"LoraConfig.modules_to_save must be a tuple of module names (or None), got "
                            f"{type(mods).__name__} {mods!r}")
        set_(self, "modules_to_save", mods)
        set_(self, "rank", _real("rank", self.rank, integer=True))
        set_(self, "alpha", _real("alpha", self.alpha))
        set_(self, "dropout", _real("dropout", self.dropout))
        ranks = _frozen_items("rank_pattern", self.rank_pattern, "int")
        set_(self, "rank_pattern", tuple((k, _real(f"rank_pattern[{k!r}]", r, integer=True)) for k, r in ranks))
        alphas = _frozen_items("alpha_pattern", self.alpha_pattern, "float")
        set_(self, "alpha_pattern", tuple((k, _real(f"alpha_pattern[{k!r}]", a)) for k, a in alphas))
        fused = _frozen_items("fused", self.fused, "tuple of bools")
        set_(self, "fused", tuple((k, _fused_mask(k, v)) for k, v in fused))
        if self.dtype is not None:
            try:
                set_(self, "dtype", jnp.dtype(self.dtype))
            except TypeError:
                raise TypeError(f"LoraConfig.dtype must be a floating dtype (jnp.float32, 'bfloat16', ...) or None, "
                                f"got {self.dtype!r}") from None
        self._validate()

    def _validate(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"LoraConfig.alpha must be a positive finite number, got {self.alpha!r}")
        if not (isinstance(self.targets, (tuple, str)) or callable(self.targets)):
            raise TypeError(
                f"LoraConfig.targets must be a tuple of module names, a regex string or a predicate "
                f"(path, leaf) -> bool, got {type(self.targets).__name__}"
            )
        if isinstance(self.targets, tuple) and not all(isinstance(t, str) and t for t in self.targets):
            raise TypeError(f"LoraConfig.targets names must be non-empty strings, got {self.targets!r}")
        if self.targets in ((), ""):
            raise ValueError('LoraConfig.targets is empty: name the modules to adapt, e.g. targets=("query", "value")')
        if isinstance(self.targets, str):
            _check_regex("targets", self.targets)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name, value, allowed in (("bias", self.bias, BIAS_MODES), ("scaling", self.scaling, SCALINGS),
                                     ("init", self.init, INITS)):
            niter = name == "init" and isinstance(value, str) and re.fullmatch(r"pissa_niter_\d+", value)
            if not isinstance(value, str) or (value not in allowed and not niter):
                more = " or 'pissa_niter_<K>' (K subspace iterations, e.g. 'pissa_niter_4')" if name == "init" else ""
                raise ValueError(f"LoraConfig.{name} must be one of {allowed}{more}, got {value!r}")
        for key, r in self.rank_pattern:
            if not isinstance(r, int) or r < 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be an int >= 0, got {r!r}")
        for key, a in self.alpha_pattern:
            if not (a > 0 and math.isfinite(a)):
                raise ValueError(f"LoraConfig.alpha_pattern[{key!r}] must be a positive finite number, got {a!r}")
        for key, mask in self.fused:
            if len(mask) < 2 or not any(mask):
                raise ValueError(
                    f"LoraConfig.fused[{key!r}] must have at least 2 slices with at least one enabled, got {mask!r}"
                )
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise TypeError(f"LoraConfig.modules_to_save must be module names, got {self.modules_to_save!r}")
        for name in ("rank_pattern", "alpha_pattern", "fused"):
            for key, _ in getattr(self, name):
                _check_regex(f"{name} key", key)
        for m in self.modules_to_save:
            _check_regex("modules_to_save entry", m)
        if not isinstance(self.dora, bool):
            raise TypeError(f"LoraConfig.dora must be True or False, got {type(self.dora).__name__} {self.dora!r}")
        if self.dtype is not None and not jnp.issubdtype(self.dtype, jnp.floating):
            raise ValueError(f"LoraConfig.dtype must be a floating dtype or None, got {self.dtype!r}")

    def _lookup(self, pattern: tuple, path: str, default):
        key = self.pattern_key(pattern, path)
        return default if key is None else dict(pattern)[key]

    def pattern_key(self, pattern: tuple | str, path: str) -> str | None:
        """The key of `pattern` (a field name, 'rank_pattern' / 'alpha_pattern' / 'fused', or its items) that
        applies to `path`: the first, in sorted order, that `path_matches`; None if none does."""
        items = getattr(self, pattern) if isinstance(pattern, str) else pattern
        return next((key for key, _ in items if path_matches(path, key)), None)

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at `path` ('/'-joined parameter path), after `rank_pattern`."""
        return self._lookup(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter at `path`, after `alpha_pattern`."""
        return self._lookup(self.alpha_pattern, path, self.alpha)

    def fused_for(self, path: str) -> tuple[bool, ...] | None:
        """The enable mask of a fused projection at `path`, or None for an ordinary parameter."""
        return self._lookup(self.fused, path, None)

    def scale_for(self, path: str) -> float:
        """The one place the LoRA scale is computed: alpha / r, or alpha / sqrt(r) with scaling='rslora'."""
        rank, alpha = self.rank_for(path), self.alpha_for(path)
        if rank == 0:
            raise ValueError(f"the parameter {path!r} has rank 0 (rank_pattern), so it has no adapter and no scale")
        return alpha / (math.sqrt(rank) if self.scaling == "rslora" else rank)

    def to_dict(self) -> dict:
        """A JSON-able form; a predicate target cannot be written and raises (see `with_targets`)."""
        if callable(self.targets):
            raise TypeError("LoraConfig.targets is a predicate, which cannot be serialised; use with_targets(paths)")
        d = dataclasses.asdict(self)
        d["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        d["modules_to_save"] = list(self.modules_to_save)
        for name in ("rank_pattern", "alpha_pattern", "fused"):
            d[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in getattr(self, name)}
        if self.dtype is not None:
            d["dtype"] = self.dtype.name
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> LoraConfig:
        """The inverse of `to_dict`."""
        d = dict(d)
        if isinstance(d.get("targets"), list):
            d["targets"] = tuple(d["targets"])
        d["modules_to_save"] = tuple(d.get("modules_to_save", ()))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LoraConfig fields {sorted(unknown)} in a saved config")
        return cls(**d)

    def with_targets(self, paths) -> LoraConfig:
        """The same config with `targets` replaced by a regex naming exactly `paths` (serialisable)."""
        return dataclasses.replace(self, targets="|".join(re.escape(p) for p in sorted(paths)))


def _check_regex(name: str, pattern: str):
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoraConfig.{name} is not a valid regex ({e}): {pattern!r}; a pattern is a module name "
                         f"(matched as a '/'-suffix) or a regex that fully matches the path: escape literal "
                         f"characters with re.escape") from None

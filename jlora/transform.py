"""`lora_transform`: LoRA as a transform of any function of a params pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jlora import analysis, layout
from jlora.config import LoraConfig
from jlora.interpreter import Context
from jlora.partition import combine, split
from jlora.paths import flatten_adapters, named_leaves, nest, select_targets
from jlora.tracked import Leaf, Tracked


def _as_function(fn) -> Callable:
    """`model.apply`, a plain `f(params, *args)`, or an NNX module (run through `nnx.merge`)."""
    from flax import nnx

    if isinstance(fn, nnx.Module):
        graphdef, _ = nnx.split(fn)

        def nnx_apply(variables, *args, **kwargs):
            return nnx.merge(graphdef, variables)(*args, **kwargs)

        return nnx_apply
    if not callable(fn):
        raise TypeError(f"lora_transform needs a callable f(variables, *args) or an nnx.Module, got {type(fn)}")
    return fn


def as_variables(variables):
    """NNX `State` -> its pure dict; anything else unchanged."""
    from flax import nnx

    return nnx.to_pure_dict(variables) if isinstance(variables, nnx.State) else variables


@dataclasses.dataclass(frozen=True)
class LoraTransform:
    """`init` makes (frozen, adapters) for a model; `apply` runs the model with the adapters, factored.

    Built by `lora_transform`; holds only the wrapped function and static settings, no state.
    """

    fn: Callable
    config: LoraConfig
    strict: bool = False

    def init(self, variables, *example_args, key, **example_kwargs) -> tuple[Any, dict]:
        """Splits `variables` into `(frozen, adapters)` and initialises the adapters (loralib init).

        Traces `fn(variables, *example_args, **example_kwargs)` once to see how each target is consumed.
        `frozen` is `variables` with the leaves that train in full (biases per `config.bias`, `modules_to_save`)
        set to None; `adapters` is a nested dict mirroring the variables' paths, holding
        `{"lora_a": ..., "lora_b": ...}` at each target and the arrays trained in full.
        """
        variables = as_variables(variables)
        config = self.config
        targets = select_targets(variables, config)
        named = named_leaves(variables)
        index = {p: i for i, (p, _) in enumerate(named)}
        records = analysis.analyse(self.fn, variables, example_args, example_kwargs,
                                   {index[p]: p for p in targets})
        keys = jax.random.split(key, len(targets))
        pairs = {}
        for path, k in zip(targets, keys):
            w = named[index[path]][1]
            plan = analysis.decide(path, w.ndim, records.get(index[path], []))
            fused = config.fused_for(path)
            if fused and plan.input_side != "a":
                raise ValueError(f"{path}: a fused projection must be consumed as x @ W with W (in, n * d); "
                                 f"this one is contracted on its output axes")
            lay = layout.Layout(tuple(w.shape), plan.n_prefix, plan.n_a, config.rank_for(path), fused)
            lay.check(path)
            a, b = layout.init_factors(k, lay, kind=plan.kind, input_side=plan.input_side, init=config.init,
                                       dtype=config.dtype or w.dtype)
            pairs[path] = {"lora_a": a, "lora_b": b}
        frozen, trainable = split(variables, config, targets=targets)
        adapters = nest(pairs)
        _merge_nested(adapters, trainable)
        return frozen, adapters

    def apply(self, frozen, adapters, *args, dropout_key=None, **kwargs):
        """Runs the function on the base weights plus adapters, each adapted consumer computed factored:
        `x @ W + scale * (dropout(x) @ lora_a) @ lora_b`. jit-able; dropout only when `dropout_key` is given."""
        variables = combine(as_variables(frozen), adapters)
        pairs, _ = flatten_adapters(adapters)
        named = named_leaves(variables)
        index = {p: i for i, (p, _) in enumerate(named)}
        unknown = sorted(set(pairs) - set(index))
        if unknown:
            raise ValueError(f"adapters at {unknown} have no parameter of that path in the variables; "
                             f"the parameters are: {sorted(index)[:40]}")
        tracked = {}
        for path, pair in pairs.items():
            w = named[index[path]][1]
            lay = layout.read_layout(path, w.shape, pair["lora_a"].shape, pair["lora_b"].shape,
                                     self.config.fused_for(path))
            leaf = Leaf(path, index[path], tuple(w.shape), lay, self.config.scale_for(path), self.config.dropout)
            axes = tuple((k,) for k in range(w.ndim))
            tracked[index[path]] = Tracked(w, pair["lora_a"], layout.fused_b(pair["lora_b"], lay), axes=axes,
                                           removed=frozenset(), leaf=leaf)
        ctx = Context(strict=self.strict, key=dropout_key)
        return analysis.run(self.fn, variables, args, kwargs, lambda i, x: tracked.get(i, x), ctx)

    def consumers(self, variables, *example_args, **example_kwargs) -> dict[str, list[str]]:
        """`{target path: [consumer, ...]}`: which primitives each target reaches ('dot', 'conv', 'gather' run
        factored; any other name is a fallback)."""
        variables = as_variables(variables)
        targets = select_targets(variables, self.config)
        index = {p: i for i, (p, _) in enumerate(named_leaves(variables))}
        names = {index[p]: p for p in targets}
        records = analysis.analyse(self.fn, variables, example_args, example_kwargs, names)
        return analysis.consumers_summary(records, names)


def _merge_nested(into: dict, extra: dict):
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge_nested(into[k], v)
        else:
            into[k] = v


def lora_transform(fn, config: LoraConfig, *, strict: bool = False) -> LoraTransform:
    """Wraps `fn(variables, *args, **kwargs)` (a linen `model.apply`, a plain function, or an `nnx.Module`)
    so its targeted weights carry LoRA adapters. `strict=True` makes a consumer jlora cannot compute factored an
    error instead of a materialising fallback with a warning."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jlora.LoraConfig, got {type(config).__name__}")
    return LoraTransform(_as_function(fn), config, strict)

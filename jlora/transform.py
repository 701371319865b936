"""`lora_transform`: LoRA as a transform of any function of a params pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jlora import analysis, layout, routing
from jlora.config import LoraConfig
from jlora.deferred import Deferred
from jlora.interpreter import Context
from jlora.nnx_module import NnxFunction, thread
from jlora.partition import combine, split
from jlora.paths import flatten_adapters, named_leaves, nest, select_targets
from jlora.qarray import is_quantized
from jlora.sharding import place
from jlora.tracked import Leaf, Tracked
from jlora.validate import check_adapters, warn_rank
from jlora.variants import dora
from jlora.variants import init as rewriting


def _as_function(fn) -> Callable:
    """`model.apply`, a plain `f(variables, *args)`, or an NNX module (as a `jlora.nnx_module.NnxFunction`). A
    TypeError saying what to pass for the plausible wrong things: a linen Module or its `init`, a bound module, an
    NNX `GraphDef` or `State`, a variables dict."""
    from flax import linen, nnx

    if isinstance(fn, nnx.Module):
        return NnxFunction.of(fn)
    if isinstance(fn, linen.Module):
        if fn.scope is not None:
            raise TypeError(f"lora_transform got a bound linen {type(fn).__name__}: pass the unbound apply and the "
                            f"variables separately: `module, variables = bound.unbind()`, then "
                            f"lora_transform(module.apply, config) and lora.init(variables, ...)")
        raise TypeError(f"lora_transform got a linen {type(fn).__name__} Module: pass model.apply, the function "
                        f"of (variables, *args): lora_transform(model.apply, config)")
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, linen.Module) and getattr(fn, "__name__", "") in ("init", "init_with_output", "lazy_init"):
        raise TypeError(f"lora_transform got {type(owner).__name__}.{fn.__name__}: pass model.apply, not "
                        f"model.{fn.__name__} (make the variables with it, then lora.init(variables, ...))")
    if isinstance(fn, nnx.GraphDef):
        raise TypeError("lora_transform got an nnx.GraphDef: pass the nnx.Module itself, "
                        "lora_transform(model, config), rebuilt if need be with nnx.merge(graphdef, state)")
    if isinstance(fn, nnx.State):
        raise TypeError("lora_transform got an nnx.State (the variables): pass the module itself, "
                        "lora_transform(model, config), and give nnx.state(model) to lora.init")
    if not callable(fn):
        raise TypeError(f"lora_transform needs a callable f(variables, *args) (a linen model.apply) or an "
                        f"nnx.Module, got a {type(fn).__name__}; the call is lora_transform(fn, config)")
    return fn


def as_variables(variables):
    """NNX `State` -> its pure dict; anything else unchanged. An `nnx.Module` is a TypeError (pass its state)."""
    from flax import nnx

    if isinstance(variables, nnx.Module):
        raise TypeError(f"the variables are an nnx.Module ({type(variables).__name__}): pass its whole state, "
                        f"nnx.state(model)")
    return nnx.to_pure_dict(variables) if isinstance(variables, nnx.State) else variables


@dataclasses.dataclass(frozen=True)
class LoraTransform:
    """`init` makes (frozen, adapters) for a model; `apply` runs the model with the adapters, factored.

    Built by `lora_transform`; holds only the wrapped function and static settings, no state. For an NNX module,
    `train()` / `eval()` / `view()` return a copy in another mode.
    """

    fn: Callable
    config: LoraConfig
    strict: bool = False

    def init(self, variables, *example_args, key, **example_kwargs) -> tuple[Any, dict]:
        """Splits `variables` into `(frozen, adapters)` and initialises the adapters (loralib init).

        Traces `fn(variables, *example_args, **example_kwargs)` once to see how each target is consumed.
        `frozen` is `variables` with the leaves that train in full (biases per `config.bias`, `modules_to_save`)
        set to None; `adapters` is a nested dict mirroring the variables' paths, holding
        `{"lora_a": ..., "lora_b": ...}` at each target and the arrays trained in full. With an init that rewrites
        the base (`config.init` 'pissa', 'pissa_niter_K', 'olora': jlora.variants.init) `frozen` holds each
        targeted weight's residual W - s*a@b instead of W (same shape and dtype): apply, save and load the adapters
        with that frozen tree, or export them for W with `jlora.convert_to_plain_lora`. On sharded variables
        the adapters come placed with `jlora.adapter_shardings(variables, adapters)`; under jit give those as
        `out_shardings` (unless the mesh's axes are Explicit, where init reshards them itself).
        """
        variables = as_variables(variables)
        config = self.config
        targets = select_targets(variables, config)
        named = named_leaves(variables)
        index = {p: i for i, (p, _) in enumerate(named)}
        records = analysis.analyse(self.fn, variables, example_args, example_kwargs,
                                   {index[p]: p for p in targets})
        keys = jax.random.split(key, len(targets))
        pairs, residuals = {}, {}
        for path, k in zip(targets, keys):
            w = named[index[path]][1]
            plan = analysis.decide(path, tuple(w.shape), records.get(index[path], []))
            fused = config.fused_for(path)
            if fused and plan.input_side != "a":
                raise ValueError(f"{path}: a fused projection must be consumed as x @ W with W (in, n * d); "
                                 f"this one is contracted on its output axes")
            lay = layout.Layout(tuple(w.shape), plan.n_prefix, len(plan.a_axes), config.rank_for(path), fused,
                                plan.a_axes)
            lay.check(path)
            dtype = config.dtype or jnp.promote_types(w.dtype, jnp.float32)
            if rewriting.rewrites_base(config.init):  # PiSSA / OLoRA: W becomes the residual W - s*a@b
                a, b, residuals[path] = rewriting.rewrite_init(k, w, lay, init=config.init, dtype=dtype, path=path,
                                                               scale=config.scale_for(path))
            else:
                a, b = layout.init_factors(k, lay, kind=plan.kind, input_side=plan.input_side, init=config.init,
                                           dtype=dtype)
            warn_rank(path, lay)
            pairs[path] = {"lora_a": a, "lora_b": b}
            if config.dora:  # m = ||W + s a @ b|| over the input axes (jlora.variants.dora), W the frozen weight
                base = residuals.get(path, Deferred(w) if is_quantized(w) else w)
                pairs[path][dora.MAGNITUDE] = dora.init_magnitude(base, a, b, lay, config.scale_for(path),
                                                                  plan.input_side, a.dtype)
        frozen, trainable = split(variables, config, targets=targets)
        if residuals:
            frozen = rewriting.with_residuals(frozen, residuals)
        adapters = nest(pairs)
        _merge_nested(adapters, trainable)
        return frozen, place(variables, adapters, config)  # each pair sharded as its weight (jlora.sharding)

    def apply(self, frozen, adapters, *args, dropout_key=None, adapter_ids=None, **kwargs):
        """Runs the function on the base weights plus adapters, each adapted consumer computed factored:
        `x @ W + scale * (dropout(x) @ lora_a) @ lora_b`. jit-able; LoRA dropout only when `dropout_key` is given.

        `adapter_ids` (int (batch,)): `adapters` is then a stack of K adapters of this config (every leaf with a
        leading axis K: `jax.tree.map(lambda *a: jnp.stack(a), *adapters_list)`) and row i of the batch runs through
        adapter `adapter_ids[i]` (-1: the base model alone), the base product shared (`jlora.routing`; new ids never
        retrace). Adapters of different ranks or alphas: `jlora.multi.stack` and its transform's `apply`.

        Returns what the function returns. For an NNX module: `(y, frozen)`, as `graphdef.apply(state)(x)` does:
        `frozen` is the given frozen tree (a pure dict, same structure) with the state the call wrote (RNG counts
        of `nnx.Dropout`, BatchNorm statistics), to pass to the next call; `nnx.update(model, merge(frozen,
        adapters, config))` puts it and the merged weights into the module."""
        if adapter_ids is None:
            return self._run(frozen, adapters, args, kwargs, dropout_key, None)
        sizes = {jnp.shape(v)[0] if jnp.ndim(v) else None for v in jax.tree.leaves(adapters)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"apply(..., adapter_ids=) takes a stack of adapters, every leaf with the same leading "
                             f"axis K (jax.tree.map(lambda *a: jnp.stack(a), *adapters_list)); got leading sizes "
                             f"{sorted(s for s in sizes if s is not None)}" + (" and scalars" if None in sizes else ""))
        padded, route = routing.prepare(adapters, adapter_ids, args, kwargs, sizes.pop())
        return self._run(frozen, padded, args, kwargs, dropout_key, route)

    def _run(self, frozen, adapters, args, kwargs, dropout_key, route, *, vmapped: bool = False):
        """`apply`; with `route` (int (batch,)), `adapters`' pairs are stacked on a leading adapter axis and row i
        takes adapter route[i] (`jlora.routing`; `jlora.multi` builds the stack and appends its zero adapter).
        `vmapped`: the caller vmaps this over adapters (`jlora.multi`), so no rule may join W with a factor (that
        would copy W per adapter)."""
        frozen = as_variables(frozen)
        one = adapters if route is None else jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype),
                                                          adapters)
        check_adapters(frozen, one, self.config)  # shapes and paths only: at trace time under jit
        pairs, full = flatten_adapters(adapters)
        if route is not None:
            dora.check_unrouted(pairs)
        if route is not None and full:
            raise ValueError(f"per-row routing supports lora pairs only, but the adapters train {sorted(full)} in "
                             f"full (bias / modules_to_save); route adapters made with bias='none' and no "
                             f"modules_to_save")
        variables = combine(frozen, adapters)
        named = named_leaves(variables)
        index = {p: i for i, (p, _) in enumerate(named)}
        tracked = {}
        for path, pair in pairs.items():
            w = named[index[path]][1]
            a, b = pair["lora_a"], pair["lora_b"]
            lead = 0 if route is None else 1  # routed pairs: (adapters, ...)
            lay = layout.read_layout(path, w.shape, a.shape[lead:], b.shape[lead:], self.config.fused_for(path))
            leaf = Leaf(path, index[path], tuple(w.shape), lay, self.config.scale_for(path), self.config.dropout)
            axes = tuple((k,) for k in range(w.ndim))
            base = Deferred(w) if is_quantized(w) else w  # a quantized base is dequantized at its consumer
            fb = layout.fused_b(b, lay) if route is None else jax.vmap(lambda b, lay=lay: layout.fused_b(b, lay))(b)
            g = None
            if dora.MAGNITUDE in pair:  # g = m / stop_gradient(||W + s a @ b||), computed factored
                m = pair[dora.MAGNITUDE]
                g = dora.gain(base, a, b, m, lay, leaf.scale, dora.read_normed(path, lay, m.shape))
            tracked[index[path]] = Tracked(base, a, fb, axes=axes, removed=frozenset(), leaf=leaf, route=route,
                                           gain=g)
        ctx = Context(strict=self.strict, key=dropout_key, routed=vmapped)
        out = analysis.run(self.fn, variables, args, kwargs,
                           lambda i, x: tracked.get(i, Deferred(x) if is_quantized(x) else x), ctx)
        if isinstance(self.fn, NnxFunction):  # (y, the variables the call wrote) -> (y, the new frozen tree)
            return out[0], thread(frozen, out[1], self.fn.kinds())
        return out

    def view(self, *, only=..., raise_if_not_found: bool = True, **attributes) -> LoraTransform:
        """NNX: a new transform whose module has `attributes` set on its (`only`-filtered) submodules, as
        `nnx.view(model, **attributes)`; `frozen` and `adapters` stay valid. This transform is unchanged."""
        if not isinstance(self.fn, NnxFunction):
            raise TypeError("train(), eval() and view() set attributes of an NNX module; this transform wraps a "
                            "function: pass the mode as an argument of the call instead, e.g. "
                            "lora.apply(frozen, adapters, x, train=False) when the model's __call__ takes `train`")
        return dataclasses.replace(self, fn=self.fn.view(only, raise_if_not_found, **attributes))

    def train(self, **attributes) -> LoraTransform:
        """NNX: this transform in training mode, as `Module.train()` (deterministic=False,
        use_running_average=False wherever a submodule has them), but returned, not set in place."""
        return self.view(raise_if_not_found=False, deterministic=False, use_running_average=False, **attributes)

    def eval(self, **attributes) -> LoraTransform:
        """NNX: this transform in evaluation mode, as `Module.eval()` (deterministic=True, use_running_average=True
        wherever a submodule has them), but returned, not set in place."""
        return self.view(raise_if_not_found=False, deterministic=True, use_running_average=True, **attributes)

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
    error instead of a fallback that materialises `W + scale * a @ b` with a warning.

    Returns a `LoraTransform` (no state, no arrays): `init(variables, *example_args, key=)` -> `(frozen, adapters)`,
    `apply(frozen, adapters, *args, dropout_key=None)` -> fn's output, `consumers(variables, *example_args)` ->
    which primitive each target reaches. Pass `model.apply`, not a linen Module (a TypeError says so)::

        lora = lora_transform(model.apply, LoraConfig(rank=8, alpha=16, targets=("query", "value")))
        frozen, adapters = lora.init(variables, x, key=jax.random.key(1))   # adapters: {path: {lora_a, lora_b}}
        y = lora.apply(frozen, adapters, x)                                 # jit and grad over adapters

    An NNX module is passed itself, with its whole state as the variables; `apply` then returns `(y, frozen)`,
    frozen holding the state the call wrote (dropout RNG counts, BatchNorm statistics) for the next call, and
    `lora.train()` / `lora.eval()` / `lora.view(**attributes)` return the transform in another mode::

        lora = lora_transform(model, config)
        frozen, adapters = lora.init(nnx.state(model), x, key=jax.random.key(1))
        y, frozen = lora.apply(frozen, adapters, x)                 # train mode: fresh dropout mask, new stats
        y, _ = lora.eval().apply(frozen, adapters, x)               # running stats, no dropout
        nnx.update(model, merge(frozen, adapters, config))          # merged weights and stats into the module
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jlora.LoraConfig, got {type(config).__name__}")
    return LoraTransform(_as_function(fn), config, strict)

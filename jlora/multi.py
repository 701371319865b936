"""Many adapters at once: K adapters stacked on a leading axis, run, trained and swapped in one compiled program.

    stacked, sc = jlora.multi.stack([adapters_0, adapters_1], [config_0, config_1])   # ranks padded to the largest
    multi = jlora.multi.stacked_transform(model.apply, sc)
    ys = multi.apply(frozen, stacked, x)              # (K, ...): every adapter on the same x, one program
    ys = multi.apply_each(frozen, stacked, xs)        # xs (K, ...): adapter k on xs[k] (multi-tenant)
    tx = jlora.multi.stacked_optimizer(optax.adamw, learning_rate=[1e-3, 3e-4])  # K independent optimizers
    step = jlora.multi.train_step(multi, tx, loss)    # one jitted step trains all K (jlora.multi_optim)
    [(adapters_0, config_0), (adapters_1, config_1)] = jlora.multi.unstack(stacked, sc)

Each adapter keeps its own scale (alpha / r, rsLoRA, alpha_pattern): the stack runs through a `LoraTransform` of
scale exactly 1 at every target (`StackedConfig.unit_config`) with adapter k's lora_a multiplied by its scale inside
the traced function; `(s a) b` has the gradients of `s (a b)`, so training is that of K separate runs (padding: see
`jlora.stacking`). `stack(..., fold_scales=True)` multiplies the scales in at stack time instead: the program then
depends on the shapes alone, and any other folded stack of the same targets and padded ranks (any alpha, any rank
<= max_rank) runs in it without retracing: hot swap (PEFT's `prepare_model_for_compiled_hotswap`). Train unfolded
(folding changes what an optimizer step does to the factors); fold to serve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jlora import routing
from jlora.analysis import _is_dynamic
from jlora.multi_optim import StackedOptState, stacked_optimizer, train_step, with_hyperparams
from jlora.paths import nest
from jlora.stacking import StackedConfig, check_stacked, stack, unstack
from jlora.transform import LoraTransform, lora_transform

__all__ = ["MultiLora", "StackedConfig", "StackedOptState", "stack", "stacked_optimizer", "stacked_transform",
           "train_step", "unstack", "with_hyperparams"]


@dataclasses.dataclass(frozen=True)
class MultiLora:
    """Runs a stack of K adapters on a function; built by `stacked_transform`. Holds no arrays.

    `lora` is the unit-scale `LoraTransform` one adapter runs under, `config` the stack's `StackedConfig`."""

    lora: LoraTransform
    config: StackedConfig

    @property
    def size(self) -> int:
        """K, the number of stacked adapters."""
        return self.config.size

    def scaled(self, stacked) -> dict:
        """The stack with each adapter's lora_a times its own scale at each target (the factors `self.lora`
        runs, at scale 1); a folded stack unchanged. Same shapes; lora_a float32 (or wider) after scaling."""
        pairs, full = check_stacked(stacked, self.config)
        if self.config.folded:
            return stacked
        scales, flat = self.config.scales(), dict(full)
        for path, pair in pairs.items():
            a = pair["lora_a"]
            flat[f"{path}/lora_a"] = a * jnp.asarray(scales[path]).reshape((-1,) + (1,) * (a.ndim - 1))
            flat[f"{path}/lora_b"] = pair["lora_b"]
        return nest(flat)

    def check(self, stacked_config: StackedConfig) -> None:
        """Raises a ValueError unless a stack made with `stacked_config` runs correctly in this transform's
        compiled programs: its own config, or a folded stack with the same unit config and K (hot swap)."""
        sc, mine = stacked_config, self.config
        if sc == mine:
            return
        if not (sc.folded and mine.folded):
            raise ValueError("this stack's scales are not folded, and its StackedConfig is not the transform's: its "
                             "alphas and ranks are static settings of the program; stack both with fold_scales=True "
                             "(and one max_rank) to swap adapters into a compiled program")
        if (sc.unit_config(), sc.size) != (mine.unit_config(), mine.size):
            raise ValueError(f"the stack has K={sc.size} and padded ranks {dict(sc.ranks)}, the transform K="
                             f"{mine.size} and {dict(mine.ranks)} (or their targets, dropout or fused masks differ); "
                             f"stack with max_rank={max(dict(mine.ranks).values())} and the transform's targets")

    def apply(self, frozen, stacked, *args, dropout_key=None, adapter_ids=None, **kwargs):
        """Every adapter on the same inputs: `fn`'s output with a leading axis K, output k that of adapter k alone
        (`lora_transform(fn, configs[k]).apply(frozen, adapters_k, *args, dropout_key=fold_in(dropout_key, k))`).
        `frozen` and the inputs are shared (not copied K times); one jit-able program. For an NNX module the
        returned frozen tree has the K axis too.

        `adapter_ids` (int (batch,), values in [-1, K-1]): a mixed batch instead, row i through adapter
        `adapter_ids[i]` (-1: the base model alone), returning `fn`'s output for the batch as it is; the base
        product is computed once for all rows and each row's low-rank branch with its own factors
        (`jlora.routing`). The ids are data: new ids never retrace. A batch of n * len(adapter_ids) rows is read as
        groups of n consecutive rows per id (beam search's repeated rows). Adapters that train leaves in full
        (bias, modules_to_save) cannot be routed (a ValueError)."""
        if adapter_ids is not None:
            return self._route(frozen, stacked, args, kwargs, dropout_key, adapter_ids)
        return self._run(frozen, stacked, args, kwargs, dropout_key, batched=False)

    def routed_apply(self, frozen, stacked, adapter_ids, *args, **kwargs):
        """`apply(frozen, stacked, *args, adapter_ids=adapter_ids)`, the ids positional so that generation can carry
        them as an argument: `generate(cached_step(multi.routed_apply, frozen, stacked, ids), prompt, ...)`."""
        return self.apply(frozen, stacked, *args, adapter_ids=adapter_ids, **kwargs)

    def _route(self, frozen, stacked, args, kwargs, dropout_key, adapter_ids):
        padded, route = routing.prepare(self.scaled(stacked), adapter_ids, args, kwargs, self.size)
        return self.lora._run(frozen, padded, args, kwargs, dropout_key, route)

    def apply_each(self, frozen, stacked, *args, dropout_key=None, **kwargs):
        """Adapter k on its own inputs (multi-tenant): every array among `args` / `kwargs` has a leading axis K
        (non-array arguments are shared and static); returns `fn`'s output with a leading axis K."""
        return self._run(frozen, stacked, args, kwargs, dropout_key, batched=True)

    def _run(self, frozen, stacked, args, kwargs, dropout_key, *, batched: bool):
        scaled = self.scaled(stacked)
        leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
        dyn = [i for i, x in enumerate(leaves) if _is_dynamic(x)]
        if batched:
            wrong = [tuple(jnp.shape(leaves[i])) for i in dyn if jnp.ndim(leaves[i]) < 1
                     or jnp.shape(leaves[i])[0] != self.size]
            if wrong:
                raise ValueError(f"apply_each takes inputs with a leading axis of K = {self.size} (one slice per "
                                 f"adapter), got arrays of shapes {wrong}; for inputs shared by all adapters use apply")
        keys = None if dropout_key is None else jax.vmap(lambda k: jax.random.fold_in(dropout_key, k))(
            jnp.arange(self.size))

        def one(adapters, key, values):
            full = list(leaves)
            for i, v in zip(dyn, values):
                full[i] = v
            a, kw = jax.tree_util.tree_unflatten(tree, full)
            return self.lora._run(frozen, adapters, a, kw, key, None, vmapped=True)  # no [W; B] copy per adapter

        values = [leaves[i] for i in dyn]
        return jax.vmap(one, in_axes=(0, 0, 0 if batched else None))(scaled, keys, values)


def stacked_transform(fn: Callable, stacked_config: StackedConfig, *, strict: bool = False) -> MultiLora:
    """A `MultiLora` running the stack `stacked_config` describes on `fn` (a linen `model.apply`, a plain
    `f(variables, *args)`, or an NNX module, as `lora_transform` takes); `strict` as there."""
    if not isinstance(stacked_config, StackedConfig):
        raise TypeError(f"stacked_transform takes the StackedConfig that jlora.multi.stack returns, got "
                        f"{type(stacked_config).__name__}")
    return MultiLora(lora_transform(fn, stacked_config.unit_config(), strict=strict), stacked_config)

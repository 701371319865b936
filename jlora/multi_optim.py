"""Training K stacked adapters in one program: K independent optimizers, and the train step (see `jlora.multi`).

    tx = stacked_optimizer(optax.adamw, learning_rate=[1e-3, 3e-4, 1e-4], weight_decay=0.01)
    step = train_step(multi, tx, lambda logits, labels: xent(logits, labels))
    opt_state = tx.init(stacked)
    stacked, opt_state, losses = step(frozen, stacked, opt_state, (x,), labels)   # losses: (K,)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class StackedOptState(NamedTuple):
    """The state of `stacked_optimizer`: the per-adapter hyperparameters as data (`with_hyperparams` changes them
    between steps without recompiling) and the K inner states, each leaf with a leading axis K."""

    hyperparams: dict[str, jax.Array]  # name -> shape=(K,)
    inner: Any


def _per_adapter(value) -> bool:
    return isinstance(value, (Sequence, np.ndarray, jax.Array)) and not isinstance(value, str) and np.ndim(value) == 1


def stacked_optimizer(make: Callable[..., optax.GradientTransformation], **hyperparams) -> optax.GradientTransformation:
    """K independent optimizers `make(**hyperparams_k)` over a stack: every leaf of the params, gradients and
    state has a leading axis K, and adapter k's slice is updated exactly as `make(**hyperparams_k)` would update
    that adapter alone (the update is vmapped, so a global norm clip or any other reduction is per adapter).

    Each hyperparameter given as a length-K sequence (or 1-D array) is per adapter and reaches `make` as a traced
    scalar (so `make` may only compute with it, as optax's do); anything else (a float, a bool, a mask or schedule
    function) is shared and static. `optax.adamw` with `learning_rate=[1e-3, 3e-4]` is two AdamW runs."""
    per = {name: v for name, v in hyperparams.items() if _per_adapter(v)}
    shared = {name: v for name, v in hyperparams.items() if name not in per}
    sizes = {name: len(v) for name, v in per.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"stacked_optimizer: the per-adapter hyperparameters have different lengths {sizes}; give "
                         f"each one value per stacked adapter (K)")
    size = next(iter(sizes.values()), None)

    def check(params):
        leaves = jax.tree_util.tree_leaves(params)
        wrong = sorted({jnp.shape(x)[0] if jnp.ndim(x) else () for x in leaves} - {size})
        if size is not None and wrong:
            raise ValueError(f"stacked_optimizer has K = {size} values per hyperparameter, but the params' leading "
                             f"axes are {wrong}: pass the stack the hyperparameters are for")

    def init(params):
        check(params)
        hp = {name: jnp.asarray(v) for name, v in per.items()}
        return StackedOptState(hp, jax.vmap(lambda p, h: make(**h, **shared).init(p))(params, hp))

    def update(updates, state, params=None):
        def one(g, s, p, h):
            return make(**h, **shared).update(g, s, p)

        new, inner = jax.vmap(one)(updates, state.inner, params, state.hyperparams)
        return new, StackedOptState(state.hyperparams, inner)

    return optax.GradientTransformation(init, update)


def with_hyperparams(state: StackedOptState, **values) -> StackedOptState:
    """`state` with per-adapter hyperparameters replaced (each a length-K sequence or array); jit-able, and a
    compiled step takes the new state without retracing when the dtype stays. A name the optimizer was not built
    with per adapter is a ValueError."""
    if not isinstance(state, StackedOptState):
        raise TypeError(f"with_hyperparams takes the state of jlora.multi.stacked_optimizer, got "
                        f"{type(state).__name__}")
    unknown = sorted(set(values) - set(state.hyperparams))
    if unknown:
        raise ValueError(f"with_hyperparams: {unknown} are not per-adapter hyperparameters of this optimizer (it has "
                         f"{sorted(state.hyperparams)}); pass them to stacked_optimizer as length-K sequences")
    hp = dict(state.hyperparams)
    for name, v in values.items():
        v = jnp.asarray(v, hp[name].dtype)
        if v.shape != hp[name].shape:
            raise ValueError(f"with_hyperparams: {name} has shape {v.shape}, the optimizer's {hp[name].shape}")
        hp[name] = v
    return StackedOptState(hp, state.inner)


def train_step(multi, tx: optax.GradientTransformation, loss: Callable, *, per_adapter_batches: bool = False):
    """A jitted `step(frozen, stacked, opt_state, inputs, targets, dropout_key=None) -> (stacked, opt_state,
    losses)` training the K adapters of `multi` (a `jlora.multi.MultiLora`) in one program.

    `inputs` is the tuple of `fn`'s arguments after the variables and `loss(outputs, targets)` gives one adapter's
    scalar loss from `fn`'s output. Sweeps: inputs and targets shared by all adapters; `per_adapter_batches=True`
    (multi-tenant): every array in them has a leading axis K. `tx` updates the stack (`stacked_optimizer` for K
    independent optimizers). `losses` shape=(K,): adapter k's loss before the step. Adapter k's gradient is that of
    its own loss (the sum's cotangent is 1 for each), with dropout key `fold_in(dropout_key, k)`: K separate runs."""

    def step(frozen, stacked, opt_state, inputs, targets, dropout_key=None):
        if not isinstance(inputs, (tuple, list)):
            raise TypeError(f"train_step: inputs is the tuple of fn's arguments after the variables, e.g. (x,), got "
                            f"a {type(inputs).__name__}")

        def total(s):
            if per_adapter_batches:
                out = multi.apply_each(frozen, s, *inputs, dropout_key=dropout_key)
                each = jax.vmap(loss)(out, targets)
            else:
                out = multi.apply(frozen, s, *inputs, dropout_key=dropout_key)
                each = jax.vmap(loss, in_axes=(0, None))(out, targets)
            return jnp.sum(each), each

        (_, losses), grads = jax.value_and_grad(total, has_aux=True)(stacked)
        updates, opt_state = tx.update(grads, opt_state, stacked)
        return optax.apply_updates(stacked, updates), opt_state, losses

    return jax.jit(step)

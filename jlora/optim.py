"""Optimizers for LoRA: `masked_optimizer` updates only trainable leaves; `loralib_adamw` is the paper's AdamW."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jlora.config import LoraConfig
from jlora.partition import trainable_mask
from jlora.paths import path_str


def masked_optimizer(inner: optax.GradientTransformation, trainable=None) -> optax.GradientTransformation:
    """`inner` on the trainable leaves; `optax.set_to_zero()` on the rest, so frozen leaves get no optimizer
    state, no update and no weight decay.

        tx = jlora.masked_optimizer(optax.adamw(2e-4), lora)  # lora pairs + what lora.config trains in full

    Args:
      inner: any optax transformation, e.g. `optax.adamw(2e-4, weight_decay=0.01)`.
      trainable: which leaves train: a `LoraConfig` or a `LoraTransform` (its config): lora pairs plus the leaves
        the config trains in full (biases per `bias`, `modules_to_save`); a bool pytree; or a callable
        `params -> bool pytree` (optax's mask convention). None: the lora pairs only, and a tree that holds any
        other array (a `modules_to_save` head, a bias) is a ValueError at `init`, since those arrays would
        silently get no update; pass the config (or the transform) to train them.
    """
    config = getattr(trainable, "config", trainable)  # a LoraTransform carries its config
    if trainable is None or isinstance(config, LoraConfig):

        def labels_fn(params):
            mask = trainable_mask(params, config)
            if config is None:
                _check_only_pairs(params, mask)
            return _labels(mask)
    elif callable(trainable):
        fn: Callable = trainable

        def labels_fn(params):
            return _labels(fn(params))
    else:
        mask = trainable

        def labels_fn(params):
            return _labels(mask)

    return optax.partition({"trainable": inner, "frozen": optax.set_to_zero()}, labels_fn)


def _check_only_pairs(params, mask):
    others = [path_str(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if not m]
    if others:
        listed = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        raise ValueError(
            f"masked_optimizer(inner) without `trainable` trains only lora_a/lora_b, but the tree also holds {listed}, "
            f"which would get no update; pass trainable=config (or the LoraTransform) to train what the config "
            f"trains in full, or trainable=jlora.trainable_mask(tree) to keep them frozen on purpose"
        )


def _labels(mask):
    return jax.tree_util.tree_map(lambda m: "trainable" if m else "frozen", mask)


class LoralibAdamState(NamedTuple):
    """The moments of `scale_by_loralib_adam`."""

    count: jax.Array  # shape=(), dtype=int32; steps taken
    mu: optax.Updates  # like params: the EMA of gradients, m
    nu: optax.Updates  # like params: the EMA of squared gradients, v (never bias-corrected)


def scale_by_loralib_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
    """Adam's direction as loralib's AdamW (the old transformers one) computes it, before the learning rate:
    `sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`, t = 1, 2, ... The bias correction is folded into the step
    size, so eps adds to the UNcorrected sqrt(v), unlike `optax.scale_by_adam` (m_hat / (sqrt(v_hat) + eps))."""

    def init(params):
        zeros = optax.tree.zeros_like(params)
        return LoralibAdamState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(grads, state, params=None):
        del params
        mu = optax.tree.update_moment(grads, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(grads, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        size = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(lambda m, v: (size * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
        return updates, LoralibAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def decay_after_step(learning_rate, weight_decay: float) -> optax.GradientTransformation:
    """loralib's decoupled weight decay, applied to the parameters AFTER the step `u` already in the updates:
    `p <- p' - lr * wd * p'` with `p' = p + u`, i.e. `u <- u - lr * wd * (p + u)`. Needs `params`."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("decay_after_step needs params: call tx.update(grads, state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = jax.tree.map(lambda u, p: (u - lr * weight_decay * (p + u)).astype(u.dtype), updates, params)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def loralib_adamw(learning_rate, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                  weight_decay: float = 0.01, mask=None) -> optax.GradientTransformation:
    """loralib's AdamW (examples/NLG, `--correct_bias`), the paper's E2E optimizer. Per leaf, at step t = 1, 2, ...:

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        p' = p - lr_t * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        p  = p' - lr_t * wd * p'                           # decay after the Adam step, on the updated p

    Args:
      learning_rate: a float, or an optax schedule `step (int32 ()) -> lr` read at steps 0, 1, ...
      b1, b2: the moments' decay rates, in [0, 1). eps: > 0, added to sqrt(v). weight_decay: >= 0.
      mask: which leaves decay (optax's convention: a bool pytree or `params -> bool pytree`); None: all.

    Returns an `optax.GradientTransformation`; its updates keep each leaf's shape and dtype. `update` needs the
    params. For LoRA, wrap it in `jlora.masked_optimizer` or give it the adapters alone.
    """
    if not (callable(learning_rate) or (isinstance(learning_rate, numbers.Real) and learning_rate >= 0)):
        raise ValueError(f"learning_rate must be a number >= 0 or an optax schedule, got {learning_rate!r}")
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0 <= beta < 1:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps m / (sqrt(v) + eps) finite), got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    decay = decay_after_step(learning_rate, weight_decay)
    return optax.chain(scale_by_loralib_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate),
                       decay if mask is None else optax.masked(decay, mask))


def optimizer_shardings(optimizer: optax.GradientTransformation, adapters, shardings):
    """The shardings of `optimizer.init(adapters)`'s state: each per-parameter leaf (Adam's moments) takes its
    adapter's sharding, every other leaf (step counts) is replicated on the adapters' mesh. Give it as
    `out_shardings` when initialising under jit, where the state's zeros, depending on no input, would otherwise
    land on one device (an eager `optimizer.init` already follows the adapters)::

        shardings = jlora.adapter_shardings(variables, adapters, config=config)
        state = jax.jit(tx.init, out_shardings=jlora.optimizer_shardings(tx, adapters, shardings))(adapters)

    Args:
      optimizer: the optax transformation (e.g. `masked_optimizer(optax.adamw(...))`, `loralib_adamw(...)`).
      adapters: the adapter tree (arrays or ShapeDtypeStructs).
      shardings: a tree shaped like `adapters` of NamedSharding or None (`jlora.adapter_shardings`).

    Returns a tree shaped like the optimizer state of NamedSharding (None throughout where no adapter is sharded).
    """
    flat = [s for s in jax.tree_util.tree_leaves(shardings) if s is not None]
    meshes = {s.mesh for s in flat}
    if len(meshes) > 1:
        raise ValueError(f"the adapters' shardings use {len(meshes)} different meshes; an optimizer state needs "
                         f"one: place every adapter on the same mesh")
    replicated = jax.sharding.NamedSharding(meshes.pop(), jax.sharding.PartitionSpec()) if flat else None
    abstract = jax.eval_shape(optimizer.init, adapters)
    return optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s if s is not None else replicated, abstract, shardings,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: x is None)

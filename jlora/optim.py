"""`masked_optimizer`: an optax transform that updates only trainable leaves."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from jlora.config import LoraConfig
from jlora.partition import trainable_mask


def masked_optimizer(inner: optax.GradientTransformation, trainable=None) -> optax.GradientTransformation:
    """`inner` on the trainable leaves; `optax.set_to_zero()` on the rest, so frozen leaves get no optimizer
    state, no update and no weight decay.

    Args:
      inner: any optax transformation, e.g. `optax.adamw(2e-4, weight_decay=0.01)`.
      trainable: which leaves train: a bool pytree, a callable `params -> bool pytree` (optax's mask
        convention), or a `LoraConfig` (lora pairs plus the leaves it trains in full). None: lora pairs only.
    """
    if trainable is None or isinstance(trainable, LoraConfig):
        config = trainable

        def labels_fn(params):
            return _labels(trainable_mask(params, config))
    elif callable(trainable):
        fn: Callable = trainable

        def labels_fn(params):
            return _labels(fn(params))
    else:
        mask = trainable

        def labels_fn(params):
            return _labels(mask)

    return optax.partition({"trainable": inner, "frozen": optax.set_to_zero()}, labels_fn)


def _labels(mask):
    return jax.tree_util.tree_map(lambda m: "trainable" if m else "frozen", mask)

"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): `lora_b` learns `ratio` times
faster than `lora_a`, grouped exactly as PEFT's `create_loraplus_optimizer` groups a model's parameters.

    tx = jlora.loraplus(optax.adamw, 2e-4, ratio=16, trainable=config)
    state = tx.init(adapters)
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable

import jax
import optax

from jlora.config import LoraConfig
from jlora.optim import _check_only_pairs
from jlora.partition import trainable_mask
from jlora.paths import PAIR_KEYS, path_str

GROUPS = ("a", "b", "b_no_decay", "embedding", "frozen")  # the labels of `loraplus_labels`


def _is_embedding_weight(weight_path: str) -> bool:
    """Flax's `nn.Embed` / `nnx.Embed` table leaf: `.../embedding`."""
    return weight_path.rpartition("/")[2] == "embedding"


def _no_decay(path: str) -> bool:
    """PEFT (transformers' `get_parameter_names(model, ALL_LAYERNORM_LAYERS)`, less names holding 'bias'): a path
    holding 'bias', or a LayerNorm gain, flax's `scale` leaf."""
    return "bias" in path or path.rpartition("/")[2] == "scale"


def loraplus_labels(tree, trainable=None, *, is_embedding: Callable[[str], bool] | None = None):
    """The LoRA+ group of each leaf of `tree` (an adapters tree, or any tree holding lora pairs), a str pytree like
    `tree`, by PEFT's `create_loraplus_optimizer` rule, in its order:

    - 'embedding': `lora_a` / `lora_b` (and a DoRA `magnitude`) of a pair on an embedding (`is_embedding(weight
      path)`; default: the leaf is named `embedding`, flax's `Embed` table), PEFT's `lora_embedding_A` / `_B`;
    - 'b': `lora_b`, and every other 1-D leaf (biases, norm gains, DoRA magnitudes: PEFT's `param.ndim == 1`), except
    - 'b_no_decay': those of them whose path holds 'bias' or that are a norm gain (`scale`);
    - 'a': every other trainable leaf (`lora_a`, kernels of `modules_to_save`);
    - 'frozen': leaves that do not train (`trainable`, as `jlora.masked_optimizer` reads it).
    """
    is_embedding = is_embedding or _is_embedding_weight
    mask = _mask(tree, trainable)

    def label(key_path, leaf, train):
        if not train:
            return "frozen"
        path = path_str(key_path)
        owner, _, name = path.rpartition("/")
        if name in PAIR_KEYS and is_embedding(owner):
            return "embedding"
        if name == "lora_b" or getattr(leaf, "ndim", None) == 1:
            return "b_no_decay" if _no_decay(path) else "b"
        return "a"

    return jax.tree_util.tree_map_with_path(label, tree, mask)


def _mask(tree, trainable):
    config = getattr(trainable, "config", trainable)  # a LoraTransform carries its config
    if trainable is None or isinstance(config, LoraConfig):
        mask = trainable_mask(tree, config)
        if config is None:
            _check_only_pairs(tree, mask)
        return mask
    return trainable(tree) if callable(trainable) else trainable


def _scaled(lr, k: float):
    """`k * lr`, for a number or an optax schedule."""
    if callable(lr):
        return lambda step: k * lr(step)
    return k * lr


def _check_lr(name: str, lr):
    if not (callable(lr) or (isinstance(lr, numbers.Real) and not isinstance(lr, bool) and lr >= 0)):
        raise ValueError(f"loraplus: {name} must be a number >= 0 or an optax schedule step -> lr, got {lr!r}")


def _takes_weight_decay(factory) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "weight_decay" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def loraplus(inner_factory: Callable[..., optax.GradientTransformation], lr, ratio: float = 16, *,
             embedding_lr=1e-6, weight_decay: float = 0.0, trainable=None,
             is_embedding: Callable[[str], bool] | None = None, **kwargs) -> optax.GradientTransformation:
    """LoRA+: `inner_factory(learning_rate=..., **kwargs)` per group of PEFT's `create_loraplus_optimizer`, joined
    by `optax.partition`; the leaves that do not train get `optax.set_to_zero()` (no state, no update).

        tx = jlora.loraplus(optax.adamw, 1e-4, ratio=16, trainable=lora)   # lora_b at 1.6e-3, lora_a at 1e-4

    Groups (`loraplus_labels`) and their learning rate / weight decay, PEFT's:
      'a' (`lora_a`, >= 2-D leaves trained in full): `lr`, `weight_decay`;
      'b' (`lora_b`, 1-D leaves trained in full): `ratio * lr`, `weight_decay`;
      'b_no_decay' (the 1-D biases and norm gains of 'b'): `ratio * lr`, 0;
      'embedding' (both factors of a pair on an embedding table): `embedding_lr`, `weight_decay`.

    Args:
      inner_factory: an optax optimizer factory taking `learning_rate` (e.g. `optax.adamw`, `optax.adam`,
        `optax.sgd`, `jlora.loralib_adamw`); called once per group.
      lr: PEFT's `lr`, the learning rate of `lora_a` (a number >= 0 or an optax schedule).
      ratio: PEFT's `loraplus_lr_ratio`, lr(lora_b) / lr(lora_a); the paper recommends 2**4.
      embedding_lr: PEFT's `loraplus_lr_embedding` (default 1e-6, PEFT's), for pairs on an embedding.
      weight_decay: PEFT's `loraplus_weight_decay` (default 0.0, PEFT's), passed to the factory as `weight_decay=`
        for every group but 'b_no_decay' (0.0), wherever the factory takes it (so `optax.adamw`'s own default
        1e-4 is replaced, as PEFT's groups replace AdamW's 0.01); a factory without it (`optax.adam`) and a
        non-zero weight_decay is a TypeError.
      trainable: which leaves train, as `jlora.masked_optimizer` takes it: a `LoraConfig` or `LoraTransform` (lora
        pairs plus what the config trains in full), a bool pytree, a callable `params -> bool pytree`; None: the
        lora pairs only (a tree holding other arrays is then a ValueError at `init`).
      is_embedding: `weight path -> bool`, which pairs sit on an embedding table (PEFT's `lora.Embedding` layers);
        default: the weight leaf is named `embedding` (flax's `Embed`).
      **kwargs: passed to every `inner_factory` call (e.g. `b1`, `eps`).

    Returns an `optax.GradientTransformation` over the tree given to `init` (the adapters, or any tree holding lora
    pairs); the updates keep each leaf's shape and dtype.
    """
    if isinstance(inner_factory, optax.GradientTransformation):
        raise TypeError("loraplus: inner_factory is an optimizer already built (e.g. optax.adamw(1e-4)); pass the "
                        "factory itself, loraplus(optax.adamw, 1e-4, ratio=16), which sets each group's rate")
    if not callable(inner_factory):
        raise TypeError(f"loraplus: inner_factory must be an optax optimizer factory such as optax.adamw (called "
                        f"with learning_rate=...), got {type(inner_factory).__name__}")
    _check_lr("lr", lr)
    _check_lr("embedding_lr", embedding_lr)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio > 0:
        raise ValueError(f"loraplus: ratio (PEFT's loraplus_lr_ratio, lr(lora_b) / lr(lora_a)) must be a number > 0, "
                         f"got {ratio!r}; the paper uses 16")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise ValueError(f"loraplus: weight_decay must be a number >= 0, got {weight_decay!r}")
    if "learning_rate" in kwargs:
        raise TypeError("loraplus: pass the learning rate as `lr` (and `ratio`, `embedding_lr`), not learning_rate=")
    takes_wd = _takes_weight_decay(inner_factory)
    if weight_decay and not takes_wd:
        raise TypeError(f"loraplus: weight_decay={weight_decay} but {getattr(inner_factory, '__name__', 'the factory')}"
                        f" takes no weight_decay argument; use a decoupled-decay optimizer such as optax.adamw, or "
                        f"weight_decay=0")

    def make(rate, wd):
        extra = {"weight_decay": wd} if takes_wd else {}
        return inner_factory(learning_rate=rate, **extra, **kwargs)

    transforms = {"a": make(lr, weight_decay), "b": make(_scaled(lr, ratio), weight_decay),
                  "b_no_decay": make(_scaled(lr, ratio), 0.0), "embedding": make(embedding_lr, weight_decay),
                  "frozen": optax.set_to_zero()}
    return optax.partition(transforms, lambda params: loraplus_labels(params, trainable, is_embedding=is_embedding))

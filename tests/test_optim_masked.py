"""`masked_optimizer`'s default: a head trained in full is never silently left without updates."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="classifier")(nn.Dense(19, name="query")(x))


X = jnp.ones((3, 11))
VARS = Classifier().init(jax.random.key(0), X)
CONFIG = jlora.LoraConfig(rank=7, alpha=14, targets=("query",), modules_to_save=("classifier",))
LORA = jlora.lora_transform(Classifier().apply, CONFIG)


def _updates(tx, adapters):
    grads = jax.tree.map(jnp.ones_like, adapters)
    return tx.update(grads, tx.init(adapters), adapters)[0]


def test_default_refuses_a_tree_with_leaves_trained_in_full():
    _, adapters = LORA.init(VARS, X, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"params/classifier/kernel.*trainable=config"):
        jlora.masked_optimizer(optax.sgd(1.0)).init(adapters)


@pytest.mark.parametrize("trainable", [CONFIG, LORA], ids=["config", "transform"])
def test_config_or_transform_trains_the_head(trainable):
    _, adapters = LORA.init(VARS, X, key=jax.random.key(1))
    updates = _updates(jlora.masked_optimizer(optax.sgd(1.0), trainable), adapters)
    assert all(np.all(np.asarray(u) == -1.0) for u in jax.tree.leaves(updates))
    assert updates["params"]["classifier"]["kernel"].shape == (19, 5)


def test_default_on_pairs_only_and_explicit_freeze():
    _, adapters = jlora.lora_transform(Classifier().apply, jlora.LoraConfig(rank=7, targets=("query",))).init(
        VARS, X, key=jax.random.key(1))
    updates = _updates(jlora.masked_optimizer(optax.sgd(1.0)), adapters)  # only pairs: the default is fine
    assert all(np.all(np.asarray(u) == -1.0) for u in jax.tree.leaves(updates))
    _, with_head = LORA.init(VARS, X, key=jax.random.key(1))
    frozen_head = _updates(jlora.masked_optimizer(optax.sgd(1.0), jlora.trainable_mask(with_head)), with_head)
    assert not np.any(np.asarray(frozen_head["params"]["classifier"]["kernel"]))
    assert np.all(np.asarray(frozen_head["params"]["query"]["kernel"]["lora_a"]) == -1.0)

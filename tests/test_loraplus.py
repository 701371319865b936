"""`jlora.loraplus`: LoRA+'s learning-rate groups, against PEFT's `create_loraplus_optimizer` (torch AdamW)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.variants.loraplus import loraplus, loraplus_labels

VOCAB, IN, OUT, HEAD, R = 23, 11, 19, 5, 7
LR, RATIO, EMB_LR, WD = 1e-2, 16.0, 1e-3, 0.1


class Net(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, IN, name="emb")(tokens)
        return nn.Dense(HEAD, name="head")(nn.LayerNorm(name="ln")(nn.Dense(OUT, name="q")(x)))


TOKENS = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
CONFIG = jlora.LoraConfig(rank=R, alpha=14, targets=("emb", "q"), modules_to_save=("ln", "head"), bias="lora_only")
LORA = jlora.lora_transform(Net().apply, CONFIG)
FROZEN, ADAPTERS = LORA.init(Net().init(jax.random.key(0), TOKENS), TOKENS, key=jax.random.key(1))
EXPECTED = {"params/emb/embedding/lora_a": "embedding", "params/emb/embedding/lora_b": "embedding",
            "params/q/kernel/lora_a": "a", "params/q/kernel/lora_b": "b", "params/q/bias": "b_no_decay",
            "params/ln/scale": "b_no_decay", "params/ln/bias": "b_no_decay", "params/head/kernel": "a",
            "params/head/bias": "b_no_decay"}


def _flat(tree):
    return {jlora.paths.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _random(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), tree)


def test_labels_follow_peft_rule():
    assert _flat(loraplus_labels(ADAPTERS, CONFIG)) == EXPECTED


def test_rates_per_group_eager_and_jit():
    """sgd: each group's update is -rate * grad exactly, so the rate of every leaf is read off."""
    tx = loraplus(optax.sgd, LR, RATIO, embedding_lr=EMB_LR, trainable=CONFIG)
    grads = jax.tree.map(jnp.ones_like, ADAPTERS)
    rate = {"a": LR, "b": LR * RATIO, "b_no_decay": LR * RATIO, "embedding": EMB_LR}
    for update in (tx.update, jax.jit(tx.update)):
        updates = _flat(update(grads, tx.init(ADAPTERS), ADAPTERS)[0])
        for path, label in EXPECTED.items():
            np.testing.assert_allclose(updates[path], -rate[label], rtol=1e-6, err_msg=path)


def test_schedule_scales_with_ratio_and_frozen_leaves_get_nothing():
    tx = loraplus(optax.sgd, optax.linear_schedule(1.0, 0.0, 4), 4.0, trainable=jlora.trainable_mask(ADAPTERS))
    grads = jax.tree.map(jnp.ones_like, ADAPTERS)
    state = tx.init(ADAPTERS)
    _, state = tx.update(grads, state, ADAPTERS)
    updates = _flat(tx.update(grads, state, ADAPTERS)[0])  # step 1: lr 0.75
    np.testing.assert_allclose(updates["params/q/kernel/lora_a"], -0.75)
    np.testing.assert_allclose(updates["params/q/kernel/lora_b"], -3.0)
    np.testing.assert_array_equal(updates["params/head/kernel"], 0.0)  # not a lora leaf: frozen by the mask


def test_weight_decay_reaches_the_factory_and_replaces_its_default():
    params = _random(ADAPTERS, 0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = loraplus(optax.adamw, LR, RATIO, trainable=CONFIG)  # weight_decay 0.0: adamw's 1e-4 must not apply
    updates = _flat(tx.update(zeros, tx.init(params), params)[0])
    assert all(not np.any(u) for u in updates.values())
    tx = loraplus(optax.adamw, LR, RATIO, weight_decay=WD, trainable=CONFIG)
    updates, p = _flat(tx.update(zeros, tx.init(params), params)[0]), _flat(params)
    np.testing.assert_allclose(updates["params/q/kernel/lora_b"], -LR * RATIO * WD * p["params/q/kernel/lora_b"],
                               rtol=1e-6)
    np.testing.assert_array_equal(updates["params/q/bias"], 0.0)  # b_no_decay


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(inner_factory=optax.adamw(1e-3)), TypeError, "pass the factory"),
    (dict(inner_factory=3), TypeError, "optimizer factory"),
    (dict(lr=-1.0), ValueError, "lr must be"),
    (dict(embedding_lr="1e-6"), ValueError, "embedding_lr must be"),
    (dict(ratio=0), ValueError, "ratio"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be"),
    (dict(inner_factory=optax.adam, weight_decay=0.1), TypeError, "takes no weight_decay"),
    (dict(learning_rate=1e-3), TypeError, "as `lr`"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(inner_factory=optax.adamw, lr=1e-3, ratio=16) | kwargs
    with pytest.raises(error, match=match):
        loraplus(args.pop("inner_factory"), args.pop("lr"), args.pop("ratio"), **args)


def test_default_trainable_refuses_full_leaves():
    tx = loraplus(optax.adamw, 1e-3)
    with pytest.raises(ValueError, match="trains only lora_a/lora_b"):
        tx.init(ADAPTERS)


# --- PEFT's create_loraplus_optimizer as the oracle -------------------------------------------------------------

# PEFT parameter name (less base_model.model.) -> (jlora path, transpose to torch layout)
TORCH_NAMES = {"emb.lora_embedding_A.default": ("params/emb/embedding/lora_a", True),
               "emb.lora_embedding_B.default": ("params/emb/embedding/lora_b", True),
               "q.lora_A.default.weight": ("params/q/kernel/lora_a", True),
               "q.lora_B.default.weight": ("params/q/kernel/lora_b", True),
               "q.base_layer.bias": ("params/q/bias", False),
               "ln.modules_to_save.default.weight": ("params/ln/scale", False),
               "ln.modules_to_save.default.bias": ("params/ln/bias", False),
               "head.modules_to_save.default.weight": ("params/head/kernel", True),
               "head.modules_to_save.default.bias": ("params/head/bias", False)}


def _peft_model():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.q = torch.nn.Embedding(VOCAB, IN), torch.nn.Linear(IN, OUT)
            self.ln, self.head = torch.nn.LayerNorm(OUT), torch.nn.Linear(OUT, HEAD)

    cfg = peft.LoraConfig(r=R, lora_alpha=14, target_modules=["emb", "q"], modules_to_save=["ln", "head"],
                          bias="lora_only")
    return peft.get_peft_model(TorchNet(), cfg)


@pytest.mark.reference
def test_matches_peft_create_loraplus_optimizer():
    torch = pytest.importorskip("torch")
    from peft.optimizers import create_loraplus_optimizer

    model = _peft_model()
    names = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(names) == set(TORCH_NAMES)
    params = _random(ADAPTERS, 1)  # lora_b non-zero
    flat = _flat(params)
    with torch.no_grad():
        for name, (path, t) in TORCH_NAMES.items():
            names[name].copy_(torch.from_numpy(np.array(flat[path].T if t else flat[path])))
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                    loraplus_lr_embedding=EMB_LR, loraplus_weight_decay=WD)
    # group membership, learning rates and weight decays
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    hyper = {"a": (LR, WD), "b": (LR * RATIO, WD), "b_no_decay": (LR * RATIO, 0.0), "embedding": (EMB_LR, WD)}
    labels = _flat(loraplus_labels(params, CONFIG))
    for name, (path, _) in TORCH_NAMES.items():
        assert by_param[id(names[name])] == pytest.approx(hyper[labels[path]]), name
    # three AdamW steps on the same gradients
    tx = loraplus(optax.adamw, LR, RATIO, embedding_lr=EMB_LR, weight_decay=WD, trainable=CONFIG)
    state, update = tx.init(params), jax.jit(tx.update)
    for step in range(3):
        grads = _random(params, 10 + step)
        g = _flat(grads)
        for name, (path, t) in TORCH_NAMES.items():
            names[name].grad = torch.from_numpy(np.array(g[path].T if t else g[path]))
        opt.step()
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    flat = _flat(params)
    for name, (path, t) in TORCH_NAMES.items():
        got = names[name].detach().numpy()
        np.testing.assert_allclose(flat[path], got.T if t else got, rtol=1e-5, atol=1e-5, err_msg=name)

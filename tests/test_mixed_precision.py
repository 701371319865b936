"""Mixed precision: adapters are a float32 master copy whatever the base dtype, cast to the weight's dtype where
they are used (PEFT's `autocast_adapter_dtype`); `LoraConfig.dtype` overrides. A bfloat16 GPT-2 trains float32
adapters with float32 AdamW moments, and its loss stays within bfloat16 tolerance of the float32 run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.models.gpt2 import GPT2Config, GPT2LMHeadModel

CFG = GPT2Config(vocab_size=53, n_positions=16, n_embd=24, n_layer=2, n_head=2)
LORA = jlora.LoraConfig(rank=7, alpha=14, targets=("c_attn", "c_fc"))
IDS = jax.random.randint(jax.random.key(5), (3, 11), 0, CFG.vocab_size)


def _model(dtype):
    model = GPT2LMHeadModel(CFG, dtype=dtype)
    variables = model.init(jax.random.key(0), IDS)
    return model, jax.tree.map(lambda x: x.astype(dtype), variables)


def _loss(logits):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, IDS[:, 1:, None], -1))


def _train(dtype, steps=3):
    """(losses, adapters, optimizer state) after `steps` AdamW steps on a GPT-2 whose weights are in `dtype`."""
    model, variables = _model(dtype)
    lora = jlora.lora_transform(model.apply, LORA)
    frozen, adapters = lora.init(variables, IDS, key=jax.random.key(1))
    opt = jlora.masked_optimizer(optax.adamw(1e-2))
    state = opt.init(adapters)

    @jax.jit
    def step(adapters, state):
        loss, g = jax.value_and_grad(lambda a: _loss(lora.apply(frozen, a, IDS)))(adapters)
        updates, state = opt.update(g, state, adapters)
        return optax.apply_updates(adapters, updates), state, loss

    losses = []
    for _ in range(steps):
        adapters, state, loss = step(adapters, state)
        losses.append(float(loss))
    return losses, adapters, state


def _float_dtypes(tree):
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bfloat16_base_trains_float32_adapters_within_bfloat16_tolerance():
    losses16, adapters16, state16 = _train(jnp.bfloat16)
    losses32, adapters32, _ = _train(jnp.float32)
    pairs = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(adapters16)
             if str(path[-1].key).startswith("lora_")]
    assert pairs and {x.dtype for x in pairs} == {jnp.dtype(jnp.float32)}  # unchanged after 3 steps
    moments = [leaf for leaf in jax.tree.leaves(state16) if getattr(leaf, "ndim", 0) >= 2]
    assert moments and _float_dtypes(moments) == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(losses16, losses32, rtol=2e-2)  # bfloat16: 8 bits of mantissa
    assert losses16[-1] < losses16[0]  # it trains
    b16, b32 = (a["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]["lora_b"]
                for a in (adapters16, adapters32))
    assert float(jnp.abs(b32).max()) > 0
    # Adam's near-sign updates flip for the few elements whose gradient is within bfloat16 noise of zero
    assert float(jnp.linalg.norm(b16 - b32) / jnp.linalg.norm(b32)) < 0.2


def test_adapters_follow_config_dtype_and_float64_base():
    model, variables = _model(jnp.bfloat16)
    config = jlora.LoraConfig(rank=7, alpha=14, targets=("c_attn", "c_fc"), dtype="bfloat16")
    lora = jlora.lora_transform(model.apply, config)
    _, adapters = lora.init(variables, IDS, key=jax.random.key(1))
    assert _float_dtypes(adapters) == {jnp.dtype(jnp.bfloat16)}
    w = {"w": np.ones((11, 19), np.float64)}
    with jax.enable_x64(True):
        lora64 = jlora.lora_transform(lambda p, x: x @ p["w"], jlora.LoraConfig(rank=7, targets=("w",)))
        _, ad64 = lora64.init(w, np.ones((3, 11)), key=jax.random.key(1))
        assert _float_dtypes(ad64) == {jnp.dtype(jnp.float64)}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_base_gets_float32_factors_and_a_low_precision_output(dtype):
    model, variables = _model(dtype)
    lora = jlora.lora_transform(model.apply, LORA)
    frozen, adapters = lora.init(variables, IDS, key=jax.random.key(1))
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    y = lora.apply(frozen, jax.tree.map(lambda a: a + 0.01, adapters), IDS)
    assert y.dtype == model.apply(variables, IDS).dtype  # computed in the base's dtype, as without LoRA

"""Per-row routing: `multi.apply(frozen, stacked, x, adapter_ids=ids)` gives row i the adapter ids[i] (-1: the
base alone), the base product shared by the whole batch; equal to each adapter alone on its rows, through jit
(no retrace as ids change), gradients, a quantized base, and generation (greedy and beam search, KV cache)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models.generation import cached_step, generate
from jlora.models.gpt2 import GPT2Config, GPT2LMHeadModel
from tests.helpers import perturb

CFG = GPT2Config(vocab_size=53, n_positions=32, n_embd=24, n_layer=1, n_head=2)
MODEL = GPT2LMHeadModel(CFG)
TOKENS = jax.random.randint(jax.random.key(5), (5, 7), 0, CFG.vocab_size)
TARGETS = ("c_attn", "c_fc", "c_proj", "wte")
CONFIGS = [jlora.LoraConfig(rank=7, alpha=14, targets=TARGETS), jlora.LoraConfig(rank=3, alpha=3, targets=TARGETS),
           jlora.LoraConfig(rank=5, alpha=20, targets=TARGETS, scaling="rslora")]
IDS = jnp.array([2, 0, -1, 1, 2])


@pytest.fixture(scope="module")
def setup():
    variables = MODEL.init(jax.random.key(0), TOKENS)
    loras = [jlora.lora_transform(MODEL.apply, c) for c in CONFIGS]
    frozen = loras[0].init(variables, TOKENS, key=jax.random.key(1))[0]
    adapters = [perturb(lora.init(variables, TOKENS, key=jax.random.key(10 + k))[1], seed=k)
                for k, lora in enumerate(loras)]
    stacked, sc = jlora.multi.stack(adapters, CONFIGS)
    return frozen, loras, adapters, stacked, jlora.multi.stacked_transform(MODEL.apply, sc)


def _close(got, want):
    """f32 agreement at 1e-5 of the outputs' scale (logits reach ~30 here)."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def _alone(frozen, loras, adapters, ids, tokens):
    rows = []
    for i, k in enumerate(np.asarray(ids)):
        x = tokens[i : i + 1]
        rows.append(jax.jit(MODEL.apply)(frozen, x) if k < 0 else jax.jit(loras[k].apply)(frozen, adapters[k], x))
    return jnp.concatenate(rows)


def test_each_row_gets_its_adapter_and_changing_ids_does_not_retrace(setup):
    frozen, loras, adapters, stacked, multi = setup
    want = _alone(frozen, loras, adapters, IDS, TOKENS)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(stacked, ids, tokens):
        return multi.apply(frozen, stacked, tokens, adapter_ids=ids)

    _close(run(stacked, IDS, TOKENS), want)
    other = jnp.array([0, 0, 1, -1, 1])
    _close(run(stacked, other, TOKENS), _alone(frozen, loras, adapters, other, TOKENS))
    # the rows really differ by adapter: the same tokens under adapters 0 and 1 give other logits
    same = jnp.tile(TOKENS[:1], (2, 1))
    y = jax.jit(lambda s, i, t: multi.apply(frozen, s, t, adapter_ids=i))(stacked, jnp.array([0, 1]), same)
    assert not np.allclose(y[0], y[1], atol=1e-3)


def test_gradients_of_a_mixed_batch_are_each_adapters_own(setup):
    frozen, loras, adapters, stacked, multi = setup

    def mixed(s):
        return jnp.sum(multi.apply(frozen, s, TOKENS, adapter_ids=IDS) ** 2)

    grads = jax.jit(jax.grad(mixed))(stacked)
    for k in range(3):
        rows = TOKENS[np.asarray(IDS) == k]
        g = jax.jit(jax.grad(lambda a, k=k, rows=rows: jnp.sum(loras[k].apply(frozen, a, rows) ** 2)))(adapters[k])
        got = jlora.multi.unstack(grads, multi.config)[k][0]
        # unstack cuts the padding; the gradient of the padded slots is zero (checked through the full stack)
        jax.tree.map(_close, got, g)


def test_a_quantized_base_routes_too(setup):
    frozen, loras, adapters, stacked, multi = setup
    frozen_q = jlora.quantize(frozen, qtype="int8", block_size=8)
    want = _alone(jlora.dequantize(frozen_q), loras, adapters, IDS, TOKENS)
    got = jax.jit(lambda f, s: multi.apply(f, s, TOKENS, adapter_ids=IDS))(frozen_q, stacked)
    _close(got, want)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_generation_with_a_mixed_batch(setup, strategy):
    frozen, loras, adapters, stacked, multi = setup
    prompt, ids = TOKENS[:3, :4], jnp.array([1, -1, 2])
    kw = dict(max_new_tokens=5, strategy=strategy, num_beams=2)
    got = generate(cached_step(multi.routed_apply, frozen, stacked, ids), prompt,
                   cache=MODEL.init_cache(3, 16), **kw)
    for i, k in enumerate(np.asarray(ids)):
        step = cached_step(MODEL.apply, frozen) if k < 0 else cached_step(loras[k].apply, frozen, adapters[k])
        alone = generate(step, prompt[i : i + 1], cache=MODEL.init_cache(1, 16), **kw)
        np.testing.assert_array_equal(got[i : i + 1], alone)


def test_routing_refuses_what_it_cannot_route(setup):
    frozen, _, _, stacked, multi = setup
    with pytest.raises(ValueError, match=r"adapter_ids must be an integer array of shape \(5,\)"):
        multi.apply(frozen, stacked, TOKENS, adapter_ids=jnp.array([0, 1]))
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 2\]"):
        multi.apply(frozen, stacked, TOKENS, adapter_ids=jnp.array([0, 1, 3, 0, 0]))
    with pytest.raises(ValueError, match="adapter_ids must be an integer array"):
        multi.apply(frozen, stacked, TOKENS, adapter_ids=jnp.zeros((5,)))


def test_lora_apply_routes_a_stack_of_adapters_of_its_own_config():
    """The issue's spelling: `lora.apply(frozen, stacked, x, adapter_ids=ids)` on K adapters of the transform's
    own config stacked leaf by leaf; equal to each adapter alone, jit and eager; bad stacks and ids refused."""
    config = jlora.LoraConfig(rank=7, alpha=14, targets=("c_attn", "c_fc"))
    lora = jlora.lora_transform(MODEL.apply, config)
    variables = MODEL.init(jax.random.key(0), TOKENS)
    frozen = lora.init(variables, TOKENS, key=jax.random.key(1))[0]
    adapters = [perturb(lora.init(variables, TOKENS, key=jax.random.key(20 + k))[1], seed=k) for k in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *adapters)
    want = _alone(frozen, [lora] * 3, adapters, IDS, TOKENS)
    _close(lora.apply(frozen, stacked, TOKENS, adapter_ids=IDS), want)
    _close(jax.jit(lora.apply)(frozen, stacked, TOKENS, adapter_ids=IDS), want)
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 2\]"):
        lora.apply(frozen, stacked, TOKENS, adapter_ids=jnp.array([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="same leading axis K"):
        lora.apply(frozen, adapters[0], TOKENS, adapter_ids=IDS)  # one adapter, not a stack

"""jlora.models.gpt2 against transformers' GPT2LMHeadModel, its cache, its loader's errors, and LoRA on it.

    python -m pytest -q tests/test_gpt2.py

A tiny random GPT-2 (2 layers, d 48, 4 heads, vocab 113, 64 positions; initializer_range 0.2 so that logits are
spread and argmax decisions are not near-ties) is saved with `save_pretrained(safe_serialization=True)` and read back.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb
from torch_oracles import TINY_GPT2, save_tiny_gpt2

import jlora
from jlora.models import gpt2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BATCH, SEQ = 3, 17
TINY = TINY_GPT2
VOCAB, D, HEADS, LAYERS, POSITIONS = (TINY[k] for k in ("vocab_size", "n_embd", "n_head", "n_layer", "n_positions"))
save_tiny = save_tiny_gpt2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    return directory, save_tiny(directory)


@pytest.fixture(scope="module")
def loaded(tiny):
    """(model, variables, jitted model.apply) of the tiny checkpoint."""
    model, variables = gpt2.from_pretrained(tiny[0])
    return model, variables, jax.jit(model.apply, static_argnames="deterministic")


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def test_parameter_paths_mirror_hf(loaded):
    _, variables, _ = loaded
    paths = {"/".join(str(k.key) for k in p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
    assert paths["params/transformer/wte/embedding"] == (VOCAB, D)
    assert paths["params/transformer/wpe/embedding"] == (POSITIONS, D)
    assert paths["params/transformer/h/1/attn/c_attn/kernel"] == (D, 3 * D)  # Conv1D (in, out), one fused kernel
    assert paths["params/transformer/h/0/mlp/c_fc/kernel"] == (D, 4 * D)
    assert paths["params/transformer/ln_f/scale"] == (D,)
    assert len(paths) == 4 + 12 * LAYERS  # no lm_head: tied to wte


@pytest.mark.reference
def test_logits_match_transformers(tiny, loaded, ids):
    _, variables, apply = loaded
    got = apply(variables, ids)  # shape=(batch, seq, vocab)
    want = hf_logits(tiny[1], ids)
    assert got.dtype == jnp.float32 and got.shape == (BATCH, SEQ, VOCAB)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.reference
def test_bare_gpt2model_and_untied_head(tmp_path, ids):
    torch.manual_seed(1)
    base = transformers.GPT2Model(transformers.GPT2Config(**TINY)).eval()
    base.save_pretrained(tmp_path / "bare", safe_serialization=True)  # keys without "transformer."
    model, variables = gpt2.from_pretrained(tmp_path / "bare")
    with torch.no_grad():
        hidden = base(torch.tensor(np.asarray(ids), dtype=torch.long)).last_hidden_state
        want = (hidden @ base.wte.weight.T).numpy()
    np.testing.assert_allclose(model.apply(variables, ids), want, atol=1e-4, rtol=0)

    hf_model = save_tiny(tmp_path / "untied", seed=2, tie_word_embeddings=False)
    model, variables = gpt2.from_pretrained(tmp_path / "untied")
    assert variables["params"]["lm_head"]["kernel"].shape == (D, VOCAB)  # lm_head.weight (vocab, d) transposed
    np.testing.assert_allclose(model.apply(variables, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=0)


@pytest.mark.reference
def test_bfloat16_close(tiny, ids):
    model, variables = gpt2.from_pretrained(tiny[0], dtype=jnp.bfloat16)  # parameters and computation in bf16
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    got = jax.jit(model.apply)(variables, ids)
    want = hf_logits(tiny[1], ids)
    assert got.dtype == jnp.float32
    err = float(np.max(np.abs(np.asarray(got) - want)))
    assert err < 0.05 * float(np.max(np.abs(want))), err
    assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) > 0.9


def test_cache_matches_full_forward(loaded, ids):
    model, variables, apply = loaded
    full = apply(variables, ids)
    cache = model.init_cache(BATCH, SEQ + 2)
    assert cache["k"].shape == (LAYERS, BATCH, SEQ + 2, HEADS, D // HEADS) and cache["index"].dtype == jnp.int32
    chunks, pieces = [(0, 5), (5, 9)] + [(t, t + 1) for t in range(9, SEQ)], []
    for start, stop in chunks:  # a 5-token prefill, a 4-token chunk, then one token at a time
        logits, cache = apply(variables, ids[:, start:stop], cache=cache)
        pieces.append(logits)
    assert int(cache["index"]) == SEQ
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_nan_and_bad_cache_raises(loaded, ids):
    model, variables, apply = loaded
    cache = model.init_cache(BATCH, SEQ + 2)
    logits, _ = apply(variables, ids[:, :1], cache={**cache, "index": jnp.int32(SEQ + 1)})  # the last position
    assert np.isfinite(logits).all()
    logits, _ = apply(variables, ids[:, :1], cache={**cache, "index": jnp.int32(SEQ + 2)})  # one past the end
    assert np.isnan(logits).all()
    with pytest.raises(ValueError, match=r"n_layer=2, batch=2"):
        model.apply(variables, ids[:2, :3], cache=model.init_cache(BATCH, 8))
    with pytest.raises(ValueError, match="max_len=65"):
        model.init_cache(1, POSITIONS + 1)


def test_dropout_changes_output_only_when_not_deterministic(loaded, ids):
    model, variables, apply = loaded
    assert model.config.attn_pdrop == 0.1  # read from config.json; inactive unless deterministic=False
    a = apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.key(0)})
    b = apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    np.testing.assert_array_equal(apply(variables, ids, rngs={"dropout": jax.random.key(0)}), apply(variables, ids))


def test_loader_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        gpt2.from_pretrained(tmp_path / "missing" / "dir")
    bad = tmp_path / "bad"
    shutil.copytree(tiny[0], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    expected = r"transformer\.wte\.weight: checkpoint \(113, 48\), model expects \(113, 64\)"
    with pytest.raises(ValueError, match=expected):
        gpt2.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama", "architectures": ["LlamaModel"]}))
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint: model_type='llama'"):
        gpt2.from_pretrained(bad)
    with pytest.raises(ValueError, match="not divisible"):
        gpt2.GPT2Config(n_embd=50, n_head=4)
    with pytest.raises(ValueError, match="activation"):
        gpt2.GPT2Config(activation="tanh")


LORA = jlora.LoraConfig(rank=4, alpha=8, targets=("c_attn",), fused={"c_attn": (True, False, True)})


def test_lora_fused_c_attn_factored_equals_merged_with_cache(loaded, ids):
    model, variables, apply = loaded
    lora = jlora.lora_transform(model.apply, LORA, strict=True)
    frozen, adapters = lora.init(variables, ids, key=jax.random.key(0))
    pair = adapters["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert pair["lora_a"].shape == (D, 2 * 4) and pair["lora_b"].shape == (4, 2 * D)  # MergedLinear q, v
    assert lora.consumers(variables, ids)["params/transformer/h/0/attn/c_attn/kernel"] == ["dot"]
    lora_apply = jax.jit(lora.apply)
    np.testing.assert_allclose(lora_apply(frozen, adapters, ids), apply(variables, ids), atol=1e-5)  # B = 0

    adapters = perturb(adapters)
    merged = jlora.merge(frozen, adapters, LORA)
    want = apply(merged, ids)
    np.testing.assert_allclose(lora_apply(frozen, adapters, ids), want, atol=1e-4, rtol=1e-5)
    assert float(jnp.max(jnp.abs(want - apply(variables, ids)))) > 1e-2  # the adapters do change the model
    cache = model.init_cache(BATCH, SEQ + 2)
    got, got_cache = lora_apply(frozen, adapters, ids[:, :5], cache=cache)
    want, want_cache = apply(merged, ids[:, :5], cache=cache)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(got_cache["k"], want_cache["k"], atol=1e-5, rtol=1e-5)
    got, _ = lora_apply(frozen, adapters, ids[:, 5:9], cache=got_cache)
    np.testing.assert_allclose(got, apply(merged, ids)[:, 5:9], atol=1e-4, rtol=1e-5)


@pytest.mark.reference
@pytest.mark.assets
def test_real_tokenizer_full_vocab_logits_and_greedy_match_transformers(tmp_path, gpt2_tokenizer_dir):
    """A tiny random GPT-2 with the real 50,257-token vocabulary, fed text through the real GPT-2 tokenizer."""
    from jlora.models.generation import cached_step, generate
    from jlora.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(gpt2_tokenizer_dir)
    prompt = jnp.asarray([tokenizer.encode("The LoRA paper adapts GPT-2 on E2E: name[Alimentum]").ids], jnp.int32)
    hf_model = save_tiny(tmp_path, seed=3, vocab_size=50257, n_positions=128, n_embd=32, initializer_range=0.2)
    model, variables = gpt2.from_pretrained(tmp_path)
    np.testing.assert_allclose(model.apply(variables, prompt), hf_logits(hf_model, prompt), atol=1e-4, rtol=0)
    out = generate(cached_step(model.apply, variables), prompt, cache=model.init_cache(1, prompt.shape[1] + 20),
                   max_new_tokens=20)
    with torch.no_grad():
        want = hf_model.generate(torch.tensor(np.asarray(prompt)), attention_mask=torch.ones(prompt.shape, dtype=int),
                                 do_sample=False, max_new_tokens=20, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(out), want)
    assert tokenizer.decode(np.asarray(out[0]).tolist()).startswith("The LoRA paper")

"""jlora.models.generation against transformers' `generate` on a tiny random GPT-2 (see tests/test_gpt2.py).

    python -m pytest -q tests/test_generation.py

Greedy and beam search must give transformers' tokens exactly; the n-gram ban and the top-k/top-p warpers are
compared with transformers' logits processors directly; sampling is checked for reproducibility and support.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb
from torch_oracles import TINY_GPT2, save_tiny_gpt2

import jlora
from jlora.models import gpt2
from jlora.models.generation import ban_ngrams, cached_step, generate, warp_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT, PAD, BATCH = 7, 1, 3
VOCAB = TINY_GPT2["vocab_size"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(hf_model, model, variables, step, prompt (batch, 7))"""
    directory = tmp_path_factory.mktemp("gpt2")
    hf_model = save_tiny_gpt2(directory)
    model, variables = gpt2.from_pretrained(directory)
    prompt = np.random.default_rng(0).integers(1, VOCAB, (BATCH, PROMPT)).astype(np.int32)
    return hf_model, model, variables, cached_step(model.apply, variables), prompt


def hf_generate(hf_model, prompt, **kwargs):
    ids = torch.tensor(prompt, dtype=torch.long)
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=PAD, **kwargs)
    return out.numpy()


def assert_same_tokens(got, want):
    """transformers crops to the longest returned sequence; ours is always prompt + max_new, padded with PAD."""
    got = np.asarray(got).reshape(-1, np.shape(got)[-1])
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1]:] == PAD).all()


@pytest.mark.reference
def test_greedy_matches_transformers(setup):
    hf_model, model, _, step, prompt = setup
    got = generate(step, prompt, cache=model.init_cache(BATCH, PROMPT + 20), max_new_tokens=20)
    assert got.shape == (BATCH, PROMPT + 20) and got.dtype == jnp.int32
    want = hf_generate(hf_model, prompt, do_sample=False, max_new_tokens=20)
    np.testing.assert_array_equal(got, want)
    eos = int(want[0, PROMPT + 5])  # row 0 stops after 6 tokens
    got = generate(step, prompt, cache=model.init_cache(BATCH, PROMPT + 20), max_new_tokens=20, eos_token_id=eos,
                   pad_token_id=PAD)
    want = hf_generate(hf_model, prompt, do_sample=False, max_new_tokens=20, eos_token_id=eos)
    assert (got[0, PROMPT + 6:] == PAD).all()
    assert_same_tokens(got, want)


@pytest.mark.reference
def test_beam_search_matches_transformers(setup):
    hf_model, model, _, step, prompt = setup
    kwargs = dict(num_beams=4, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=12, num_return_sequences=4)
    got = generate(step, prompt, cache=model.init_cache(BATCH, PROMPT + 12), strategy="beam", **kwargs)
    assert got.shape == (BATCH, 4, PROMPT + 12)
    want = hf_generate(hf_model, prompt, do_sample=False, early_stopping=False, **kwargs)
    np.testing.assert_array_equal(np.asarray(got).reshape(BATCH * 4, -1), want)
    for row in np.asarray(got).reshape(BATCH * 4, -1).tolist():  # no 4-gram occurs twice
        grams = [tuple(row[i:i + 4]) for i in range(len(row) - 3)]
        assert len(grams) == len(set(grams))
    # an EOS with which every row's best beam finishes early, so the search stops before max length
    kwargs.update(num_return_sequences=1)
    for eos in dict.fromkeys(want[:, PROMPT:].ravel().tolist()):
        want = hf_generate(hf_model, prompt, do_sample=False, eos_token_id=eos, **kwargs)
        if want.shape[1] < PROMPT + 12:
            break
    assert want.shape[1] < PROMPT + 12 and (want[:, PROMPT:] == eos).any(axis=1).all()
    got = generate(step, prompt, cache=model.init_cache(BATCH, PROMPT + 12), strategy="beam", eos_token_id=eos,
                   pad_token_id=PAD, **kwargs)
    assert got.shape == (BATCH, PROMPT + 12)
    assert_same_tokens(got, want)


@pytest.mark.reference
@pytest.mark.parametrize("n", [1, 2, 3])
def test_ban_ngrams_matches_transformers(n):
    rng = np.random.default_rng(n)
    seq = rng.integers(0, 5, (6, 20)).astype(np.int32)  # a small alphabet: many repeated n-grams
    scores = rng.normal(size=(6, 11)).astype(np.float32)
    for cur_len in (1, n, 9, 20):
        want = transformers.NoRepeatNGramLogitsProcessor(n)(torch.tensor(seq[:, :cur_len]), torch.tensor(scores))
        got = ban_ngrams(jnp.asarray(seq), jnp.int32(cur_len), jnp.asarray(scores), n)  # the buffer past cur_len
        np.testing.assert_array_equal(got, want.numpy())  # holds junk that must not count


@pytest.mark.reference
def test_warp_logits_matches_transformers():
    untied = np.random.default_rng(0).normal(size=(5, 31)).astype(np.float32)
    tied = untied.copy()
    tied[0, :5] = tied[0, 5]  # ties at the top-k boundary are all kept, as in transformers
    for temperature, top_k, top_p in [(0.7, 3, None), (1.3, None, 0.8), (1.0, 3, 0.5), (1.0, None, 1e-6)]:
        scores = tied if top_p is None else untied  # top-p among ties depends on the (unstable) sort order
        want = torch.tensor(scores)
        processors = [transformers.TemperatureLogitsWarper(temperature)]
        processors += [transformers.TopKLogitsWarper(top_k)] if top_k else []
        processors += [transformers.TopPLogitsWarper(top_p)] if top_p else []
        for p in processors:
            want = p(None, want)
        want = want.numpy()
        got = warp_logits(jnp.asarray(scores), temperature=temperature, top_k=top_k, top_p=top_p)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        assert np.isinf(want).any()
        np.testing.assert_allclose(np.where(np.isinf(got), 0, got), np.where(np.isinf(want), 0, want), rtol=1e-6)


def test_sampling_reproducible_and_within_top_k(setup):
    _, model, variables, step, prompt = setup

    def run(key, **kw):  # the shapes of test_greedy_matches_transformers: its greedy compilation is reused
        return generate(step, prompt, cache=model.init_cache(BATCH, PROMPT + 20), max_new_tokens=20,
                        strategy="sample", key=key, **kw)

    a, b, c = run(jax.random.key(0), top_k=3), run(jax.random.key(0), top_k=3), run(jax.random.key(1), top_k=3)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()
    logits = jax.jit(model.apply)(variables, a)[:, PROMPT - 1:-1]  # the distribution each new token came from
    rank = jnp.sum(logits > jnp.take_along_axis(logits, a[:, PROMPT:, None], axis=-1), axis=-1)
    assert int(rank.max()) < 3 and int(rank.max()) > 0  # within the top 3, and not always the argmax
    greedy = generate(step, prompt, cache=model.init_cache(BATCH, PROMPT + 20), max_new_tokens=20)
    np.testing.assert_array_equal(run(jax.random.key(2), top_p=1e-6), greedy)  # top_p -> 0 keeps only the argmax


def test_one_compilation_two_traces(setup):
    _, model, variables, _, prompt = setup
    shapes = []

    def apply(variables, ids, *, cache):
        shapes.append(ids.shape)
        return model.apply(variables, ids, cache=cache)

    for weights in (variables, jax.tree.map(lambda x: x * 0.5, variables)):  # new weights, same shapes: no retrace
        generate(cached_step(apply, weights), prompt, cache=model.init_cache(BATCH, PROMPT + 6), max_new_tokens=6)
    assert shapes == [(BATCH, PROMPT), (BATCH, 1)]  # the prefill and the decode step, traced once each
    plain = generate(lambda ids, cache: apply(variables, ids, cache=cache), prompt,  # a plain callable: static
                     cache=model.init_cache(BATCH, PROMPT + 6), max_new_tokens=6)
    np.testing.assert_array_equal(plain, generate(cached_step(apply, variables), prompt,
                                                  cache=model.init_cache(BATCH, PROMPT + 6), max_new_tokens=6))


def test_lora_generation_factored_equals_merged(setup):
    _, model, variables, _, prompt = setup
    config = jlora.LoraConfig(rank=4, alpha=8, targets=("c_attn",), fused={"c_attn": (True, False, True)})
    lora = jlora.lora_transform(model.apply, config, strict=True)
    frozen, adapters = lora.init(variables, jnp.asarray(prompt), key=jax.random.key(0))
    adapters = perturb(adapters)
    kwargs = dict(max_new_tokens=8, strategy="beam", num_beams=3, no_repeat_ngram_size=2)
    got = generate(cached_step(lora.apply, frozen, adapters), prompt, cache=model.init_cache(BATCH, 16), **kwargs)
    merged = jlora.merge(frozen, adapters, config)
    want = generate(cached_step(model.apply, merged), prompt, cache=model.init_cache(BATCH, 16), **kwargs)
    base = generate(cached_step(model.apply, variables), prompt, cache=model.init_cache(BATCH, 16), **kwargs)
    np.testing.assert_array_equal(got, want)
    assert (np.asarray(got) != np.asarray(base)).any()


def test_argument_errors(setup):
    _, model, _, step, prompt = setup
    cache = model.init_cache(BATCH, 16)
    cases = [
        (dict(strategy="sample"), "needs key"),
        (dict(key=jax.random.key(0)), "only it takes a key"),
        (dict(strategy="nucleus"), "not one of"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(strategy="sample", key=jax.random.key(0), temperature=0.0), "temperature"),
        (dict(strategy="sample", key=jax.random.key(0), top_p=1.5), "top_p"),
        (dict(strategy="beam", num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(strategy="beam", early_stopping="sometimes"), "early_stopping"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(step, prompt, cache=cache, **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="unequal length"):
        generate(step, prompt[0], cache=cache, max_new_tokens=4)

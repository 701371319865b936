"""Autoregressive decoding over any cached step function: greedy, sampling, and Hugging Face-exact beam search.

    step = cached_step(model.apply, variables)           # or cached_step(lora.apply, frozen, adapters)
    ids = generate(step, prompt_ids, cache=model.init_cache(batch, prompt_len + 20), max_new_tokens=20)

`step_fn(ids (batch, t), cache) -> (logits (batch, t, vocab), cache)`. The prompt is prefilled in one call, then one
token per step inside a `lax.while_loop`, all in one jitted function: `step_fn` is traced twice per compilation
(prefill and decode). A `cached_step` Partial carries its arrays as jit arguments, so new weights of the same shapes
reuse the compilation; a plain callable is a static argument (recompiled per new callable, its arrays baked in).

Conventions: prompts have equal length (no padding, no attention mask); the cache holds prompt_len + max_new_tokens
positions; every non-scalar cache leaf has the batch on axis `cache_batch_axis` (default 1: jlora's GPT-2 and Llama
caches are (n_layer, batch, max_len, heads, head_dim)); beam search repeats and reorders it there. The result
is always (batch, prompt_len + max_new_tokens); after an EOS the positions hold `pad_token_id` (else the EOS).
Beam search follows transformers 5 `generate(num_beams=..., do_sample=False)`: 2 * num_beams candidates per step,
scores = sum of log-probs / (generated length, EOS included) ** length_penalty, its early-stop heuristic.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

STRATEGIES = ("greedy", "sample", "beam")
NEG = -1.0e9  # transformers' "impossible" score offset, kept for identical tie-breaking


@dataclasses.dataclass(frozen=True)
class _CallWithCache:
    apply_fn: Callable

    def __call__(self, *args):
        *variables, ids, cache = args
        return self.apply_fn(*variables, ids, cache=cache)


def cached_step(apply_fn: Callable, *variables) -> jax.tree_util.Partial:
    """A `step_fn` for `generate`: `(ids, cache) -> apply_fn(*variables, ids, cache=cache)`, e.g.
    `cached_step(model.apply, variables)` or `cached_step(lora.apply, frozen, adapters)`. The arrays travel as jit
    arguments; the compilation is reused while `apply_fn` is the same object."""
    return jax.tree_util.Partial(_CallWithCache(apply_fn), *variables)


@dataclasses.dataclass(frozen=True)
class _Settings:
    strategy: str
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    num_beams: int
    batch_axis: int
    length_penalty: float
    no_repeat_ngram_size: int
    early_stopping: bool | str
    num_return_sequences: int
    eos: int | None
    fill: int


def generate(step_fn: Callable, prompt_ids, *, cache, max_new_tokens: int, strategy: str = "greedy", key=None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, num_beams: int = 4,
             length_penalty: float = 1.0, no_repeat_ngram_size: int = 0, early_stopping: bool | str = False,
             num_return_sequences: int = 1, eos_token_id: int | None = None, pad_token_id: int | None = None,
             cache_batch_axis: int = 1):
    """Token ids (batch, prompt_len + max_new_tokens), int32; beam search with `num_return_sequences > 1`
    gives (batch, num_return_sequences, ...), best first.

    prompt_ids: integer (batch, prompt_len). cache: an empty cache for `batch` rows (beam search repeats it for the
    beams). `key` (strategy "sample" only): a PRNG key. Sampling applies, in transformers' order, the n-gram ban,
    `temperature`, `top_k`, `top_p`. `no_repeat_ngram_size=n` bans any token that would complete an n-gram already
    in the sequence (prompt included). `early_stopping` is beam search's (False, True or "never")."""
    prompt_ids = jnp.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1 or not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
        raise ValueError(f"prompt_ids must be integer (batch, prompt_len >= 1), got {prompt_ids.dtype} "
                         f"{prompt_ids.shape}; prompts of unequal length are not supported (no padding)")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    if (key is None) == (strategy == "sample"):
        raise ValueError("strategy='sample' needs key=..., and only it takes a key")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    if strategy == "beam" and num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if strategy == "beam" and not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be in [1, num_beams={num_beams}]")
    if early_stopping not in (False, True, "never"):
        raise ValueError(f"early_stopping must be False, True or 'never', got {early_stopping!r}")
    fill = pad_token_id if pad_token_id is not None else eos_token_id if eos_token_id is not None else 0
    settings = _Settings(strategy, max_new_tokens, float(temperature), top_k, top_p, int(num_beams), cache_batch_axis,
                         float(length_penalty), int(no_repeat_ngram_size), early_stopping, int(num_return_sequences),
                         eos_token_id, int(fill))
    if isinstance(step_fn, jax.tree_util.Partial):
        return _generate(step_fn, prompt_ids.astype(jnp.int32), cache, key, static_step=None, settings=settings)
    return _generate(None, prompt_ids.astype(jnp.int32), cache, key, static_step=step_fn, settings=settings)


@functools.partial(jax.jit, static_argnames=("static_step", "settings"))
def _generate(dynamic_step, prompt_ids, cache, key, *, static_step, settings: _Settings):
    step_fn = dynamic_step if dynamic_step is not None else static_step
    logits, cache = step_fn(prompt_ids, cache)  # prefill; shape=(batch, prompt_len, vocab)
    logits = logits[:, -1].astype(jnp.float32)
    if settings.strategy == "beam":
        return _beam(step_fn, prompt_ids, cache, logits, settings)
    return _greedy_or_sample(step_fn, prompt_ids, cache, logits, key, settings)


def ban_ngrams(seq, cur_len, scores, n: int):
    """transformers' NoRepeatNGramLogitsProcessor on a fixed-size buffer: -inf for every token that would complete
    an n-gram already in `seq[:, :cur_len]`. seq: (rows, max_len) int32; scores: (rows, vocab)."""
    rows, max_len = seq.shape
    if n == 0 or n > max_len:
        return scores
    starts = jnp.arange(max_len - n + 1)  # window i covers seq[:, i:i + n]
    windows = jnp.stack([seq[:, starts + j] for j in range(n)], axis=-1)  # shape=(rows, windows, n)
    prefix = lax.dynamic_slice_in_dim(seq, jnp.maximum(cur_len - n + 1, 0), n - 1, axis=1)  # shape=(rows, n - 1)
    match = jnp.all(windows[..., :-1] == prefix[:, None], axis=-1) & (starts + n <= cur_len)[None]  # complete ones
    banned = jnp.zeros(scores.shape, bool).at[jnp.arange(rows)[:, None], windows[..., -1]].max(match)
    return jnp.where(banned, -jnp.inf, scores)


def warp_logits(scores, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """transformers' Temperature, TopK and TopP warpers in that order (top-k keeps ties with the k-th score; top-p
    keeps the smallest set whose probability exceeds top_p, at least one token). scores: (rows, vocab)."""
    scores = scores / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = lax.top_k(scores, top_k)[0][..., -1:]
        scores = jnp.where(scores < kth, -jnp.inf, scores)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(scores, axis=-1)  # ascending
        sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
        remove = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1) <= 1 - top_p
        remove = remove.at[..., -1].set(False)
        remove = jnp.zeros_like(remove).at[jnp.arange(scores.shape[0])[:, None], order].set(remove)
        scores = jnp.where(remove, -jnp.inf, scores)
    return scores


def _decode_loop(step_fn, state, cache, logits, select: Callable, feed: Callable):
    """while not done: state = select(state, logits); then, unless done, logits, cache = step_fn(*feed(state, cache))
    with feed giving the new tokens (rows, 1) and the cache (reordered for beams)."""

    def forward(args):
        out, cache = step_fn(*feed(*args))
        return out[:, -1].astype(jnp.float32), cache

    def body(carry):
        state, cache, logits = carry
        state = select(state, logits)
        logits, cache = lax.cond(state["done"], lambda a: (jnp.zeros_like(logits), a[1]), forward, (state, cache))
        return state, cache, logits

    state, _, _ = lax.while_loop(lambda c: ~c[0]["done"], body, (state, cache, logits))
    return state


def _greedy_or_sample(step_fn, prompt_ids, cache, logits, key, s: _Settings):
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + s.max_new_tokens
    seq = jnp.full((batch, total), s.fill, jnp.int32).at[:, :prompt_len].set(prompt_ids)
    state = {"seq": seq, "cur": jnp.int32(prompt_len), "finished": jnp.zeros(batch, bool), "done": jnp.bool_(False)}

    def select(st, logits):
        scores = ban_ngrams(st["seq"], st["cur"], logits, s.no_repeat_ngram_size)
        if s.strategy == "sample":
            scores = warp_logits(scores, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
            token = jax.random.categorical(jax.random.fold_in(key, st["cur"]), scores, axis=-1)
        else:
            token = jnp.argmax(scores, axis=-1)
        token = jnp.where(st["finished"], s.fill, token).astype(jnp.int32)  # shape=(batch,)
        finished = st["finished"] | (token == s.eos) if s.eos is not None else st["finished"]
        cur = st["cur"] + 1
        seq = lax.dynamic_update_slice_in_dim(st["seq"], token[:, None], st["cur"], axis=1)
        return {"seq": seq, "cur": cur, "finished": finished, "done": (cur >= total) | jnp.all(finished)}

    def feed(st, cache):
        return lax.dynamic_slice_in_dim(st["seq"], st["cur"] - 1, 1, axis=1), cache

    return _decode_loop(step_fn, state, cache, logits, select, feed)["seq"]


def _beam(step_fn, prompt_ids, cache, logits, s: _Settings):
    """transformers 5 `_beam_search` (do_sample=False) with static shapes; rows of the cache are batch * beams."""
    batch, prompt_len = prompt_ids.shape
    beams, total = s.num_beams, prompt_len + s.max_new_tokens
    keep = 2 * beams  # max(2, 1 + number of EOS ids) * num_beams with at most one EOS id
    cache = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=s.batch_axis) if x.ndim else x, cache)
    logits = jnp.repeat(logits, beams, axis=0)  # shape=(batch * beams, vocab)
    seq = jnp.full((batch, beams, total), s.fill, jnp.int32).at[:, :, :prompt_len].set(prompt_ids[:, None])
    state = {
        "running": seq, "running_scores": jnp.zeros((batch, beams)).at[:, 1:].set(NEG),
        "seqs": seq, "scores": jnp.full((batch, beams), NEG), "finished": jnp.zeros((batch, beams), bool),
        "open": jnp.ones((batch, 1), bool), "cur": jnp.int32(prompt_len), "done": jnp.bool_(False),
        "source": jnp.zeros(batch * beams, jnp.int32),  # the row each running beam continues (cache reorder)
    }
    gather = functools.partial(jnp.take_along_axis, axis=1)

    def select(st, logits):
        cur = st["cur"]
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        log_probs = ban_ngrams(st["running"].reshape(batch * beams, total), cur, log_probs, s.no_repeat_ngram_size)
        log_probs = log_probs.reshape(batch, beams, vocab) + st["running_scores"][:, :, None]
        top_lp, top_idx = lax.top_k(log_probs.reshape(batch, beams * vocab), keep)  # shape=(batch, keep)
        top_beam, top_tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seq = gather(st["running"], top_beam[..., None])
        top_seq = lax.dynamic_update_slice_in_dim(top_seq, top_tok[..., None], cur, axis=2)
        hits = jnp.broadcast_to(cur + 1 >= total, top_tok.shape)
        if s.eos is not None:
            hits = hits | (top_tok == s.eos)
        # the running beams: the best `beams` candidates that did not stop
        run_lp = top_lp + hits.astype(jnp.float32) * NEG
        nxt = lax.top_k(run_lp, beams)[1]
        running, running_scores = gather(top_seq, nxt[..., None]), gather(run_lp, nxt)
        source = (gather(top_beam, nxt) + jnp.arange(batch)[:, None] * beams).reshape(-1)
        # the finished hypotheses: merge in the candidates among the top `beams` that stopped
        just = hits & (jnp.arange(keep) < beams)[None]
        fin_lp = top_lp / ((cur + 1 - prompt_len).astype(jnp.float32) ** s.length_penalty)
        if s.early_stopping is True:
            fin_lp = fin_lp + (jnp.all(st["finished"], axis=1, keepdims=True)).astype(jnp.float32) * NEG
        fin_lp = fin_lp + (~st["open"]).astype(jnp.float32) * NEG
        fin_lp = fin_lp + (~just).astype(jnp.float32) * NEG
        merged_scores = jnp.concatenate([st["scores"], fin_lp], axis=1)
        best = lax.top_k(merged_scores, beams)[1]
        seqs = gather(jnp.concatenate([st["seqs"], top_seq], axis=1), best[..., None])
        finished = gather(jnp.concatenate([st["finished"], just], axis=1), best)
        scores = gather(merged_scores, best)
        # transformers' early-stop heuristic and stopping condition
        cur = cur + 1
        best_len = total - prompt_len if s.early_stopping == "never" and s.length_penalty > 0 else cur - prompt_len
        best_running = running_scores[:, :1] / (jnp.asarray(best_len, jnp.float32) ** s.length_penalty)
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        is_open = st["open"] & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        done = ~jnp.any(is_open) | jnp.all(hits)
        if s.early_stopping is True:
            done = done | jnp.all(finished)
        return {"running": running, "running_scores": running_scores, "seqs": seqs, "scores": scores,
                "finished": finished, "open": is_open, "cur": cur, "done": done, "source": source}

    def feed(st, cache):  # the beams' last tokens; the cache rows reordered to the beams they continue
        ids = lax.dynamic_index_in_dim(st["running"], st["cur"] - 1, axis=2, keepdims=False).reshape(-1, 1)
        return ids, jax.tree.map(lambda x: jnp.take(x, st["source"], axis=s.batch_axis) if x.ndim else x, cache)

    state = _decode_loop(step_fn, state, cache, logits, select, feed)
    out = state["seqs"][:, : s.num_return_sequences]
    return out[:, 0] if s.num_return_sequences == 1 else out

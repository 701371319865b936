"""benchmarks.multi_adapter's serving section: a mixed batch (an adapter per prompt) vs one adapter vs a loop over
adapters vs the base, prefill and decode timed apart (see benchmarks.multi_adapter); nothing runs at import."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from benchmarks import common
from jlora.models.generation import cached_step, generate


@jax.jit
def prefill(step_fn, prompt, cache):
    """(last position's logits (batch, vocab) float32, the filled cache)."""
    logits, cache = step_fn(prompt, cache)
    return logits[:, -1].astype(jnp.float32), cache


@jax.jit
def decode(step_fn, logits, cache, tokens):
    """Greedy: `tokens` (batch, n) int32 filled from the prefill's last logits, n - 1 cached forward steps."""

    def body(i, carry):
        tokens, logits, cache = carry
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tokens = tokens.at[:, i].set(token)
        out, cache = step_fn(token[:, None], cache)
        return tokens, out[:, -1].astype(jnp.float32), cache

    n = tokens.shape[1]
    tokens, logits, _ = jax.lax.fori_loop(0, n - 1, body, (tokens, logits, cache))
    return tokens.at[:, n - 1].set(jnp.argmax(logits, axis=-1).astype(jnp.int32))


class Served:
    """GPT-2 of the config's shape, K adapters on every dense kernel (lora_b non-zero), the prompts, the steps."""

    def __init__(self, config):
        c = config
        self.config, self.model = c, common.gpt2(c)
        self.prompts = common.tokens(jax.random.key(3), c.serve_adapters, c.prompt_len, c.vocab_size)
        self.variables = jax.jit(self.model.init)(jax.random.key(0), self.prompts[:1])
        self.lcfg = common.lora_config("all", rank=c.serve_rank, alpha=c.serve_alpha)
        self.lora = jlora.lora_transform(self.model.apply, self.lcfg, strict=True)
        self.adapters = []
        for k in range(c.serve_adapters):
            self.frozen, a = self.lora.init(self.variables, self.prompts[:1], key=jax.random.key(10 + k))
            self.adapters.append(common.perturb_adapters(a, jax.random.key(20 + k), std=0.02))
        stack, sc = jlora.multi.stack(self.adapters, [self.lcfg] * c.serve_adapters, fold_scales=True)
        self.stack, self.multi = stack, jlora.multi.stacked_transform(self.model.apply, sc, strict=True)
        self.ids = jnp.arange(c.serve_adapters, dtype=jnp.int32)

    def cache(self, batch):
        return self.model.init_cache(batch, self.config.prompt_len + self.config.new_tokens)

    def steps(self) -> dict[str, list[tuple]]:
        """{contender: [(step_fn, prompt rows), ...]}: one entry per call a contender makes."""
        k = self.config.serve_adapters
        return {"mixed": [(cached_step(self.multi.routed_apply, self.frozen, self.stack, self.ids), self.prompts)],
                "single": [(cached_step(self.lora.apply, self.frozen, self.adapters[0]), self.prompts)],
                "loop": [(cached_step(self.lora.apply, self.frozen, self.adapters[i]), self.prompts[i: i + 1])
                         for i in range(k)],
                "base": [(cached_step(self.model.apply, self.variables), self.prompts)]}


def serving(config) -> dict[str, Any]:
    s = Served(config)
    steps, n = s.steps(), config.new_tokens
    filled = {name: [common.block(prefill(f, p, s.cache(p.shape[0]))) for f, p in calls]
              for name, calls in steps.items()}  # compiles prefill; decode's inputs

    def prefills(name):
        return lambda: [common.block(prefill(f, p, s.cache(p.shape[0]))) for f, p in steps[name]]

    def decodes(name):
        return lambda: [common.block(decode(f, lg, c, jnp.zeros((lg.shape[0], n), jnp.int32)))
                        for (f, _), (lg, c) in zip(steps[name], filled[name])]

    runs = {f"{name}/{phase}": (prefills if phase == "prefill" else decodes)(name)
            for phase in ("prefill", "decode") for name in steps}
    others: dict[str, list] = {}
    times = common.interleaved(runs, warmup=config.warmup, repeats=config.serve_repeats, desc="serving", others=others)
    # correctness: the mixed batch against each adapter alone, and prefill + decode against generate
    mixed_tokens = np.asarray(decodes("mixed")()[0])
    loop_tokens = np.concatenate([np.asarray(t) for t in decodes("loop")()])
    gen = np.asarray(generate(steps["mixed"][0][0], s.prompts, cache=s.cache(config.serve_adapters),
                              max_new_tokens=n))[:, config.prompt_len:]
    loop_logits = np.concatenate([np.asarray(lg) for lg, _ in filled["loop"]])
    mixed_logits, single_logits = np.asarray(filled["mixed"][0][0]), np.asarray(filled["single"][0][0])
    checks = {"prefill_max_abs_diff_mixed_vs_alone": float(np.max(np.abs(mixed_logits - loop_logits))),
              "logit_scale": float(np.max(np.abs(loop_logits))),
              "tokens_equal_mixed_vs_alone": bool(np.array_equal(mixed_tokens, loop_tokens)),
              "tokens_equal_decode_vs_generate": bool(np.array_equal(mixed_tokens, gen)),
              "rows_differ_mixed_vs_single": float(np.max(np.abs(mixed_logits - single_logits)[1:]))}
    out: dict[str, Any] = {"checks": checks, "batch": config.serve_adapters, "contenders": {}}
    for name in steps:
        row = {}
        for phase, tokens in (("prefill", config.serve_adapters * config.prompt_len),
                              ("decode", config.serve_adapters * n)):
            t = times[f"{name}/{phase}"]
            row[phase] = {**common.summary(t, others[f"{name}/{phase}"]), "tokens": tokens,
                          "tokens_per_s": tokens / float(np.median(t))}
        row["total_tokens_per_s"] = config.serve_adapters * n / (row["prefill"]["median_s"] + row["decode"]["median_s"])
        out["contenders"][name] = row
    con = out["contenders"]
    out["ratios"] = {f"{phase}_{a}": con["mixed"][phase]["tokens_per_s"] / con[a][phase]["tokens_per_s"]
                     for phase in ("prefill", "decode") for a in ("single", "loop", "base")}
    out["ratios"].update({f"total_{a}": con["mixed"]["total_tokens_per_s"] / con[a]["total_tokens_per_s"]
                          for a in ("single", "loop", "base")})
    return out

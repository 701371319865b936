"""Many adapters at once (issue 14): a sweep trained in one program, a mixed batch served, the routing kernels.

    python -m benchmarks.multi_adapter                   # MiniLM (the `minilm` asset) + GPT-2 small shape, CPU
    python -m benchmarks.multi_adapter --random-weights  # MiniLM's shape with random weights: no asset needed
    python -m benchmarks.multi_adapter --quick           # tiny models, seconds; multi_adapter_quick.{json,md}

writes results/multi_adapter.json and .md (`_gpu` appended off the CPU, with fewer sweep rounds: a bounded run).
1. Sweep: K adapters of all-MiniLM-L6-v2 (BertForSequenceClassification, 2 labels, encoder and head frozen; LoRA on
   query and value, ranks `sweep_ranks`, alpha `sweep_alpha`, Adam at the K rates `sweep_lrs`) trained for
   `sweep_steps` steps on one batch stream, two ways, each TOTAL wall time from nothing (lora.init of each adapter,
   tracing, XLA compilation, every step, blocked at the end):
     sequential  K runs one after another, each its own `jax.jit` train step (as a user's loop would: a new
                 transform and `optax.adam(lr)` per run, so K compilations);
     stacked     `jlora.multi.stack` + `stacked_optimizer(optax.adam, learning_rate=[...])` + `multi.train_step`:
                 one program trains the K adapters (ranks zero-padded to the largest).
   Interleaved rounds (sequential, stacked, then reversed), median; each run rebuilds its jit (fresh compile).
   Checked: the stacked losses and unstacked adapters equal the sequential ones.
2. Serving: GPT-2 small shape, random weights; `serve_adapters` adapters (r = `serve_rank` on every dense kernel,
   lora_b non-zero), one prompt of `prompt_len` random tokens per adapter, greedy `new_tokens` tokens. Prefill (the
   prompt in one call, KV cache filled) and decode (new_tokens tokens, new_tokens - 1 cached forward steps in one
   `lax.fori_loop`) are timed separately, each jitted over a `cached_step`:
     mixed    the whole batch in one call, row i through adapter i (`multi.routed_apply`, adapter_ids = 0..K-1);
     single   the same batch, every row through adapter 0 (`lora.apply`): what one adapter costs;
     loop     adapter by adapter, its one prompt alone (batch 1, `lora.apply`, one compilation for all K);
     base     the same batch without adapters (`model.apply`).
   Checked: mixed-batch prefill logits and generated tokens equal each adapter alone on its prompt (loop), and
   prefill + decode gives `generation.generate`'s tokens.
3. Routing kernels (`benchmarks.multi_adapter_kernels`): the routed LoRA branch as jlora.routing computes it
   (factors gathered per example) vs `jax.lax.ragged_dot` on rows sorted by adapter, per GPT-2 kernel shape, at
   the prefill and the decode shapes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from benchmarks import common, multi_adapter_kernels
from benchmarks.multi_adapter_report import table, targets
from benchmarks.multi_adapter_serving import serving
from jlora import assets, models
from jlora.models import hf
from jlora.models.bert import BertConfig, BertForSequenceClassification


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(common.GPT2Shape):
    """The sweep's model and grid, the serving batch, the kernels, and how long to measure."""

    minilm: str = "minilm"  # a jlora asset name or a Hugging Face directory (unless random_weights)
    random_weights: bool = False  # MiniLM's shape (the bert_* fields) with random weights: runs with no asset
    bert_layers: int = 6  # all-MiniLM-L6-v2's shape
    bert_hidden: int = 384
    bert_heads: int = 12
    bert_intermediate: int = 1536
    bert_vocab: int = 30522
    sweep_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 64)  # K = 8 adapters
    sweep_lrs: tuple[float, ...] = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)
    sweep_alpha: float = 8.0  # alpha / r, as experiments.alpha_over_r's "lora" scaling
    sweep_targets: tuple[str, ...] = ("query", "value")
    sweep_steps: int = 30  # a short fine-tune; the report extrapolates to other lengths from the measured parts
    sweep_extrapolate: tuple[int, ...] = (10, 120)  # 120: experiments.alpha_over_r's MiniLM run
    sweep_batch: int = 16  # experiments.alpha_over_r's batch 16 x 32 tokens
    sweep_seq: int = 32
    sweep_rounds: int = 2  # interleaved rounds: sequential, stacked, stacked, sequential
    serve_adapters: int = 8  # K adapters = the batch, one prompt each
    serve_rank: int = 8
    serve_alpha: float = 16.0
    prompt_len: int = 16  # benchmarks.inference's prompt
    new_tokens: int = 32
    serve_repeats: int = 5  # timed interleaved rounds of every serving contender
    kernel_consumers: tuple[str, ...] = ("c_attn", "attn_c_proj", "c_fc", "mlp_c_proj")
    kernel_calls: int = 20  # calls per timed run (each over n_layer layers)
    kernel_repeats: int = 5
    warmup: int = 1  # untimed serving / kernel rounds (the first call compiles)
    out_dir: str = "results"
    name: str = "multi_adapter"

    def __post_init__(self):
        if len(self.sweep_ranks) != len(self.sweep_lrs) or not self.sweep_ranks:
            raise ValueError(f"Config: sweep_ranks {self.sweep_ranks} and sweep_lrs {self.sweep_lrs} need one entry "
                             f"per adapter (K), the same number")
        if min(self.sweep_rounds, self.serve_repeats, self.kernel_repeats, self.sweep_steps) < 1:
            raise ValueError("Config: sweep_rounds, serve_repeats, kernel_repeats and sweep_steps must be >= 1")

    def for_gpu(self) -> Config:
        return dataclasses.replace(self, sweep_rounds=1, serve_repeats=5, kernel_repeats=5)  # bounded: ~3 min


QUICK = Config(**common.TINY_SHAPE | {"n_layer": 1}, n_positions=16, bert_layers=1, bert_hidden=32, bert_heads=4,
               bert_intermediate=64, bert_vocab=97, random_weights=True, sweep_ranks=(1, 4),
               sweep_lrs=(1e-3, 3e-2), sweep_steps=2, sweep_batch=4, sweep_seq=8, sweep_rounds=1,
               serve_adapters=3, prompt_len=4, new_tokens=3, serve_repeats=1, kernel_consumers=("c_attn",),
               kernel_calls=1, kernel_repeats=1, name="multi_adapter_quick")


# --- 1. the sweep ---------------------------------------------------------------------------------------------------

def bert(config: Config):
    """(module, variables, what they are): MiniLM from `config.minilm`, or its shape with random weights."""
    if config.random_weights:
        shape = BertConfig(vocab_size=config.bert_vocab, hidden_size=config.bert_hidden,
                           num_hidden_layers=config.bert_layers, num_attention_heads=config.bert_heads,
                           intermediate_size=config.bert_intermediate, num_labels=2)
        model = BertForSequenceClassification(shape)
        variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        return model, variables, (f"random weights of MiniLM's shape ({config.bert_layers} layers, "
                                  f"d {config.bert_hidden})")
    path = hf.resolve(assets.fetch(config.minilm, progress=False) if config.minilm in assets.ASSETS else config.minilm)
    model, variables = models.from_pretrained(path, num_labels=2, key=jax.random.key(0))
    return model, variables, f"all-MiniLM-L6-v2 ({path.name}), its pretrained weights, a fresh 2-label head"


def sweep_batches(config: Config, vocab: int) -> list[tuple]:
    """`sweep_steps` batches ((ids, mask), labels): random tokens (the step time does not depend on them)."""
    rng = np.random.default_rng(0)
    shape = (config.sweep_batch, config.sweep_seq)
    return [((jnp.asarray(rng.integers(0, vocab, shape, dtype=np.int32)), jnp.ones(shape, jnp.int32)),
             jnp.asarray(rng.integers(0, 2, config.sweep_batch, dtype=np.int32))) for _ in range(config.sweep_steps)]


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def sweep_configs(config: Config) -> list[jlora.LoraConfig]:
    return [jlora.LoraConfig(rank=r, alpha=config.sweep_alpha, targets=config.sweep_targets)
            for r in config.sweep_ranks]


def _inits(model, variables, batches, configs) -> list[tuple]:
    (ids, mask), _ = batches[0]
    return [jlora.lora_transform(model.apply, c, strict=True).init(variables, ids[:1], mask[:1],
                                                                   key=jax.random.key(100 + k))
            for k, c in enumerate(configs)]


def sequential(config: Config, model, variables, batches, out: dict) -> None:
    """K runs, each its own transform, optimizer and jitted step; fills `out` with the adapters, losses (K, steps)
    and the seconds spent initialising, on the first (compiling) steps and on the rest."""
    start, configs = time.perf_counter(), sweep_configs(config)
    inits = _inits(model, variables, batches, configs)
    t_init, t_first, trained, losses = time.perf_counter() - start, 0.0, [], []
    for (frozen, adapters), c, lr in zip(inits, configs, config.sweep_lrs):
        lora, tx = jlora.lora_transform(model.apply, c, strict=True), optax.adam(lr)

        def step(frozen, adapters, state, inputs, labels, lora=lora, tx=tx):
            loss, grads = jax.value_and_grad(lambda a: xent(lora.apply(frozen, a, *inputs), labels))(adapters)
            updates, state = tx.update(grads, state, adapters)
            return optax.apply_updates(adapters, updates), state, loss

        step, state, mine = jax.jit(step), tx.init(adapters), []
        for i, (inputs, labels) in enumerate(batches):
            t0 = time.perf_counter()
            adapters, state, loss = step(frozen, adapters, state, inputs, labels)
            mine.append(loss)
            if i == 0:
                common.block(loss)
                t_first += time.perf_counter() - t0
        trained.append(common.block(adapters))
        losses.append(np.asarray(jax.device_get(mine)))
    total = time.perf_counter() - start
    out.update(adapters=trained, losses=np.stack(losses), init_s=t_init, first_steps_s=t_first,
               rest_s=total - t_init - t_first)


def stacked(config: Config, model, variables, batches, out: dict) -> None:
    """The K adapters stacked and trained by one `multi.train_step`; fills `out` as `sequential` does."""
    start, configs = time.perf_counter(), sweep_configs(config)
    inits = _inits(model, variables, batches, configs)
    stack, sc = jlora.multi.stack([a for _, a in inits], configs)
    multi = jlora.multi.stacked_transform(model.apply, sc, strict=True)
    tx = jlora.multi.stacked_optimizer(optax.adam, learning_rate=list(config.sweep_lrs))
    step, state, frozen, losses = jlora.multi.train_step(multi, tx, xent), tx.init(stack), inits[0][0], []
    t_init = time.perf_counter() - start
    for i, (inputs, labels) in enumerate(batches):
        stack, state, loss = step(frozen, stack, state, inputs, labels)
        losses.append(loss)
        if i == 0:
            common.block(loss)
            t_first = time.perf_counter() - start - t_init
    common.block(stack)
    total = time.perf_counter() - start
    out.update(stack=stack, sc=sc, losses=np.asarray(jax.device_get(losses)).T, init_s=t_init, first_steps_s=t_first,
               rest_s=total - t_init - t_first)


def sweep(config: Config) -> dict[str, Any]:
    model, variables, weights = bert(config)
    batches = sweep_batches(config, model.config.vocab_size)
    outs: dict[str, dict] = {"sequential": {}, "stacked": {}}
    parts: dict[str, list] = {"sequential": [], "stacked": []}

    def run(name, fn):
        def go():
            outs[name].clear()
            fn(config, model, variables, batches, outs[name])
            parts[name].append({k: outs[name][k] for k in ("init_s", "first_steps_s", "rest_s")})
        return go

    others: dict[str, list] = {}
    times = common.interleaved({"sequential": run("sequential", sequential), "stacked": run("stacked", stacked)},
                               warmup=0, repeats=config.sweep_rounds, desc="sweep", others=others)
    seq, stk = outs["sequential"], outs["stacked"]
    unstacked = [a for a, _ in jlora.multi.unstack(stk["stack"], stk["sc"])]
    diff = max(float(jnp.max(jnp.abs(x - y))) for a, b in zip(unstacked, seq["adapters"])
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    result = {"weights": weights, "k": len(config.sweep_ranks), "steps": config.sweep_steps,
              "tokens_per_step": config.sweep_batch * config.sweep_seq,
              "max_abs_diff_losses": float(np.max(np.abs(seq["losses"] - stk["losses"]))),
              "max_abs_diff_adapters": diff, "final_losses": stk["losses"][:, -1].tolist(), "contenders": {}}
    for name in times:
        result["contenders"][name] = {"time": common.summary(times[name], others[name]), "parts": parts[name]}
    med = {n: result["contenders"][n]["time"]["median_s"] for n in times}
    result["stacked_over_sequential"] = med["stacked"] / med["sequential"]
    part = {n: {k: float(np.median([p[k] for p in parts[n]])) for k in parts[n][0]} for n in parts}
    steps_left = max(config.sweep_steps - 1, 1)
    result["per_step_s"] = {n: part[n]["rest_s"] / steps_left for n in part}  # one step of each of the K adapters
    result["fixed_s"] = {n: part[n]["init_s"] + part[n]["first_steps_s"] for n in part}
    fixed, per = result["fixed_s"], result["per_step_s"]
    result["extrapolated_ratio"] = {str(n): (fixed["stacked"] + (n - 1) * per["stacked"])
                                    / (fixed["sequential"] + (n - 1) * per["sequential"])
                                    for n in config.sweep_extrapolate}
    result["extrapolated_ratio"]["inf"] = per["stacked"] / per["sequential"]
    return result


# --- measurement ----------------------------------------------------------------------------------------------------

def consumers(config: Config) -> dict[str, tuple[int, int]]:
    d = config.n_embd
    shapes = {"c_attn": (d, 3 * d), "attn_c_proj": (d, d), "c_fc": (d, 4 * d), "mlp_c_proj": (4 * d, d)}
    return {name: shapes[name] for name in config.kernel_consumers}


def measure(config: Config) -> dict[str, Any]:
    result = {"backend": jax.default_backend(), "loadavg_start": common.loadavg()}
    print("\n== sweep", flush=True)
    result["sweep"] = sweep(config)
    result["loadavg_after_sweep"] = common.loadavg()
    print("\n== serving", flush=True)
    result["serving"] = serving(config)
    print("\n== routing kernels", flush=True)
    result["kernels"] = multi_adapter_kernels.measure(config, consumers(config))
    result["loadavg_end"] = common.loadavg()
    result["targets"] = targets(result)
    return result


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--random-weights", action="store_true", help="MiniLM's shape with random weights (no asset)")
    args = p.parse_args(argv)
    config = common.choose(args, Config(), QUICK)
    if args.random_weights:
        config = dataclasses.replace(config, random_weights=True)
    return common.run(config, measure, lambda result: table(config, result))


if __name__ == "__main__":
    sys.exit(main())

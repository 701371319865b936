"""Inference with LoRA: the base model vs merged adapters vs factored adapters, forward passes and generation.

    python -m benchmarks.inference                 # GPT-2 small + SmolLM2-135M (about 3-5 min on 2 cores)
    python -m benchmarks.inference --quick         # a 2-layer, d 64 GPT-2 in seconds; inference_quick.{json,md}
    python -m benchmarks.inference --no-smollm2    # without the SmolLM2 generation (which needs the asset)

writes results/inference.json and results/inference.md (`_gpu` appended on a GPU, where it runs in bfloat16 at
bigger batches). Contenders, each jitted, timed interleaved after a warm-up round, median of the timed rounds:
  base            `model.apply(variables, ids)`, no adapters;
  merged          `model.apply(jlora.merge(frozen, adapters, cfg_all), ids)`: the same compiled function as base,
                  on merged weights (the merge runs once, before; its time is reported apart);
  factored[qv]    `lora.apply(frozen, adapters, ids)` with LoRA r=8 on q,v (GPT-2's fused c_attn, k off);
  factored[all]   the same with every dense kernel adapted (c_attn, attn/mlp c_proj, c_fc).
Adapters carry a non-zero B (N(0, 0.01^2)), so merged weights differ from the base.
1. Forward: logits of GPT-2 small (`jlora.models.gpt2`, random weights, seq 128) at batch 8 and batch 1.
2. Generation: `jlora.models.generation.generate` (greedy, no EOS stop) over `cached_step(...)`, a prompt of 16
   tokens + 32 new ones, batch 1, on GPT-2 small (random weights) and on SmolLM2-135M-Instruct
   (`jlora.assets.fetch("smollm2")`, GGUF dequantised to float32, via `jlora.models.llama.from_pretrained`; LoRA on
   q_proj, v_proj and on all seven projections). tokens/s = batch * new tokens / (time of one generate call, which
   includes the prompt's prefill).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from benchmarks import common
from jlora.models.generation import cached_step, generate

LLAMA_TARGETS = {"qv": ("q_proj", "v_proj"),
                 "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(common.GPT2Shape):
    """GPT-2 small, the adapters, the generation settings, and how long to measure."""

    seq: int = 128  # forward: 8 batch * 128 seq = 1,024 tokens
    forward_batches: tuple[int, ...] = (8, 1)  # the targets are read at the first (8)
    forward_repeats: tuple[int, ...] = (7, 15)  # timed rounds per batch: a batch-8 forward takes ~0.5-1.5 s here
    rank: int = 8
    alpha: float = 16.0
    adapter_std: float = 0.01  # lora_b ~ N(0, std^2): non-zero, so merged weights differ from the base
    gen_batch: int = 1  # one conversation
    gen_prompt: int = 16  # prompt tokens (random ids for the random GPT-2)
    gen_new_tokens: int = 32  # greedy, no EOS: always this many
    gen_repeats: int = 5  # timed rounds of one generate() call per contender
    smollm2: bool = True  # also generate with SmolLM2-135M-Instruct (the `smollm2` asset, fetched once)
    smollm2_prompt: str = "The capital of France is"  # tokenised with the GGUF's own tokenizer
    smollm2_kinds: tuple[str, ...] = ("qv", "all")  # factored LoRA settings on SmolLM2 ("all" is also merged)
    smollm2_layers: int = 0  # 0: all 30 layers; k: only the real model's first k (quick mode: compiles fast)
    dtype: str = "float32"  # computation dtype; "bfloat16" on a GPU
    warmup: int = 1  # untimed rounds (the first call compiles)
    gpu_forward_batches: tuple[int, ...] = (64, 8)  # on a GPU: bigger batches keep the device busy
    gpu_gen_batch: int = 8
    out_dir: str = "results"
    name: str = "inference"

    def __post_init__(self):
        if len(self.forward_repeats) != len(self.forward_batches):
            raise ValueError(f"Config.forward_repeats {self.forward_repeats} needs one entry per batch size in "
                             f"{self.forward_batches}")

    def for_gpu(self) -> Config:
        n = len(self.gpu_forward_batches)
        repeats = (self.forward_repeats + (self.forward_repeats[-1],) * n)[:n]
        return dataclasses.replace(self, dtype="bfloat16", forward_batches=self.gpu_forward_batches,
                                   forward_repeats=repeats, gen_batch=self.gpu_gen_batch)


QUICK = Config(**common.TINY_SHAPE, n_positions=32, seq=16, forward_batches=(4, 1),
               forward_repeats=(5, 5), gen_prompt=4, gen_new_tokens=4, smollm2_kinds=("all",), smollm2_layers=2,
               gpu_forward_batches=(4,), gpu_gen_batch=2, name="inference_quick")

CONTENDERS = ("base", "merged", "factored[qv]", "factored[all]")


class Adapted:
    """A model with its variables and, per LoRA setting, a transform and (frozen, adapters with non-zero B)."""

    def __init__(self, model, variables, example, configs: dict[str, jlora.LoraConfig], *, std: float):
        self.model, self.variables = model, variables
        self.loras, self.trees = {}, {}
        for i, (kind, cfg) in enumerate(configs.items()):
            self.loras[kind] = jlora.lora_transform(model.apply, cfg, strict=True)
            frozen, adapters = self.loras[kind].init(variables, example, key=jax.random.key(10 + i))
            self.trees[kind] = (frozen, common.perturb_adapters(adapters, jax.random.key(20 + i), std=std))
        merge = jax.jit(jlora.merge, static_argnums=2)
        frozen, adapters = self.trees["all"]
        self.merged = common.block(merge(frozen, adapters, configs["all"]))
        runs = {"merge": lambda: common.block(merge(frozen, adapters, configs["all"]))}
        self.merge_time = common.summary(common.interleaved(runs, warmup=1, repeats=5, desc="merge")["merge"])

    def forward_runs(self, ids) -> dict[str, Any]:
        base = jax.jit(self.model.apply)
        runs = {"base": lambda: common.block(base(self.variables, ids)),
                "merged": lambda: common.block(base(self.merged, ids))}
        for kind, (frozen, adapters) in self.trees.items():
            fn = jax.jit(self.loras[kind].apply)
            runs[f"factored[{kind}]"] = lambda fn=fn, f=frozen, a=adapters: common.block(fn(f, a, ids))
        return runs

    def steps(self) -> dict[str, Any]:
        """{contender: a `cached_step` for `generate`}."""
        steps = {"base": cached_step(self.model.apply, self.variables),
                 "merged": cached_step(self.model.apply, self.merged)}
        for kind, (frozen, adapters) in self.trees.items():
            steps[f"factored[{kind}]"] = cached_step(self.loras[kind].apply, frozen, adapters)
        return steps


def forward(config: Config, gpt2: Adapted) -> dict[str, Any]:
    out = {}
    for batch, repeats in zip(config.forward_batches, config.forward_repeats):
        ids = common.tokens(jax.random.key(3), batch, config.seq, config.vocab_size)
        runs = gpt2.forward_runs(ids)
        logits = {n: np.asarray(runs[n]()) for n in ("merged", "factored[all]")}
        others: dict[str, list[float]] = {}
        times = common.interleaved(runs, warmup=config.warmup, repeats=repeats, desc=f"forward, batch {batch}",
                                   others=others)
        base = float(np.median(times["base"]))
        out[str(batch)] = {
            "batch": batch, "tokens": batch * config.seq,
            "max_abs_diff_merged_vs_factored_all": float(np.max(np.abs(logits["merged"] - logits["factored[all]"]))),
            "contenders": {n: {**common.summary(t, others[n]), "ratio_to_base": float(np.median(t)) / base,
                               "tokens_per_s": batch * config.seq / float(np.median(t))} for n, t in times.items()},
        }
    return out


def generation(config: Config, label: str, adapted: Adapted, prompt, cache) -> dict[str, Any]:
    steps = adapted.steps()
    outputs = {}

    def run(name):
        outputs[name] = np.asarray(common.block(generate(steps[name], prompt, cache=cache,
                                                         max_new_tokens=config.gen_new_tokens)))

    runs = {n: (lambda n=n: run(n)) for n in steps}
    first = {}
    for n in runs:  # the first call traces (twice: prefill, decode) and compiles; timed apart
        t0 = time.perf_counter()
        runs[n]()
        first[n] = time.perf_counter() - t0
    others: dict[str, list[float]] = {}
    times = common.interleaved(runs, warmup=0, repeats=config.gen_repeats, desc=f"generate, {label}", others=others)
    base = float(np.median(times["base"]))
    new = config.gen_batch * config.gen_new_tokens
    return {
        "model": label, "batch": int(prompt.shape[0]), "prompt_tokens": int(prompt.shape[1]),
        "new_tokens": config.gen_new_tokens, "compile_and_first_call_s": first,
        "merged_equals_factored_all": bool(np.array_equal(outputs["merged"], outputs["factored[all]"])),
        "base_equals_factored_all": bool(np.array_equal(outputs["base"], outputs["factored[all]"])),
        "contenders": {n: {**common.summary(t, others[n]), "ratio_to_base": float(np.median(t)) / base,
                           "new_tokens_per_s": new / float(np.median(t))} for n, t in times.items()},
    }


def gpt2_part(config: Config) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    model = common.gpt2(config, dtype=config.dtype)
    example = common.tokens(jax.random.key(2), 1, config.seq, config.vocab_size)
    variables = jax.jit(model.init)(jax.random.key(0), example)
    configs = {k: common.lora_config(k, rank=config.rank, alpha=config.alpha) for k in common.LORA_KINDS}
    gpt2 = Adapted(model, variables, example, configs, std=config.adapter_std)
    fwd = forward(config, gpt2)
    prompt = common.tokens(jax.random.key(4), config.gen_batch, config.gen_prompt, config.vocab_size)
    cache = model.init_cache(config.gen_batch, config.gen_prompt + config.gen_new_tokens)
    gen = generation(config, f"{common.gpt2_label(config)} (random weights)", gpt2, prompt, cache)
    return fwd, gen, {"merge_time": gpt2.merge_time, "params": common.count(variables),
                      "adapter_params": {k: common.count(t[1]) for k, t in gpt2.trees.items()}}


def smollm2_part(config: Config) -> dict[str, Any]:
    from jlora import assets
    from jlora.models import llama
    from jlora.tokenizers import load_tokenizer

    path = assets.fetch("smollm2", progress=False)
    model, variables = llama.from_pretrained(path, dtype=jnp.dtype(config.dtype))
    label = "SmolLM2-135M-Instruct"
    if config.smollm2_layers:  # keep the first k decoder layers of the real weights
        k = config.smollm2_layers
        model = llama.Llama(dataclasses.replace(model.config, num_hidden_layers=k), dtype=model.dtype)
        layers = variables["params"]["model"]["layers"]
        variables["params"]["model"]["layers"] = {str(i): layers[str(i)] for i in range(k)}
        label += f" (first {k} of {len(layers)} layers)"
    ids = load_tokenizer(path).encode(config.smollm2_prompt).ids
    prompt = jnp.array([ids] * config.gen_batch, jnp.int32)
    kinds = dict.fromkeys((*config.smollm2_kinds, "all"))  # "all" is merged
    configs = {k: jlora.LoraConfig(rank=config.rank, alpha=config.alpha, targets=LLAMA_TARGETS[k]) for k in kinds}
    adapted = Adapted(model, variables, prompt, configs, std=config.adapter_std)
    cache = model.init_cache(config.gen_batch, prompt.shape[1] + config.gen_new_tokens)
    gen = generation(config, label, adapted, prompt, cache)
    gen.update(prompt_text=config.smollm2_prompt, params=common.count(variables), merge_time=adapted.merge_time,
               adapter_params={k: common.count(t[1]) for k, t in adapted.trees.items()})
    return gen


def measure(config: Config) -> dict[str, Any]:
    result: dict[str, Any] = {"backend": jax.default_backend(), "dtype": config.dtype,
                              "loadavg_start": common.loadavg()}
    fwd, gen, info = gpt2_part(config)
    result.update(forward=fwd, gpt2=info, generation={"gpt2": gen})
    if config.smollm2:
        result["generation"]["smollm2"] = smollm2_part(config)
    result["loadavg_end"] = common.loadavg()
    return result


def table(config: Config, result: dict[str, Any]) -> str:
    c = config
    info = result["gpt2"]
    lines = [f"# Inference: base vs merged vs factored LoRA ({result['backend']}, {result['dtype']})", "",
             f"{common.gpt2_label(c)} (`jlora.models.gpt2`, random weights, {info['params']:,} parameters), "
             f"LoRA r={c.rank}, alpha={c.alpha:g}, B ~ N(0, {c.adapter_std}^2); adapter parameters: "
             + ", ".join(f"{k} {v:,}" for k, v in info["adapter_params"].items())
             + f". Contenders interleaved after {c.warmup} warm-up round(s); median; ratios to base in the same run; "
             "`other load`: median CPU cores other processes kept busy during the runs (0 = quiet machine).",
             "", "## Forward (logits)", ""]
    batches = list(result["forward"].values())
    header = ["contender"]
    for b in batches:
        header += [f"batch {b['batch']} x {c.seq}: median (s)", "/ base", "tokens/s", "other load"]
    rows = []
    for n in CONTENDERS:
        row = [n]
        for b in batches:
            x = b["contenders"][n]
            row += [common.secs(x["median_s"]), f"{x['ratio_to_base']:.3f}", f"{x['tokens_per_s']:,.0f}",
                    common.cores(x["other_cores_median"])]
        rows.append(row)
    lines.append(common.md_table(header, rows))
    mt = info["merge_time"]
    lines += ["", f"- `jlora.merge` of the all-dense adapters into the base (jitted, once before inference): "
              f"{mt['median_s'] * 1e3:.1f} ms median.",
              "- max |merged - factored[all]| logits: "
              + ", ".join(f"batch {b['batch']}: {b['max_abs_diff_merged_vs_factored_all']:.2e}" for b in batches),
              "", "## Generation (greedy, `generate` + `cached_step`)", ""]
    rows = []
    for gen in result["generation"].values():
        for n in [n for n in CONTENDERS if n in gen["contenders"]]:
            x = gen["contenders"][n]
            rows.append([gen["model"], n, f"{gen['batch']} x ({gen['prompt_tokens']} + {gen['new_tokens']})",
                         common.secs(x["median_s"]), f"{x['ratio_to_base']:.3f}", f"{x['new_tokens_per_s']:,.1f}",
                         common.cores(x["other_cores_median"]), f"{gen['compile_and_first_call_s'][n]:.1f}"])
    lines.append(common.md_table(["model", "contender", "batch x (prompt + new)", "median (s)", "/ base",
                                  "new tokens/s", "other load", "first call (s)"], rows, align="llrrrrrr"))
    for gen in result["generation"].values():
        lines.append(f"- {gen['model']}: merged and factored[all] generate the same tokens: "
                     f"{gen['merged_equals_factored_all']}; factored[all] differs from base: "
                     f"{not gen['base_equals_factored_all']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 generation (needs the asset)")
    args: argparse.Namespace = p.parse_args(argv)
    config = common.switched_off(common.choose(args, Config(), QUICK), args, {"no_smollm2": "smollm2"})
    return common.run(config, measure, lambda result: table(config, result))


if __name__ == "__main__":
    sys.exit(main())

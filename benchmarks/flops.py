"""FLOPs of one AdamW train step, read from XLA's cost analysis: full fine-tuning vs jlora vs merge-then-apply.

    python -m benchmarks.flops            # GPT-2 small shape; writes results/flops.json and results/flops.md
    python -m benchmarks.flops --quick    # a tiny shape in seconds; writes results/flops_quick.{json,md}

Three jitted steps (`benchmarks.common.train_steps`) on `jlora.models.gpt2.GPT2LMHeadModel` with random weights,
each `value_and_grad` of the next-token loss followed by `optax.adamw`:
  full   grad w.r.t. every parameter, adamw on all of them;
  jlora  grad w.r.t. the adapters only, through `lora.apply` (each adapted matmul computed factored,
         `x @ W + scale * (x @ A) @ B`, so no weight gradient dW is formed), adamw on the adapters;
  merge  grad w.r.t. the adapters only, through `model.apply(jlora.merge(frozen, adapters, cfg))` inside jit:
         autodiff forms dW for each adapted kernel and then dA = dW @ B^T, dB = A^T @ dW.
Nothing is allocated for the model: params, adapters and optimizer states are `jax.ShapeDtypeStruct`s (from
`jax.eval_shape`), and each step is lowered and compiled from them. The FLOPs are XLA's count for the compiled
step on this backend (CPU here), not a timing.

Per adapted kernel (in, out) with T tokens per step and rank r, the analytic differences are:
  dW                   2 * T * in * out     formed by merge (and full), never by jlora
  LoRA branch          6 * T * r * (in + out)  jlora's extra: forward (x @ A) @ B, and its backward
  merge's factor math  6 * r * in * out     A @ B forward, dW @ B^T and A^T @ dW backward
so jlora <= merge - dW exactly when the branch costs no more than the factor math, i.e. T * (in + out) <= in * out,
and otherwise jlora = merge - dW + (a few percent of dW).
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import optax

import jlora
from benchmarks import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(common.GPT2Shape):
    """The benchmark's shape and LoRA settings; the defaults are GPT-2 small."""

    seq: int = 128  # a short context keeps the compile quick; attention is a small share at 128
    batch: int = 8  # 8 batch * 128 seq = 1,024 tokens/step
    rank: int = 8  # the LoRA paper's usual r
    alpha: float = 16.0  # scale alpha / r = 2; FLOPs do not depend on it
    targets: tuple[str, ...] = common.DENSE_TARGETS  # every dense kernel: attn c_attn, c_proj; mlp c_fc, c_proj
    learning_rate: float = 1e-4  # adamw's; FLOPs do not depend on it
    out_dir: str = "results"  # where flops.json and flops.md go
    name: str = "flops"  # file stem of the results

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def for_gpu(self) -> Config:
        return self  # FLOP counts are of the same float32 program; only the backend's compiler differs


QUICK = Config(**common.TINY_SHAPE, n_positions=16, seq=16, batch=4, rank=4,
               name="flops_quick")

STEPS = common.STEPS
TITLES = {"full": "full fine-tuning", "jlora": "jlora (factored)", "merge": "merge-then-apply"}


def compiled_flops(fn, *args) -> float:
    """XLA's FLOP count for `jax.jit(fn)` compiled for `args` (arrays or `jax.ShapeDtypeStruct`s)."""
    return common.xla_cost(jax.jit(fn).lower(*args).compile())["flops"]


def build(config: Config, *, abstract: bool = True):
    """The model, the LoRA transform, the three train steps and their arguments.

    Returns `(steps, args, info)`: `steps[name]` is an un-jitted step function, `args[name]` its arguments (shape
    structs with `abstract=True`, real arrays otherwise), and `info` holds the model, lora, config and the
    adapted kernels' shapes. Each step returns (new trainable tree, new optimizer state, loss).
    """
    model = common.gpt2(config)
    cfg = jlora.LoraConfig(rank=config.rank, alpha=config.alpha, targets=config.targets)
    lora = jlora.lora_transform(model.apply, cfg, strict=True)  # a materialising fallback would be an error
    opt = optax.adamw(config.learning_rate)
    tokens = jax.ShapeDtypeStruct((config.batch, config.seq), jnp.int32)

    def init(tokens):
        variables = model.init(jax.random.key(0), tokens)
        frozen, adapters = lora.init(variables, tokens, key=jax.random.key(1))
        return variables, frozen, adapters, opt.init(variables), opt.init(adapters)

    if abstract:
        variables, frozen, adapters, full_state, lora_state = jax.eval_shape(init, tokens)
    else:
        tokens = common.tokens(jax.random.key(2), config.batch, config.seq, config.vocab_size)
        variables, frozen, adapters, full_state, lora_state = init(tokens)

    steps = common.train_steps(model, lora, opt)
    args = {
        "full": (variables, full_state, tokens),
        "jlora": (frozen, adapters, lora_state, tokens),
        "merge": (frozen, adapters, lora_state, tokens),
    }
    info = {"model": model, "lora": lora, "lora_config": cfg, "kernels": common.dense_kernels(frozen),
            "variables": variables, "frozen": frozen, "adapters": adapters}
    return steps, args, info


def analytic(config: Config, kernels: dict[str, tuple[int, ...]], variables, adapters) -> dict:
    """The FLOP terms of the module docstring, summed over the adapted kernels, and parameter counts."""
    t, r = config.tokens, config.rank
    return {
        "tokens_per_step": t,
        "adapted_kernels": len(kernels),
        "dW_flops": sum(2 * t * i * o for i, o in kernels.values()),
        "lora_branch_flops": sum(6 * t * r * (i + o) for i, o in kernels.values()),
        "merge_factor_flops": sum(6 * r * i * o for i, o in kernels.values()),
        "params_total": common.count(variables),
        "params_trainable": common.count(adapters),
    }


def measure(config: Config) -> dict:
    """Compiles the three steps (abstractly) and returns the FLOPs, ratios and analytic terms as a JSON-able dict."""
    steps, args, info = build(config, abstract=True)
    flops = {}
    for name in STEPS:
        print(f"compiling {TITLES[name]} ...", flush=True)
        flops[name] = compiled_flops(steps[name], *args[name])
    terms = analytic(config, info["kernels"], info["variables"], info["adapters"])
    ratios = {
        "jlora/full": flops["jlora"] / flops["full"],
        "jlora/merge": flops["jlora"] / flops["merge"],
        "(merge-jlora)/dW": (flops["merge"] - flops["jlora"]) / terms["dW_flops"],
    }
    return {
        "config": dataclasses.asdict(config),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "flops": flops,
        "ratios": ratios,
        "analytic": terms,
        "jlora_le_merge_minus_dW": flops["jlora"] <= flops["merge"] - terms["dW_flops"],
    }


def table(result: dict) -> str:
    """A markdown report of `measure`'s result."""
    f, a, rt = result["flops"], result["analytic"], result["ratios"]
    c = result["config"]
    lines = [
        f"# Train-step FLOPs (XLA cost analysis, {result['backend']}, jax {result['jax']})",
        "",
        f"jlora.models.gpt2 GPT2LMHeadModel: n_layer={c['n_layer']}, n_embd={c['n_embd']}, n_head={c['n_head']}, "
        f"n_positions={c['n_positions']}, seq={c['seq']}, batch={c['batch']}, vocab_size={c['vocab_size']}; "
        f"LoRA rank={c['rank']} on {', '.join(c['targets'])} ({a['adapted_kernels']} kernels); "
        f"{a['tokens_per_step']:,} tokens/step; adamw.",
        f"Parameters: {a['params_total']:,} total, {a['params_trainable']:,} trainable with LoRA "
        f"({100 * a['params_trainable'] / a['params_total']:.2f}%).",
        "",
        "| step | GFLOPs | / full |",
        "|---|---:|---:|",
    ]
    lines += [f"| {TITLES[n]} | {f[n] / 1e9:,.3f} | {f[n] / f['full']:.4f} |" for n in STEPS]
    lines += [
        "",
        f"- jlora / full = {rt['jlora/full']:.4f}; jlora / merge-then-apply = {rt['jlora/merge']:.4f}",
        f"- merge - jlora = {(f['merge'] - f['jlora']) / 1e9:,.3f} GFLOPs = {rt['(merge-jlora)/dW']:.4f} x the "
        f"analytic dW FLOPs ({a['dW_flops'] / 1e9:,.3f} GFLOPs = sum of 2 * tokens * in * out over adapted kernels)",
        f"- analytic LoRA branch (jlora's extra) {a['lora_branch_flops'] / 1e9:,.3f} GFLOPs; merge's factor math "
        f"{a['merge_factor_flops'] / 1e9:,.3f} GFLOPs; so merge - jlora should be dW + factor math - branch = "
        f"{(a['dW_flops'] + a['merge_factor_flops'] - a['lora_branch_flops']) / 1e9:,.3f} GFLOPs (+ elementwise ops)",
        f"- jlora <= merge - dW: {result['jlora_le_merge_minus_dW']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    config = common.choose(common.parser(__doc__).parse_args(argv), Config(), QUICK)
    return common.run(config, measure, table)


if __name__ == "__main__":
    sys.exit(main())

"""DoRA vs LoRA: one AdamW train step on GPT-2 small with every dense kernel adapted, timed, and XLA's FLOPs.

    python -m benchmarks.dora            # GPT-2 small, seq 128, batch 8; writes results/dora.json and results/dora.md
    python -m benchmarks.dora --quick    # a 2-layer, d 64 model in seconds; writes results/dora_quick.{json,md}

On a GPU the same command runs in bfloat16 (frozen base bfloat16, adapters float32) at batch 16 and writes
results/dora_gpu.{json,md} (`_quick_gpu` with --quick). Two jitted steps, each value_and_grad of the next-token loss
through `lora.apply` (factored; adapters and AdamW state donated) then `optax.adamw`, differ only in
`LoraConfig(dora=...)`: r=8, alpha 16, targets c_attn, c_proj, c_fc (attn/c_attn, attn/c_proj, mlp/c_fc,
mlp/c_proj). DoRA adds, per kernel (in, out) and step, the column norms ||W + s A B|| computed factored
(jlora.variants.dora: ||W_j||^2 elementwise, the (out, r) product W^T A, an (r, r) Gram matrix: about (2r + 3) in out
FLOPs, no (in, out) product) and the gain m / norm on the output. Reported: the step times (interleaved, median), the
DoRA / LoRA step ratio (issue 15's target <= 1.10; PEFT's own benchmark: 1.26), and the FLOPs of both compiled steps
from cost_analysis with their ratio.
"""

from __future__ import annotations

import dataclasses
import re
import sys

import jax
import jax.numpy as jnp
import optax

import jlora
from benchmarks import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(common.GPT2Shape):
    """The benchmark's shape and settings; the defaults are GPT-2 small on the CPU."""

    seq: int = 128
    batch: int = 8
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = common.DENSE_TARGETS
    dtype: str = "float32"  # the frozen base's compute dtype
    warmup: int = 1
    repeats: int = 5
    out_dir: str = "results"
    name: str = "dora"

    def for_gpu(self) -> Config:
        return dataclasses.replace(self, dtype="bfloat16", batch=16, repeats=20, warmup=2)


QUICK = Config(**common.TINY_SHAPE | {"n_layer": 1}, n_positions=16, seq=16, batch=4, rank=4, repeats=3,
               name="dora_quick")


def hlo_ops(compiled) -> dict[str, int]:
    """The compiled program's operations in its entry computation: {"fusion": n, "dot": n, "other": n} (each a
    kernel or library call on a GPU; parameters, constants, tuples and bitcasts not counted)."""
    text = compiled.as_text()
    names = re.findall(r"= \S+ (\w[\w-]*)\(", text[text.index("ENTRY"):])
    free = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
    kept = [n for n in names if n not in free]
    return {"fusion": kept.count("fusion"), "dot": kept.count("dot"),
            "other": sum(n not in ("fusion", "dot") for n in kept)}


def measure(config: Config) -> dict:
    model = common.gpt2(config, dtype=jnp.dtype(config.dtype))
    tokens = common.tokens(jax.random.key(1), config.batch, config.seq, config.vocab_size)
    variables = model.init(jax.random.key(0), tokens[:1])
    if config.dtype != "float32":
        variables = jax.tree.map(lambda x: x.astype(config.dtype), variables)
    tx = optax.adamw(1e-4)
    runs, out = {}, {}
    for name, dora in (("lora", False), ("dora", True)):
        cfg = jlora.LoraConfig(rank=config.rank, alpha=config.alpha, targets=config.targets, dora=dora)
        lora = jlora.lora_transform(model.apply, cfg, strict=True)
        frozen, adapters = lora.init(variables, tokens, key=jax.random.key(2))
        step = common.train_steps(model, lora, tx)["jlora"]
        state = tx.init(adapters)
        compiled, timing = common.compile_timed(step, (frozen, adapters, state, tokens),
                                                donate_argnums=common.DONATE["jlora"])
        cost = common.xla_cost(compiled)
        ops = hlo_ops(compiled)
        box = {"adapters": adapters, "state": state}

        def run(compiled=compiled, frozen=frozen, box=box):
            box["adapters"], box["state"], loss = compiled(frozen, box["adapters"], box["state"], tokens)
            common.block(loss)

        runs[name] = run
        n_params = sum(x.size for x in jax.tree.leaves(adapters))
        out[name] = {"flops": cost["flops"], "temp_bytes": cost.get("temp_bytes"), "compile": timing,
                     "trainable_parameters": int(n_params), "hlo_ops": ops}
    others: dict = {}
    times = common.interleaved(runs, warmup=config.warmup, repeats=config.repeats, desc="dora vs lora",
                               others=others)
    for name in runs:
        out[name]["step"] = common.summary(times[name], others[name])
    out["step_ratio"] = out["dora"]["step"]["median_s"] / out["lora"]["step"]["median_s"]
    out["flops_ratio"] = out["dora"]["flops"] / out["lora"]["flops"]
    return out


def table(result: dict) -> str:
    def ops(name):
        o = result[name].get("hlo_ops")
        return "n/a" if o is None else f"{o['fusion']:,} / {o['dot']:,} / {o['other']:,}"

    rows = [[name.upper(), f"{result[name]['step']['median_s'] * 1e3:.1f}",
             common.cores(result[name]["step"].get("other_cores_median")), f"{result[name]['flops'] / 1e9:.3f}",
             ops(name), f"{result[name]['trainable_parameters']:,}"] for name in ("lora", "dora")]
    return (f"# DoRA vs LoRA train step ({result['label']}, {result['dtype']}, batch {result['batch']}, "
            f"seq {result['seq']}, r {result['rank']}, every dense kernel)\n\n"
            + common.md_table(["step", "median ms", "other load (cores)", "GFLOPs (XLA)",
                                "compiled ops: fusions / dots / other", "trainable"], rows)
            + f"\n\nDoRA / LoRA: step time {result['step_ratio']:.3f} (target <= 1.10; PEFT 1.26), "
              f"FLOPs {result['flops_ratio']:.4f}.\n")


def main(argv=None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    config = common.choose(args, Config(), QUICK)

    def measured(config):
        result = measure(config)
        result.update(label=common.gpt2_label(config), dtype=config.dtype, batch=config.batch, seq=config.seq,
                      rank=config.rank)
        return result

    return common.run(config, measured, table)


if __name__ == "__main__":
    sys.exit(main())

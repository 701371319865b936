"""QLoRA train step: float32 LoRA vs bfloat16 LoRA vs NF4 QLoRA vs GGUF-native, on SmolLM2-135M and GPT-2 small.

    python -m benchmarks.qlora                 # SmolLM2-135M (asset) and GPT-2 small's shape, batch 8 x 128 tokens
    python -m benchmarks.qlora --no-smollm2    # the GPT-2 shape alone (random weights: nothing to fetch)
    python -m benchmarks.qlora --quick         # a tiny random GPT-2 in seconds: qlora_quick.{json,md}

writes results/qlora.json and results/qlora.md. Each contender is one jitted AdamW step on the adapters alone
(value_and_grad of the next-token loss on float32 logits; adapters and optimizer state donated), LoRA r=8,
alpha 16 on q and v (SmolLM2: q_proj, v_proj; GPT-2: the q and v slices of the fused c_attn). The frozen base:
  float32   float32 (SmolLM2: the GGUF file dequantized by the `gguf` package)
  bfloat16  cast to bfloat16, the model computing in bfloat16 (adapters stay float32)
  nf4       `jlora.quantize(float32 tree, qtype="nf4", block_size=64, double_quant=True)` (QLoRA's setting; the
            default targets: every kernel and the token/position embeddings)
  gguf      SmolLM2: `from_pretrained(file, quantized=True)`, the file's own blocks (Q4_1 kernels, a Q8_0 token
            embedding, float32 norms); GPT-2: the float32 weights encoded the same way by the `gguf` package
            (kernels q4_1, embeddings q8_0), as llama.cpp's Q4_1 files store them
Measured per model: the frozen tree's bytes; XLA's memory_analysis of the compiled step, with "step peak" =
argument + output + temp - alias bytes (every buffer the step holds at once at worst: the donated outputs reuse
their arguments); the peak RSS of a child process per contender while it runs `memory_steps` steps (VmHWM reset
after set-up and compilation); the step time, contenders interleaved in one process, median, as ratios to float32
LoRA, with the other load on the machine. Also the step peak at `sweep_seqs` (compile only) and the "activation
floor" (float32 LoRA's temp bytes / its step peak: the least any compression of the frozen base could reach).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import dataclasses
import gc
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from benchmarks import common
from benchmarks.qlora_report import table, targets
from benchmarks.train_step import JaxRun
from jlora import quant_gguf
from jlora.qarray import QuantizedArray, is_quantized

CONTENDERS = ("float32", "bfloat16", "nf4", "gguf")
MODELS = ("smollm2", "gpt2")
DONATE = (1, 2)  # adapters, optimizer state


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(common.GPT2Shape):
    """The models, the contenders, the step's shape and how long to measure (GPT2Shape: GPT-2 small)."""

    models: tuple[str, ...] = MODELS
    smollm2: str = "smollm2"  # a jlora asset name or a GGUF path
    contenders: tuple[str, ...] = CONTENDERS  # float32 first: the ratios are to it
    batch: int = 8  # the memory target is at batch 8
    seq: int = 128  # 1,024 tokens a step, as benchmarks.train_step and experiments.nlg's Shakespeare windows
    sweep_seqs: tuple[int, ...] = (32,)  # step peak (compile only, float32 and nf4) at these lengths too
    rank: int = 8  # alpha / rank = 2, as benchmarks.train_step
    alpha: float = 16.0
    learning_rate: float = 1e-4  # adamw; the timing does not depend on it
    block_size: int = 64  # nf4 (QLoRA's)
    warmup: int = 1  # untimed interleaved rounds (the first call of each compiled step)
    repeats: int = 5  # timed rounds: a SmolLM2 round of 4 contenders takes 25-60 s on the shared 2 cores
    rss: bool = True  # peak RSS, one child process per (model, contender)
    memory_steps: int = 2  # steps a child runs after resetting its peak RSS
    memory_parallel: int = 2  # children at a time
    out_dir: str = "results"
    name: str = "qlora"

    def __post_init__(self):
        bad = [c for c in self.contenders if c not in CONTENDERS] + [m for m in self.models if m not in MODELS]
        if bad or not self.contenders or self.contenders[0] != "float32":
            raise ValueError(f"Config: contenders {self.contenders} must start with 'float32' and be among "
                             f"{CONTENDERS}; models {self.models} among {MODELS}")

    def for_gpu(self) -> Config:
        # the same shapes; device memory comes from memory_analysis (a child's host RSS says nothing of it), and
        # steps take milliseconds, so more timed rounds
        return dataclasses.replace(self, rss=False, repeats=30, warmup=2)


QUICK = Config(**common.TINY_SHAPE | {"n_layer": 1}, n_positions=16, seq=16, models=("gpt2",),
               contenders=("float32", "nf4", "gguf"), sweep_seqs=(), warmup=0, repeats=1, rss=False, name="qlora_quick")


# --- the contenders -------------------------------------------------------------------------------------------------

def tokens(config: Config, vocab: int, seq: int | None = None) -> jax.Array:  # int32 (batch, seq)
    return common.tokens(jax.random.key(2), config.batch, seq or config.seq, vocab)


def float_model(config: Config, which: str, *, quantized: bool = False):
    """(module, variables): SmolLM2 from its GGUF (float32, or the file's blocks with `quantized`), or the random
    GPT-2 of `config`'s shape."""
    if which == "smollm2":
        return jlora.models.from_pretrained(jlora.models.hf.resolve(config.smollm2), quantized=quantized)
    model = common.gpt2(config)
    return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def lora_config(config: Config, which: str) -> jlora.LoraConfig:
    if which == "gpt2":
        return common.lora_config("qv", rank=config.rank, alpha=config.alpha)
    return jlora.LoraConfig(rank=config.rank, alpha=config.alpha, targets=("q_proj", "v_proj"))


def gguf_encode(tree):
    """Every float kernel / embedding (>= 2 dims) of `tree` as a GGUF-block QuantizedArray, encoded on the host by
    the `gguf` package: embeddings q8_0, kernels q4_1 (llama.cpp's Q4_1 file mix, as SmolLM2's file)."""

    def one(path, x):
        name = str(getattr(path[-1], "key", ""))
        if name not in ("kernel", "embedding") or x.ndim < 2:
            return x
        qtype = "q8_0" if name == "embedding" else "q4_1"
        size = quant_gguf.block_size(qtype)
        blocks = quant_gguf.encode(np.asarray(x, np.float32).reshape(-1, size), qtype)
        return QuantizedArray(jnp.asarray(blocks), None, shape=tuple(x.shape), dtype="float32", qtype=qtype,
                              block_size=size)

    return jax.tree_util.tree_map_with_path(one, tree)


def contender(config: Config, which: str, name: str, base=None):
    """(model, lora, frozen, adapters) of contender `name` on model `which`; `base` = float_model(...) to share
    the float32 load among contenders (None: load here, and SmolLM2's gguf contender never builds float weights)."""
    if name == "gguf" and which == "smollm2":
        model, variables = float_model(config, which, quantized=True)
    else:
        model, variables = base or float_model(config, which)
    if name == "bfloat16":
        model = model.clone(dtype=jnp.bfloat16)
        variables = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                 variables)
    lora = jlora.lora_transform(model.apply, lora_config(config, which), strict=True)
    frozen, adapters = lora.init(variables, tokens(config, model.config.vocab_size)[:1], key=jax.random.key(1))
    if name == "nf4":
        frozen = jlora.quantize(frozen, qtype="nf4", block_size=config.block_size, double_quant=True)
    elif name == "gguf" and which == "gpt2":
        frozen = gguf_encode(frozen)
    return model, lora, frozen, adapters


def step_fn(lora: jlora.LoraTransform, optimizer: optax.GradientTransformation):
    """(frozen, adapters, state, tokens) -> (adapters, state, loss): value_and_grad w.r.t. the adapters of the
    next-token loss on float32 logits, then `optimizer`."""

    def step(frozen, adapters, state, ids):
        def loss_fn(a):
            return common.next_token_loss(lora.apply(frozen, a, ids).astype(jnp.float32), ids)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, state = optimizer.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, loss

    return step


def tree_bytes(frozen) -> tuple[int, str, int]:
    """(bytes as stored, a QuantizedArray's codes and scales; the '/'-joined path and float32 bytes of the largest
    leaf, what dequantizing it at its consumer allocates)."""
    leaves = jax.tree_util.tree_flatten_with_path(frozen, is_leaf=is_quantized)[0]
    path, x = max(leaves, key=lambda kv: np.prod(kv[1].shape))
    return (int(sum(x.nbytes for _, x in leaves)), "/".join(str(getattr(k, "key", k)) for k in path),
            int(4 * np.prod(x.shape)))


def step_peak(xla: dict[str, int]) -> int:
    """argument + output + temp - alias bytes of `common.xla_cost`: all the step's buffers at once, at worst."""
    return xla["argument_bytes"] + xla["output_bytes"] + xla["temp_bytes"] - xla["alias_bytes"]


def compiled_step(config: Config, model, lora, frozen, adapters, seq: int | None = None, *, concrete: bool = True):
    """(compiled step, its arguments or None, compile timing) at `seq` tokens per row."""
    optimizer = optax.adamw(config.learning_rate)
    own, state = jax.jit(lambda a: (jax.tree.map(jnp.copy, a), optimizer.init(a)))(adapters)  # one compile
    args = [frozen, own, state, tokens(config, model.config.vocab_size, seq)]
    if not concrete:
        args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    compiled, timing = common.compile_timed(step_fn(lora, optimizer), args, donate_argnums=DONATE)
    return compiled, (args if concrete else None), timing


# --- peak RSS in a child process ------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Returns freed heap to the OS (glibc malloc_trim) and resets this process's VmHWM to its RSS now
    (/proc/self/clear_refs "5"); False where either is not possible (then the peak includes the set-up)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_main(config: Config, which: str, name: str) -> None:
    """In the child: build one contender, compile its step, reset the peak RSS, run `memory_steps` steps."""
    model, lora, frozen, adapters = contender(config, which, name)
    compiled, args, _ = compiled_step(config, model, lora, frozen, adapters)
    del frozen, adapters
    gc.collect()
    setup_peak = common.peak_rss_bytes()
    reset = reset_peak_rss()
    rss_setup = common.rss_bytes()
    run = JaxRun(compiled, args, DONATE)
    for _ in range(config.memory_steps):
        run()
    common.child_result({"model": which, "contender": name, "steps": config.memory_steps, "reset": reset,
                         "setup_peak_rss_bytes": setup_peak, "rss_after_setup_bytes": rss_setup,
                         "peak_rss_bytes": common.peak_rss_bytes(), "losses": run.losses})


def memory_child(config: Config, which: str, name: str) -> dict[str, Any]:  # child_main's figures
    return common.run_child("benchmarks.qlora", ["--child", which, name, "--child-config",
                                                 json.dumps(dataclasses.asdict(config))])


# --- measurement ----------------------------------------------------------------------------------------------------

def measure_model(config: Config, which: str) -> dict[str, Any]:
    """Everything for one model: the contenders' bytes, XLA memory, times (interleaved) and peak RSS."""
    print(f"\n== {which}: {', '.join(config.contenders)}", flush=True)
    base = float_model(config, which)
    out: dict[str, Any] = {}
    runs, builds = {}, {}
    for name in config.contenders:
        model, lora, frozen, adapters = builds[name] = contender(config, which, name, base)
        compiled, args, timing = compiled_step(config, model, lora, frozen, adapters)
        xla = common.xla_cost(compiled)
        nbytes, largest, largest_bytes = tree_bytes(frozen)
        out[name] = {"frozen_bytes": nbytes, "largest_weight": largest,
                     "largest_weight_f32_bytes": largest_bytes, "xla": xla, "step_peak_bytes": step_peak(xla),
                     "compile": timing, "trainable_params": common.count(adapters)}
        runs[name] = JaxRun(compiled, args, DONATE)
    del base
    others: dict[str, list] = {}
    times = common.interleaved(runs, warmup=config.warmup, repeats=config.repeats, desc=f"{which} step",
                               others=others)
    f32 = out["float32"]
    for name in config.contenders:
        x = out[name]
        x["time"] = common.summary(times[name], others[name])
        x["losses"] = runs[name].losses
        x["time_ratio"] = x["time"]["median_s"] / float(np.median(times["float32"]))
        x["time_ratio_of_min"] = min(times[name]) / min(times["float32"])  # the least disturbed runs
        x["frozen_ratio"] = x["frozen_bytes"] / f32["frozen_bytes"]
        x["step_peak_ratio"] = x["step_peak_bytes"] / f32["step_peak_bytes"]
        x["extra_temp_bytes"] = x["xla"]["temp_bytes"] - f32["xla"]["temp_bytes"]
    del runs
    sweep = {}
    for seq in config.sweep_seqs:
        row = {}
        for name in [n for n in ("float32", "nf4") if n in builds]:
            compiled, _, _ = compiled_step(config, *builds[name], seq=seq, concrete=False)
            xla = common.xla_cost(compiled)
            row[name] = {"step_peak_bytes": step_peak(xla), "temp_bytes": xla["temp_bytes"]}
        sweep[str(seq)] = row
    del builds
    if config.rss:
        print(f"peak RSS: {len(config.contenders)} child processes, {config.memory_parallel} at a time", flush=True)
        with concurrent.futures.ThreadPoolExecutor(config.memory_parallel) as pool:
            for name, mem in zip(config.contenders,
                                 pool.map(lambda n: memory_child(config, which, n), config.contenders)):
                out[name]["memory"] = mem
    floor = f32["xla"]["temp_bytes"] / f32["step_peak_bytes"]
    return {"contenders": out, "sweep": sweep, "activation_floor": floor, "loadavg_end": common.loadavg()}


def measure(config: Config) -> dict[str, Any]:
    result = {"backend": jax.default_backend(), "loadavg_start": common.loadavg(), "models": {}}
    for which in config.models:
        result["models"][which] = measure_model(config, which)
    result["targets"] = targets(result)
    return result


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--no-smollm2", action="store_true", help="the GPT-2 shape only (no asset)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(common.config_from_json(Config, args.child_config), *args.child)
        return 0
    config = common.choose(args, Config(), QUICK)
    if args.no_smollm2:
        config = dataclasses.replace(config, models=tuple(m for m in config.models if m != "smollm2"))
    return common.run(config, measure, lambda result: table(config, result))


if __name__ == "__main__":
    sys.exit(main())

"""One AdamW train step on GPT-2 small: full fine-tuning vs jlora vs merge-then-apply vs PEFT (PyTorch), timed.

    python -m benchmarks.train_step             # GPT-2 small, batch 8 and 1 (8-14 min on the shared 2-core CPU)
    python -m benchmarks.train_step --quick     # a 2-layer, d 64 model in seconds; train_step_quick.{json,md}
    python -m benchmarks.train_step --no-peft   # the JAX contenders only

writes results/train_step.json and results/train_step.md (`_gpu` appended on a GPU, where it runs in bfloat16 at
bigger batches). The model is `jlora.models.gpt2.GPT2LMHeadModel` with random weights: 12 layers, n_embd 768,
12 heads, vocab 50,257, 1,024 positions (124M parameters), seq 128. LoRA r=8, alpha 16, in two settings:
  qv   `targets=("c_attn",), fused={"c_attn": (True, False, True)}`: loralib's MergedLinear on the q and v slices of
       GPT-2's fused q|k|v projection;
  all  `targets=("c_attn", "c_proj", "c_fc")`: every dense kernel (attn/c_attn, attn/c_proj, mlp/c_fc, mlp/c_proj).
Contenders (each step = value_and_grad of the next-token loss + AdamW update, jitted, trained tree and optimizer
state donated):
  full       grad w.r.t. every parameter, adamw on all;
  jlora      grad w.r.t. the adapters through `lora.apply` (factored: x @ W + scale * (x @ A) @ B, no dW formed);
  merge      grad w.r.t. the adapters through `model.apply(jlora.merge(frozen, adapters, cfg))` inside jit;
  peft       transformers' GPT2LMHeadModel, same config, random init, `peft.get_peft_model` with
             LoraConfig(r=8, lora_alpha=16, fan_in_fan_out=True), torch.optim.AdamW on the trainable parameters,
             torch.set_num_threads(<cores>); forward + backward + step + zero_grad. HF's c_attn is one Conv1D, so
             q,v alone cannot be targeted: peft[qv] adapts ALL of c_attn (q, k and v), a little more work.
Measured, per batch size: step time (contenders interleaved A B C ... then reversed, after a warm-up round; the
median of the timed rounds; ratios to full fine-tuning); XLA's FLOPs (cost_analysis) and buffer bytes
(memory_analysis: argument + output + temp) of each compiled JAX step; compile time (trace, lower and XLA compile of
a fresh `jax.jit(step)`, interleaved repeats, median; jlora's trace includes tracing the model a second time inside
`lora.apply`); peak RSS (VmHWM) of a separate child process per contender that builds only its own model and runs a
few steps. bfloat16: run only where a bf16 matmul beats float32 here (the check is in the results).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from benchmarks import common


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(common.GPT2Shape):
    """GPT-2 small, the two LoRA settings, and how long to measure."""

    seq: int = 128  # 8 batch * 128 seq = 1,024 tokens/step
    batches: tuple[int, ...] = (8, 1)  # the targets are read at the first (8)
    rank: int = 8  # the LoRA paper's r
    alpha: float = 16.0  # scale alpha / r = 2
    learning_rate: float = 1e-4  # adamw (optax and torch); the timing does not depend on it
    dtype: str = "float32"  # computation dtype (parameters stay float32); "bfloat16" on a GPU
    warmup: int = 1  # untimed rounds: the first call of a compiled step, allocator and cache warm-up
    repeats: tuple[int, ...] = (5, 7)  # timed rounds per batch size: a batch-8 round of 7 contenders takes 20-50 s
    compile_repeats: int = 3  # fresh trace + lower + compile per JAX contender (at the first batch; ~5 s each)
    memory_batches: tuple[int, ...] = (8,)  # batch sizes at which each contender's child process measures peak RSS
    memory_names: tuple[str, ...] = ()  # the contenders measured so (each child ~20 s here); () means all of them
    memory_steps: int = 3  # steps the child runs before reading VmHWM (the first includes compilation)
    memory_parallel: int = 2  # children at a time (after the timing: RSS does not depend on the neighbours)
    peft: bool = True  # time transformers + PEFT too (needs torch, transformers, peft)
    bf16_check: bool = True  # time a bf16 vs f32 matmul and add a bfloat16 pass where bf16 is faster (CPU only)
    gpu_batches: tuple[int, ...] = (32, 8)  # on a GPU: bigger batches keep the device busy
    out_dir: str = "results"
    name: str = "train_step"

    def __post_init__(self):
        if len(self.repeats) != len(self.batches):
            raise ValueError(f"Config.repeats {self.repeats} needs one entry per batch size in {self.batches}")
        if min(self.repeats) < 1 or self.compile_repeats < 1:
            raise ValueError("Config.repeats and compile_repeats must be >= 1")

    def for_gpu(self) -> Config:
        return dataclasses.replace(self, dtype="bfloat16", batches=self.gpu_batches,
                                   repeats=self.repeats[: len(self.gpu_batches)] + (self.repeats[-1],)
                                   * (len(self.gpu_batches) - len(self.repeats)),
                                   memory_batches=self.gpu_batches[:1], bf16_check=False)


QUICK = Config(**common.TINY_SHAPE, n_positions=16, seq=16, batches=(4,), repeats=(5,),
               compile_repeats=1, memory_batches=(4,), memory_names=("full", "jlora[all]", "peft[all]"),
               memory_steps=2, gpu_batches=(4,), name="train_step_quick")

TITLES = {"full": "full fine-tuning", "jlora": "jlora (factored)", "merge": "merge-then-apply", "peft": "PEFT (torch)"}


def contender_names(config: Config, *, peft: bool) -> list[str]:
    """'full', then per LoRA setting 'jlora[kind]', 'merge[kind]' (and 'peft[kind]')."""
    names = ["full"]
    for kind in common.LORA_KINDS:
        names += [f"jlora[{kind}]", f"merge[{kind}]"] + ([f"peft[{kind}]"] if peft else [])
    return names


def parse_name(name: str) -> tuple[str, str | None]:
    """'jlora[qv]' -> ('jlora', 'qv'); 'full' -> ('full', None)."""
    step, _, kind = name.partition("[")
    return step, kind.rstrip("]") or None


# --- JAX contenders -------------------------------------------------------------------------------------------------

class JaxSetup:
    """The model, one batch of tokens, the variables and, per LoRA setting, (frozen, adapters) and the transform."""

    def __init__(self, config: Config, batch: int, dtype: str, kinds: tuple[str, ...]):
        self.config = config
        self.model = common.gpt2(config, dtype=dtype)
        self.tokens = common.tokens(jax.random.key(2), batch, config.seq, config.vocab_size)
        self.variables = jax.jit(self.model.init)(jax.random.key(0), self.tokens)  # float32 parameters
        self.optimizer = optax.adamw(config.learning_rate)
        self.loras, self.lora_trees = {}, {}
        for kind in kinds:
            self.loras[kind] = self.lora(kind)
            self.lora_trees[kind] = self.loras[kind].init(self.variables, self.tokens, key=jax.random.key(1))

    def lora(self, kind: str) -> jlora.LoraTransform:
        """A fresh transform (no state is shared between two of them)."""
        cfg = common.lora_config(kind, rank=self.config.rank, alpha=self.config.alpha)
        return jlora.lora_transform(self.model.apply, cfg, strict=True)  # a materialising fallback is an error

    def step(self, name: str, *, fresh: bool = False):
        """The un-jitted step of contender `name` ('full', 'jlora[qv]', ...); a new closure each call, over a new
        LoRA transform when `fresh`."""
        step, kind = parse_name(name)
        lora = self.lora(kind) if fresh and kind else self.loras.get(kind)
        return common.train_steps(self.model, lora, self.optimizer)[step]

    def args(self, name: str, *, copy: bool) -> list[Any]:
        """The step's arguments. The trained tree and optimizer state are donated, so with `copy` they are fresh
        arrays (the frozen base and the shared initial adapters survive)."""
        step, kind = parse_name(name)
        own = (lambda t: jax.tree.map(jnp.copy, t)) if copy else (lambda t: t)
        if step == "full":
            variables = own(self.variables)
            return [variables, self.optimizer.init(variables), self.tokens]
        frozen, adapters = self.lora_trees[kind]
        adapters = own(adapters)
        return [frozen, adapters, self.optimizer.init(adapters), self.tokens]

    def trainable(self, name: str) -> int:
        step, kind = parse_name(name)
        return common.count(self.variables if step == "full" else self.lora_trees[kind][1])


class JaxRun:
    """One contender's training loop: calls the compiled step on its own state, which it carries between calls."""

    def __init__(self, compiled, args: list[Any], donate: tuple[int, int]):
        self.compiled, self.args, self.donate, self.losses = compiled, args, donate, []

    def __call__(self):
        tree, state, loss = common.block(self.compiled(*self.args))
        self.args[self.donate[0]], self.args[self.donate[1]] = tree, state
        self.losses.append(float(loss))


def jax_run(setup: JaxSetup, name: str, *, copy: bool) -> tuple[JaxRun, dict[str, float]]:
    """The compiled contender and its (cold) compile timing."""
    step, _ = parse_name(name)
    args = setup.args(name, copy=copy)
    compiled, timing = common.compile_timed(setup.step(name), args, donate_argnums=common.DONATE[step])
    return JaxRun(compiled, args, common.DONATE[step]), timing


# --- PEFT (PyTorch) contender ---------------------------------------------------------------------------------------

def peft_available() -> str | None:
    """None when the PEFT contender can run here, else why not. Sets OMP_WAIT_POLICY=PASSIVE (unless set) before
    torch loads OpenMP: on a shared 2-core CPU, torch's spinning waiters made the same PEFT step 4-5x slower."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        return f"PEFT contender skipped: {e} (pip install -e '.[reference]')"
    if common.on_gpu() and not torch.cuda.is_available():
        return "PEFT contender skipped: JAX runs on a GPU but this torch has no CUDA (timings would not compare)"
    return None


class PeftRun:
    """transformers' GPT2LMHeadModel of the same shape + PEFT LoRA, torch AdamW; one call = one train step."""

    def __init__(self, config: Config, kind: str, batch: int, dtype: str):
        import peft
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(0)
        self.torch = torch
        self.device = "cuda" if common.on_gpu() else "cpu"
        hf = transformers.GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions,
                                     n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1)
        targets = ["c_attn"] if kind == "qv" else list(common.DENSE_TARGETS)  # HF's c_attn is fused: q, k and v
        lora = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets, lora_dropout=0.0,
                               fan_in_fan_out=True)
        self.model = peft.get_peft_model(transformers.GPT2LMHeadModel(hf), lora).to(self.device)
        self.model.train()
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
        generator = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, config.vocab_size, (batch, config.seq), generator=generator).to(self.device)
        self.autocast = dtype == "bfloat16"
        self.losses: list[float] = []

    def __call__(self):
        torch = self.torch
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())  # .item() waits for the device


# --- measurement ----------------------------------------------------------------------------------------------------

def compile_rounds(setup: JaxSetup, names: list[str], repeats: int) -> tuple[dict[str, list], dict[str, Any]]:
    """`repeats` interleaved rounds of trace + lower + compile of a fresh step (new closure, new LoRA transform)
    per JAX contender, against abstract arguments (nothing executes). Returns ({name: [timing per round]},
    {name: the last compiled executable})."""
    abstract = {n: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup.args(n, copy=False))
                for n in names}
    timings: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    compiled = {}
    with common.progress(repeats * len(names), "compile time") as bar:
        for k in range(repeats):
            for name in names if k % 2 == 0 else reversed(names):
                step, _ = parse_name(name)
                compiled[name], timing = common.compile_timed(setup.step(name, fresh=True), abstract[name],
                                                              donate_argnums=common.DONATE[step])
                timings[name].append(timing)
                bar.update()
    return timings, compiled


def median_timing(reps: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.median([r[k] for r in reps])) for k in reps[0]}


def memory_child(config: Config, name: str, batch: int, dtype: str) -> dict[str, Any]:
    """Peak RSS of contender `name` in a fresh process (`--child`), which builds only what that contender needs."""
    args = ["--child", name, "--batch", str(batch), "--dtype", dtype,
            "--child-config", json.dumps(dataclasses.asdict(config))]
    return common.run_child("benchmarks.train_step", args)


def child_main(config: Config, name: str, batch: int, dtype: str) -> None:
    """In the child process: set up one contender, run `memory_steps` steps, print the RSS figures."""
    rss_import = common.rss_bytes()
    step, kind = parse_name(name)
    if step == "peft":
        run = PeftRun(config, kind, batch, dtype)
    else:
        setup = JaxSetup(config, batch, dtype, (kind,) if kind else ())
        rss_setup_model = common.rss_bytes()
        run, _ = jax_run(setup, name, copy=False)
        del setup
    rss_setup = common.rss_bytes()
    for _ in range(config.memory_steps):
        run()
    result = {"name": name, "batch": batch, "dtype": dtype, "steps": config.memory_steps,
              "rss_after_import_bytes": rss_import, "rss_after_setup_bytes": rss_setup,
              "peak_rss_bytes": common.peak_rss_bytes(), "losses": run.losses}
    if step != "peft":
        result["rss_after_init_bytes"] = rss_setup_model
        if common.on_gpu():
            stats = jax.devices()[0].memory_stats() or {}
            result["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    elif common.on_gpu():
        result["device_peak_bytes"] = run.torch.cuda.max_memory_allocated()
    common.child_result(result)


def measure_batch(config: Config, batch: int, repeats: int, dtype: str, *, peft: bool, compile_reps: int,
                  memory: bool) -> dict[str, Any]:
    """Everything for one batch size and dtype: the contenders timed interleaved, and their costs."""
    names = contender_names(config, peft=peft)
    jax_names = [n for n in names if not n.startswith("peft")]
    print(f"\n== batch {batch}, {dtype}: {', '.join(names)}", flush=True)
    setup = JaxSetup(config, batch, dtype, common.LORA_KINDS)
    out: dict[str, Any] = {n: {"step": parse_name(n)[0], "lora": parse_name(n)[1]} for n in names}
    compiled = {}
    if compile_reps:
        print(f"compile time: {compile_reps} fresh compile(s) per JAX contender", flush=True)
        reps, compiled = compile_rounds(setup, jax_names, compile_reps)
        for n in jax_names:
            out[n]["compile"] = {"median": median_timing(reps[n]), "first": reps[n][0], "reps": reps[n]}
    runs = {}
    for n in names:
        step, kind = parse_name(n)
        if step == "peft":
            run = PeftRun(config, kind, batch, dtype)
            out[n].update(trainable_params=run.trainable, attn_implementation=run.attn_implementation)
        else:
            if n in compiled:  # the last of the compile rounds, compiled for the same shapes
                run = JaxRun(compiled[n], setup.args(n, copy=True), common.DONATE[step])
            else:
                run, _ = jax_run(setup, n, copy=True)
            out[n].update(trainable_params=setup.trainable(n), xla=common.xla_cost(run.compiled))
        runs[n] = run
    others: dict[str, list[float]] = {}
    times = common.interleaved(runs, warmup=config.warmup, repeats=repeats, desc=f"train step, batch {batch}",
                               others=others)
    full, full_min = float(np.median(times["full"])), min(times["full"])
    for n in names:
        out[n]["time"] = common.summary(times[n], others[n])
        out[n]["ratio_to_full"] = out[n]["time"]["median_s"] / full
        out[n]["ratio_to_full_of_min"] = min(times[n]) / full_min  # the least disturbed runs, for comparison
        out[n]["tokens_per_s"] = batch * config.seq / out[n]["time"]["median_s"]
        out[n]["losses"] = runs[n].losses
    del runs, setup
    if memory:
        chosen = [n for n in names if not config.memory_names or n in config.memory_names]
        print(f"peak RSS: {len(chosen)} child processes, {config.memory_parallel} at a time", flush=True)
        with concurrent.futures.ThreadPoolExecutor(config.memory_parallel) as pool:
            for n, mem in zip(chosen, pool.map(lambda n: memory_child(config, n, batch, dtype), chosen)):
                out[n]["memory"] = mem
    return {"batch": batch, "tokens": batch * config.seq, "dtype": dtype, "loadavg_end": common.loadavg(),
            "contenders": out}


def measure(config: Config) -> dict[str, Any]:
    peft_skip = peft_available() if config.peft else "PEFT contender off (--no-peft / Config.peft=False)"
    result: dict[str, Any] = {"backend": jax.default_backend(), "loadavg_start": common.loadavg(),
                              "peft_skipped": peft_skip, "notes": []}
    dtypes = [config.dtype]
    if config.bf16_check and not common.on_gpu():
        check = common.bf16_check()
        result["bf16_check"] = check
        if check["bfloat16_faster"]:
            dtypes.append("bfloat16")
            result["notes"].append("bf16 matmul faster than f32 here: a bfloat16 pass (JAX contenders) follows")
        else:
            result["notes"].append(
                f"bfloat16 is not faster than float32 on this CPU (an {check['shape']} matmul: bf16 "
                f"{check['bfloat16_s'] * 1e3:.2f} ms vs f32 {check['float32_s'] * 1e3:.2f} ms, "
                f"{check['bfloat16_over_float32']:.2f}x; avx512_bf16={check['cpu_flags']['avx512_bf16']}, "
                f"amx_bf16={check['cpu_flags']['amx_bf16']}): the bfloat16 table is skipped")
    if config.peft:
        result["notes"].append("peft[qv] adapts all of HF's fused c_attn (q, k and v): PEFT cannot target q and v "
                               "slices of one Conv1D; jlora[qv] adapts the q and v slices only (loralib MergedLinear)")
    passes = {}
    for dtype in dtypes:
        main_pass = dtype == config.dtype
        batches = config.batches if main_pass else config.batches[:1]
        passes[dtype] = {"batches": {}}
        for i, (batch, repeats) in enumerate(zip(batches, config.repeats)):
            passes[dtype]["batches"][str(batch)] = measure_batch(
                config, batch, repeats, dtype, peft=peft_skip is None and main_pass,
                compile_reps=config.compile_repeats if i == 0 else 0,
                memory=main_pass and batch in config.memory_batches)
    result["passes"] = passes
    return result


# --- report ---------------------------------------------------------------------------------------------------------

def table(config: Config, result: dict[str, Any]) -> str:
    c = config
    lines = [f"# Train step: {common.gpt2_label(c)}, AdamW ({result['backend']})", "",
             f"`jlora.models.gpt2.GPT2LMHeadModel`, random weights: n_layer={c.n_layer}, n_embd={c.n_embd}, "
             f"n_head={c.n_head}, vocab_size={c.vocab_size:,}, n_positions={c.n_positions}, seq={c.seq}. LoRA "
             f"r={c.rank}, alpha={c.alpha:g}: qv = {common.LORA_TITLES['qv']}; all = {common.LORA_TITLES['all']}. "
             f"Contenders interleaved in one process after {c.warmup} warm-up round(s); median of the timed rounds; "
             f"ratios to full fine-tuning in the same run. `other load`: the median CPU cores that other processes "
             f"on this shared machine kept busy during the contender's timed runs (/proc/stat; 0 = quiet); "
             f"`min / full min` compares the least disturbed runs.", ""]
    lines += [f"- {note}" for note in result["notes"]]
    if result["peft_skipped"]:
        lines.append(f"- {result['peft_skipped']}")
    for dtype, p in result["passes"].items():
        for b, m in p["batches"].items():
            con = m["contenders"]
            full = con["full"]
            lines += ["", f"## {dtype}, batch {b} ({m['tokens']:,} tokens/step)", ""]
            rows = []
            for n, x in con.items():
                t = x["time"]
                rows.append([n, f"{x['trainable_params']:,}", common.secs(t["median_s"]),
                             f"{common.secs(t['min_s'])}–{common.secs(t['max_s'])}", f"{x['ratio_to_full']:.3f}",
                             f"{x['ratio_to_full_of_min']:.3f}", f"{x['tokens_per_s']:,.0f}",
                             common.cores(t["other_cores_median"]), f"{x['losses'][0]:.4f}"])
            lines.append(common.md_table(["contender", "trainable params", "median step (s)", "min–max (s)",
                                          "/ full", "min / full min", "tokens/s", "other load (cores)",
                                          "first loss"], rows))
            rows = []
            for n, x in con.items():
                if "xla" not in x and "memory" not in x:
                    continue
                xla, mem = x.get("xla", {}), x.get("memory", {})
                fx, fm = full.get("xla", {}), full.get("memory", {})
                rows.append([n, common.flops(xla.get("flops")), common.ratio(xla.get("flops"), fx.get("flops")),
                             common.size(xla.get("argument_bytes")), common.size(xla.get("output_bytes")),
                             common.size(xla.get("temp_bytes")), common.size(xla.get("total_bytes")),
                             common.ratio(xla.get("total_bytes"), fx.get("total_bytes")),
                             common.size(mem.get("peak_rss_bytes")),
                             common.ratio(mem.get("peak_rss_bytes"), fm.get("peak_rss_bytes"))])
            if rows:
                lines += ["", "XLA cost of the compiled step (FLOPs: cost_analysis; bytes: memory_analysis, "
                          "argument + output + temp) and peak RSS of a child process that builds only that "
                          f"contender and runs {c.memory_steps} steps (VmHWM):", ""]
                lines.append(common.md_table(["contender", "XLA FLOPs", "/ full", "argument", "output", "temp",
                                              "arg+out+temp", "/ full", "peak RSS", "/ full"], rows))
            rows = []
            for n, x in con.items():
                if "compile" not in x:
                    continue
                med, fmed = x["compile"]["median"], full["compile"]["median"]
                rows.append([n, f"{med['trace_s']:.2f}", f"{med['lower_s']:.2f}", f"{med['compile_s']:.2f}",
                             f"{med['total_s']:.2f}", common.ratio(med["total_s"], fmed["total_s"]),
                             common.ratio(med["compile_s"], fmed["compile_s"]),
                             f"{x['compile']['first']['total_s']:.2f}"])
            if rows:
                reps = len(full["compile"]["reps"])
                lines += ["", f"Compile time, median of {reps} fresh `jax.jit(step).trace(...).lower().compile()` "
                          "per contender, interleaved (s); jlora's trace includes tracing the model twice (once "
                          "to a jaxpr inside `lora.apply`, once more as that jaxpr is interpreted):", ""]
                lines.append(common.md_table(["contender", "trace", "lower", "XLA compile", "total", "total / full",
                                              "compile / full", "first (cold) total"], rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--no-peft", action="store_true", help="skip the PyTorch PEFT contenders")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(common.config_from_json(Config, args.child_config), args.child, args.batch, args.dtype)
        return 0
    config = common.switched_off(common.choose(args, Config(), QUICK), args, {"no_peft": "peft"})
    return common.run(config, measure, lambda result: table(config, result))


if __name__ == "__main__":
    sys.exit(main())

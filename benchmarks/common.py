"""What every benchmark shares: machine and version info, the interleaved timer, result writers, the GPT-2 builder,
the train steps and the next-token loss. Nothing here runs at import.

Each benchmark is a module run as `python -m benchmarks.NAME [--quick] [--out-dir DIR]` with a frozen `Config`;
`cli` picks the full or quick config (and the GPU variant when JAX's backend is not the CPU), and `write_results`
writes `<out_dir>/<stem>.json` (the result plus machine, versions, config) and `<out_dir>/<stem>.md`.

Timing rule: contenders run interleaved in one process (`interleaved`: A B C, C B A, A B C, ...), after untimed
warm-up rounds, and each is summarised by the median of its timed runs; only ratios within one run are reported as
comparisons.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.models.gpt2 import GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parents[1]
DENSE_TARGETS = ("c_attn", "c_proj", "c_fc")  # every dense kernel: attn/c_attn, attn/c_proj, mlp/c_fc, mlp/c_proj
LORA_KINDS = ("qv", "all")
LORA_TITLES = {
    "qv": "q,v of the fused c_attn (k slice off)",
    "all": "all dense kernels (c_attn, attn+mlp c_proj, c_fc)",
}
STEPS = ("full", "jlora", "merge")  # the three JAX train steps of `train_steps`
DONATE = {"full": (0, 1), "jlora": (1, 2), "merge": (1, 2)}  # the trained tree and its optimizer state
CHILD_MARK = "BENCH-CHILD-RESULT "  # a child process prints its JSON result after this on one stdout line
DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "peft", "transformers",
                 "jlora")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


# --- machine, versions ----------------------------------------------------------------------------------------------

def _cpuinfo() -> dict[str, str]:
    """The first processor's `key: value` lines of /proc/cpuinfo ({} where there is none)."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if info:
                    break
                continue
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_flags() -> dict[str, bool]:
    """{flag: present} for the SIMD/matrix flags that decide whether bf16 can be fast (`CPU_FLAGS`)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return {f: f in flags for f in CPU_FLAGS}


def _proc_bytes(path: str, key: str) -> int | None:
    """A `key:  N kB` line of a /proc file (meminfo, self/status) in bytes; None where it cannot be read."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on a shared machine shows here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """CPU model, core counts, RAM, relevant CPU flags, OS, JAX's backend and first device, load average now."""
    cpu = _cpuinfo()
    device = jax.devices()[0]
    return {
        "cpu_model": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": _proc_bytes("/proc/meminfo", "MemTotal"),
        "cpu_flags": cpu_flags(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "loadavg": loadavg(),
    }


def _git() -> dict[str, Any]:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in run("status", "--porcelain", "--", "jlora").splitlines() if line.strip()]
    return {"commit": run("rev-parse", "HEAD").strip() or None, "jlora_modified_files": dirty}


def versions() -> dict[str, Any]:
    """Python and the installed versions of `DISTRIBUTIONS` (None where not installed), and jlora's git state."""
    out: dict[str, Any] = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["git"] = _git()
    return out


# --- command line, results ------------------------------------------------------------------------------------------

def on_gpu() -> bool:
    """True when JAX runs on an accelerator: benchmarks then use bfloat16, bigger batches and a `_gpu` suffix."""
    return jax.default_backend() != "cpu"


def parser(doc: str) -> argparse.ArgumentParser:
    """The common options: `--quick` (the module's QUICK config, seconds) and `--out-dir`."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, seconds: checks the code runs")
    p.add_argument("--out-dir", default=None, help="where the .json and .md go (default: the config's, results/)")
    return p


_START: dict[str, Any] = {}  # jlora's git state when the benchmark started (`choose`), for `write_results`


def choose(args: argparse.Namespace, full, quick):
    """The config for parsed `args`: QUICK or the full one, with `--out-dir`, adapted by `for_gpu()` on a GPU.
    Records jlora's git state at the start (another process may edit the tree while a long benchmark runs)."""
    _START["git"] = _git()
    config = quick if args.quick else full
    if args.out_dir is not None:
        config = dataclasses.replace(config, out_dir=args.out_dir)
    if on_gpu():
        config = config.for_gpu()
    return config


def stem(config) -> str:
    """The results' file stem: `config.name`, `_gpu` appended off the CPU."""
    return config.name + ("_gpu" if on_gpu() else "")


def config_from_json(cls, text: str):
    """Rebuilds a frozen Config from `json.dumps(dataclasses.asdict(config))` (lists back to tuples)."""
    values = json.loads(text)
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) and "tuple" in str(types.get(k)) else v
                  for k, v in values.items()})


def run(config, measure: Callable[[Any], dict[str, Any]], table: Callable[[dict[str, Any]], str]) -> int:
    """Every benchmark's `main` ends here: `measure(config)` -> result, `table(result)` -> Markdown, printed and
    written with `write_results`. Returns the exit status, 0."""
    result = measure(config)
    report = table(result)
    print()
    print(report)
    write_results(config, result, report)
    return 0


def switched_off(config, args: argparse.Namespace, flags: dict[str, str]):
    """`config` with the boolean field `flags[name]` set False for each `--name` flag given in `args`."""
    off = {field: False for flag, field in flags.items() if getattr(args, flag)}
    return dataclasses.replace(config, **off) if off else config


def write_results(config, result: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Writes `<out_dir>/<stem>.json` ({"benchmark", "created_utc", "machine", "versions", "config", **result}) and
    `<out_dir>/<stem>.md` (`markdown` followed by a machine/versions footer). Returns both paths."""
    name = stem(config)
    mach, vers = machine(), versions()
    payload = {
        "benchmark": name,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": mach,
        "versions": vers,
        "config": dataclasses.asdict(config),
        "git_at_start": _START.get("git"),
        **result,
    }
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    ram = f"{mach['ram_bytes'] / 2**30:.1f} GiB" if mach["ram_bytes"] else "unknown"
    footer = (
        f"\nMachine: {mach['cpu_model']}, {mach['cpu_cores']} cores, {ram} RAM; JAX backend {mach['backend']} "
        f"({mach['device']}). Versions: python {vers['python']}, jax {vers['jax']}, jaxlib {vers['jaxlib']}, "
        f"flax {vers['flax']}, optax {vers['optax']}, torch {vers['torch']}, peft {vers['peft']}, transformers "
        f"{vers['transformers']}; jlora at {(vers['git']['commit'] or 'unknown')[:10]}"
        + (f" with local changes to {', '.join(vers['git']['jlora_modified_files'])}"
           if vers["git"]["jlora_modified_files"] else "")
        + f". Config and every timing: `{json_path.name}`.\n"
    )
    md_path.write_text(markdown.rstrip("\n") + "\n" + footer)
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def md_table(header: list[str], rows: list[list[Any]], *, align: str | None = None) -> str:
    """A Markdown table; `align` one character per column, "l" or "r" (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- timing ---------------------------------------------------------------------------------------------------------

def progress(total: int, desc: str):
    """A tqdm bar on stderr (disabled when stderr is not a terminal: logs stay clean)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", leave=False, disable=None, file=sys.stderr)


MIN_LOAD_RUN_S = 0.2  # shorter runs get no `other load` figure (/proc/stat counts in 10 ms ticks)


def machine_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat: user, nice, system, irq, softirq, steal)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def interleaved(runs: dict[str, Callable[[], Any]], *, warmup: int, repeats: int, desc: str,
                others: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds of each `runs[name]()` (which must block until its work is done), `repeats` times each.

    Round k runs every contender once, in the given order on even rounds and reversed on odd ones (A B C, C B A,
    ...), so a slow drift of a shared machine hits all contenders alike; `warmup` untimed rounds come first (the
    first call compiles). Returns {name: [seconds of each timed run]}. With `others`, also fills
    `others[name]` with the CPU cores that OTHER processes kept busy during each timed run (machine-wide busy CPU
    time from /proc/stat minus this process's own, over the run's wall time): ~0 on a quiet machine; None for
    runs under `MIN_LOAD_RUN_S`, which /proc/stat's 10 ms ticks cannot resolve."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    if others is not None:
        others.update({n: [] for n in names})
    with progress((warmup + repeats) * len(names), desc) as bar:
        for k in range(warmup + repeats):
            for name in names if k % 2 == 0 else reversed(names):
                bar.set_postfix_str(name)
                busy, own = machine_busy_s(), time.process_time()
                start = time.perf_counter()
                runs[name]()
                elapsed = time.perf_counter() - start
                own, busy = time.process_time() - own, (machine_busy_s() or 0.0) - (busy or 0.0)
                if k >= warmup:
                    times[name].append(elapsed)
                    if others is not None:
                        others[name].append(max(busy - own, 0.0) / elapsed if elapsed >= MIN_LOAD_RUN_S else None)
                bar.update()
    return times


def summary(times: list[float], others: list[float | None] | None = None) -> dict[str, Any]:
    """{"median_s", "min_s", "max_s", "n", "times_s"} of a list of seconds; with `others` (from `interleaved`),
    also "other_cores" (per run) and "other_cores_median" (None when no run was long enough to tell)."""
    out = {"median_s": float(np.median(times)), "min_s": float(min(times)), "max_s": float(max(times)),
           "n": len(times), "times_s": [float(t) for t in times]}
    if others is not None:
        known = [x for x in others if x is not None]
        out.update(other_cores=[None if x is None else round(float(x), 3) for x in others],
                   other_cores_median=float(np.median(known)) if known else None)
    return out


def cores(x: float | None) -> str:
    """An `other load` figure: '1.01', or 'n/a' where runs were too short to tell."""
    return "n/a" if x is None else f"{x:.2f}"


def block(tree):
    """`jax.block_until_ready` for a pytree; returns it."""
    return jax.block_until_ready(tree)


def bf16_check(*, m: int = 1024, k: int = 768, n: int = 3072, repeats: int = 7) -> dict[str, Any]:
    """Whether bf16 can be faster than f32 here: the CPU's flags and an (m, k) @ (k, n) matmul timed in both dtypes
    (interleaved, median). The default shape is GPT-2 small's c_fc at 8 x 128 tokens."""
    mats = {}
    for dtype in ("float32", "bfloat16"):
        a = jax.random.normal(jax.random.key(0), (m, k), dtype)
        b = jax.random.normal(jax.random.key(1), (k, n), dtype)
        mats[dtype] = (jax.jit(jnp.matmul), a, b)
    runs = {d: (lambda f=f, a=a, b=b: block(f(a, b))) for d, (f, a, b) in mats.items()}
    times = interleaved(runs, warmup=2, repeats=repeats, desc="bf16 vs f32 matmul")
    f32, bf16 = (float(np.median(times[d])) for d in ("float32", "bfloat16"))
    return {"cpu_flags": cpu_flags(), "backend": jax.default_backend(), "shape": [m, k, n],
            "float32_s": f32, "bfloat16_s": bf16, "bfloat16_over_float32": bf16 / f32,
            "float32_gflops": 2 * m * k * n / f32 / 1e9, "bfloat16_gflops": 2 * m * k * n / bf16 / 1e9,
            "bfloat16_faster": bf16 < f32}


# --- memory ---------------------------------------------------------------------------------------------------------

def rss_bytes() -> int | None:
    """This process's resident set size now (VmRSS)."""
    return _proc_bytes("/proc/self/status", "VmRSS")


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far (VmHWM)."""
    return _proc_bytes("/proc/self/status", "VmHWM")


def child_result(result: dict[str, Any]) -> None:
    """Prints a child process's result for `run_child` to read."""
    print(CHILD_MARK + json.dumps(result, default=_jsonable), flush=True)


def run_child(module: str, args: list[str], *, timeout: float = 900,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs `python -m module *args` in a fresh process from the repository root, with this process's environment
    updated by `env` (for the child only), and returns the dict it printed with `child_result`. Raises RuntimeError
    with the child's stderr tail when it fails."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"child `python -m {module} {' '.join(args)}` failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(CHILD_MARK):])


# --- XLA compilation ------------------------------------------------------------------------------------------------

def compile_timed(fn: Callable, args, *, donate_argnums=()) -> tuple[Any, dict[str, float]]:
    """`jax.jit(fn).trace(*args).lower().compile()`, timed by stage. Returns (compiled, {"trace_s", "lower_s",
    "compile_s", "total_s"}): trace_s is tracing to a jaxpr (for jlora that includes tracing the model a second
    time inside `lora.apply`), lower_s the StableHLO lowering, compile_s XLA's compilation."""
    t0 = time.perf_counter()
    traced = jax.jit(fn, donate_argnums=donate_argnums).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    return compiled, {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0}


def xla_cost(compiled) -> dict[str, Any]:
    """XLA's FLOP count (cost_analysis) and buffer sizes (memory_analysis) of a compiled function; `total_bytes` =
    argument + output + temp (as the spec asks; `alias_bytes` are outputs that reuse donated arguments)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        flops = float(sum(c.get("flops", 0.0) for c in cost if c))
    else:
        flops = float(cost.get("flops", 0.0))
    mem = compiled.memory_analysis()
    out = {"flops": flops}
    if mem is not None:
        out.update(argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                   temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes))
        out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    return out


# --- the model, LoRA configs, loss, train steps ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Shape:
    """The model fields every benchmark Config shares (each Config subclasses this); the defaults are GPT-2 small:
    124,439,808 parameters."""

    n_layer: int = 12  # GPT-2 small: 12 blocks
    n_embd: int = 768  # 12 heads * 64
    n_head: int = 12
    vocab_size: int = 50257  # GPT-2's BPE; the tied lm head is about a third of the forward FLOPs at seq 128
    n_positions: int = 1024  # GPT-2 small's position table; only its (full fine-tuning) adamw update grows with it


TINY_SHAPE = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=97)  # the quick modes' model (n_positions their own)


def gpt2(config, *, dtype=jnp.float32) -> GPT2LMHeadModel:
    """`jlora.models.gpt2.GPT2LMHeadModel` of the shape in `config` (a `GPT2Shape`, or any object with its fields),
    dropout off, computing in `dtype`."""
    shape = GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
                       n_layer=config.n_layer, n_head=config.n_head)
    return GPT2LMHeadModel(shape, dtype=jnp.dtype(dtype))


def tokens(key, batch: int, seq: int, vocab_size: int) -> jax.Array:
    """Random token ids, int32 (batch, seq)."""
    return jax.random.randint(key, (batch, seq), 0, vocab_size, jnp.int32)


def next_token_loss(logits, tokens):
    """Mean cross entropy of predicting `tokens[:, 1:]` from `logits[:, :-1]`; logits (batch, t, vocab)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def lora_config(kind: str, *, rank: int, alpha: float, targets: tuple[str, ...] = DENSE_TARGETS) -> jlora.LoraConfig:
    """GPT-2's two LoRA settings: "qv" (loralib's MergedLinear on c_attn, q and v slices) or "all" (`targets`)."""
    if kind == "qv":
        return jlora.LoraConfig(rank=rank, alpha=alpha, targets=("c_attn",), fused={"c_attn": (True, False, True)})
    if kind == "all":
        return jlora.LoraConfig(rank=rank, alpha=alpha, targets=targets)
    raise ValueError(f"LoRA kind {kind!r} is not one of {LORA_KINDS}")


def dense_kernels(variables, names: tuple[str, ...] = DENSE_TARGETS) -> dict[str, tuple[int, ...]]:
    """`{path: shape}` of every kernel of a module named in `names` ('/'-joined paths)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        if len(keys) >= 2 and keys[-1] == "kernel" and keys[-2] in names:
            out["/".join(keys)] = tuple(leaf.shape)
    return out


def count(tree) -> int:
    """Number of array elements in a pytree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def nbytes(tree) -> int:
    """Bytes of the arrays in a pytree."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def perturb_adapters(adapters, key, *, std: float = 0.01):
    """`adapters` with every `lora_b` replaced by N(0, std) noise (a freshly initialised B is 0, which would make
    merged weights equal the base)."""
    flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
    keys = iter(jax.random.split(key, len(flat)))

    def new(path, x):
        k = next(keys)
        if str(getattr(path[-1], "key", "")) == "lora_b":
            return (std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(new, adapters)


def train_steps(model, lora: jlora.LoraTransform, optimizer: optax.GradientTransformation) -> dict[str, Callable]:
    """The three un-jitted train steps, each `value_and_grad` of `next_token_loss` then `optimizer`:

      full(variables, state, tokens)          grad w.r.t. every parameter, optimizer on all;
      jlora(frozen, adapters, state, tokens)  grad w.r.t. the adapters through `lora.apply` (factored: no dW);
      merge(frozen, adapters, state, tokens)  grad w.r.t. the adapters through
                                              `model.apply(jlora.merge(frozen, adapters, cfg))` (forms dW).
    Each returns (new trained tree, new optimizer state, loss); `DONATE[name]` are its trained-tree and state
    argument positions."""

    def update(tree, grads, state):
        updates, state = optimizer.update(grads, state, tree)
        return optax.apply_updates(tree, updates), state

    def full(variables, state, tokens):
        loss, grads = jax.value_and_grad(lambda v: next_token_loss(model.apply(v, tokens), tokens))(variables)
        return *update(variables, grads, state), loss

    def factored(frozen, adapters, state, tokens):
        loss, grads = jax.value_and_grad(lambda a: next_token_loss(lora.apply(frozen, a, tokens), tokens))(adapters)
        return *update(adapters, grads, state), loss

    def merged(frozen, adapters, state, tokens):
        def loss_fn(a):
            return next_token_loss(model.apply(jlora.merge(frozen, a, lora.config), tokens), tokens)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        return *update(adapters, grads, state), loss

    return {"full": full, "jlora": factored, "merge": merged}


def size(n: float | None) -> str:
    """Bytes in decimal units, three significant digits ('n/a' for None): '1.49 GB', '45.1 kB'."""
    return "n/a" if n is None else _si(n, "B")


def flops(n: float | None) -> str:
    """A FLOP count in decimal units: '777 G', '12.3 M'."""
    return "n/a" if n is None else _si(n, "")


def _si(n: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def secs(x: float) -> str:
    """Seconds with four significant digits."""
    return f"{x:.4g}"


def gpt2_label(config) -> str:
    """'GPT-2 small' for GPT-2 small's shape, else the shape."""
    small = (config.n_layer, config.n_embd, config.n_head, config.vocab_size) == (12, 768, 12, 50257)
    if small:
        return "GPT-2 small"
    return f"GPT-2 shape {config.n_layer} layers, d {config.n_embd}, vocab {config.vocab_size}"


def ratio(x: float | None, base: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or not base else f"{x / base:.{digits}f}"

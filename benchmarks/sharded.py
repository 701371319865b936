"""Per-device memory and collective traffic of a LoRA train step vs full fine-tuning on an 8-device mesh: data
parallel, FSDP and tensor parallel, against one device. Deterministic figures read from XLA; nothing executes.

    python -m benchmarks.sharded            # GPT-2 small, batch 32 (1-4 min of XLA compilation on 2 cores)
    python -m benchmarks.sharded --quick    # a 2-layer, d 64 model in seconds; sharded_quick.{json,md}

writes results/sharded.json and results/sharded.md (`_gpu` appended on an accelerator, where it runs in bfloat16 at a
bigger batch and needs 8 devices). On the CPU with fewer than 8 devices it re-runs itself in a child process with
XLA_FLAGS=--xla_force_host_platform_device_count=8. The model is `jlora.models.gpt2.GPT2LMHeadModel` (GPT-2 small,
124M parameters), seq 128, described by `jax.ShapeDtypeStruct`s only (`jax.eval_shape` of its init and of
`lora.init`): no weight is allocated. LoRA r=8, alpha 16 on every dense kernel (`common.lora_config("all")`, 0.95 %
of the model). The `jlora` and `full` steps of `common.train_steps` (AdamW; trained tree and state donated) under:
  unsharded    one device;
  dp           mesh ("data": 8): the batch split over 8, every weight replicated;
  fsdp         mesh ("data": 8): the batch split, every weight split on its embed axis (partitioning preset "fsdp"),
               XLA's SPMD partitioner left to choose how each product is computed (the targets are read here);
  fsdp_gather  the same, and the step constrains each weight to replicated where the model reads it
               (`with_sharding_constraint`): ZeRO-3's all-gather at use made explicit (for comparison, no target);
  tp           mesh ("model": 8): rules `{**partitioning.TP, "vocab": None}` (50,257 does not divide by 8), the
               batch replicated.
Adapters get `jlora.adapter_shardings` of the sharded weights, AdamW's moments their parameter's sharding
(`optax.tree_map_params`), the step count and the loss are replicated. Each step is jitted with those shardings in
and out and compiled; per device: `memory_analysis()` (argument, output, temp; the compared figure is argument +
output + temp, as `common.xla_cost`) and the bytes moved by the collectives of the HLO (`benchmarks.hlo`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from benchmarks import common, hlo
from benchmarks.sharded_report import ratios, table
from jlora.models import partitioning
from jlora.paths import named_leaves

LAYOUTS = ("unsharded", "dp", "fsdp", "fsdp_gather", "tp")
STEPS = ("jlora", "full")
TARGETS = {  # name: (what, limit); each a ratio that must be <= limit
    "dp_collectives": ("DP: LoRA collective bytes / full fine-tuning's", 0.02),
    "fsdp_collectives": ("FSDP: LoRA collective bytes / full fine-tuning's", 0.70),
    "fsdp_memory": ("FSDP: LoRA per-device arg+out+temp / the unsharded LoRA step's", 0.20),
}
CHILD_TIMEOUT_S = 3600  # the child process compiling everything (10 GPT-2 small steps: 2-4 min on 2 cores)
TOP = 6  # the largest collectives recorded per compiled step


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(common.GPT2Shape):
    """GPT-2 small, one batch shape, the LoRA setting and the mesh."""

    seq: int = 128  # 32 * 128 = 4,096 tokens/step
    batch: int = 32  # split over the mesh under dp and fsdp: a multiple of `devices`
    devices: int = 8  # the mesh's size (simulated CPU devices on the CPU)
    lora: str = "all"  # `common.lora_config` kind: every dense kernel (train_step's "all"), 0.95 % of GPT-2 small
    rank: int = 8  # the LoRA paper's r
    alpha: float = 16.0  # scale alpha / r = 2
    learning_rate: float = 1e-4  # adamw; the compiled program does not depend on it
    dtype: str = "float32"  # computation dtype (parameters, adapters and moments stay float32); "bfloat16" on a GPU
    layouts: tuple[str, ...] = LAYOUTS
    gpu_batch: int = 128  # on an accelerator: a bigger batch keeps the devices busy
    out_dir: str = "results"
    name: str = "sharded"

    def __post_init__(self):
        unknown = [x for x in self.layouts if x not in LAYOUTS]
        if unknown:
            raise ValueError(f"Config.layouts {unknown} are not among {LAYOUTS}")
        if self.batch % self.devices:
            raise ValueError(f"Config.batch {self.batch} must be a multiple of Config.devices {self.devices} "
                             f"(dp and fsdp split the batch over the mesh)")

    def for_gpu(self) -> Config:
        return dataclasses.replace(self, dtype="bfloat16", batch=self.gpu_batch)


QUICK = Config(**common.TINY_SHAPE, n_positions=16, seq=16, batch=8, gpu_batch=16, name="sharded_quick")


# --- the abstract model, layouts and shardings ----------------------------------------------------------------------

def abstract(config: Config) -> dict[str, Any]:
    """The model, LoRA transform and optimizer, and ShapeDtypeStructs (no shardings yet) of the tokens, the
    variables and lora.init's (frozen, adapters)."""
    model = common.gpt2(config, dtype=config.dtype)
    tokens = jax.ShapeDtypeStruct((config.batch, config.seq), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    lora = jlora.lora_transform(model.apply, common.lora_config(config.lora, rank=config.rank, alpha=config.alpha),
                                strict=True)
    frozen, adapters = jax.eval_shape(lambda v: lora.init(v, tokens, key=jax.random.key(1)), variables)
    tx = optax.adamw(config.learning_rate)
    return {"model": model, "lora": lora, "tx": tx, "tokens": tokens, "variables": variables, "frozen": frozen,
            "adapters": adapters}


def mesh_for(layout: str, devices: int) -> Mesh:
    """A 1-device mesh ("data") for unsharded, ("model": devices) for tp, else ("data": devices)."""
    n = 1 if layout == "unsharded" else devices
    return Mesh(np.array(jax.devices()[:n]), ("model",) if layout == "tp" else ("data",))


def weight_shardings(variables, layout: str, mesh: Mesh):
    """A tree like `variables` of each weight's NamedSharding under `layout`."""
    if layout in ("unsharded", "dp"):
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), variables)
    rules = {**partitioning.TP, "vocab": None} if layout == "tp" else "fsdp"
    return partitioning.shardings(variables, mesh, rules, architecture="gpt2")


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (None leaves stay None)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def like_weights(tree, variables, weight_sh):
    """Shardings for `tree` (lora.init's `frozen`: `variables` with some leaves None) looked up by path."""
    by_path = dict(zip([p for p, _ in named_leaves(variables)], jax.tree.leaves(weight_sh)))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree),
                                        [by_path[p] for p, _ in named_leaves(tree)])


def state_shardings(tx, params, params_sh, mesh: Mesh):
    """The optimizer state's shardings: each moment its parameter's (optax.tree_map_params), the rest (the step
    count) replicated."""
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), params_sh,
                                 transform_non_params=lambda _: replicated, is_leaf=lambda x: x is None)


def step_functions(setup: dict[str, Any], layout: str, mesh: Mesh) -> dict[str, Any]:
    """`common.train_steps`' jlora and full steps; for fsdp_gather over a model (and LoRA transform) whose weights
    first pass through `with_sharding_constraint(w, replicated)`: each weight all-gathered at use."""
    model, lora = setup["model"], setup["lora"]
    if layout == "fsdp_gather":
        replicated = NamedSharding(mesh, P())

        def gather(tree):
            return jax.tree.map(lambda w: jax.lax.with_sharding_constraint(w, replicated), tree)

        model = types.SimpleNamespace(apply=lambda v, *a: setup["model"].apply(gather(v), *a))
        lora = types.SimpleNamespace(config=lora.config, apply=lambda f, ad, *a: setup["lora"].apply(gather(f), ad, *a))
    steps = common.train_steps(model, lora, setup["tx"])
    return {name: steps[name] for name in STEPS}


def arguments(setup: dict[str, Any], layout: str, mesh: Mesh) -> dict[str, tuple[list, tuple]]:
    """{step: (abstract sharded arguments, out_shardings)} for the jlora and full steps under `layout`."""
    variables, frozen, adapters, tx = setup["variables"], setup["frozen"], setup["adapters"], setup["tx"]
    weight_sh = weight_shardings(variables, layout, mesh)
    variables_s = with_shardings(variables, weight_sh)
    frozen_s = with_shardings(frozen, like_weights(frozen, variables, weight_sh))
    adapter_sh = jlora.adapter_shardings(variables_s, adapters, config=setup["lora"].config)
    batch = P() if layout == "tp" else P("data", None)
    tokens = jax.ShapeDtypeStruct(setup["tokens"].shape, setup["tokens"].dtype, sharding=NamedSharding(mesh, batch))
    replicated = NamedSharding(mesh, P())
    out = {}
    lora_state_sh = state_shardings(tx, adapters, adapter_sh, mesh)
    lora_state = with_shardings(jax.eval_shape(tx.init, adapters), lora_state_sh)
    out["jlora"] = ([frozen_s, with_shardings(adapters, adapter_sh), lora_state, tokens],
                    (adapter_sh, lora_state_sh, replicated))
    full_state_sh = state_shardings(tx, variables, weight_sh, mesh)
    full_state = with_shardings(jax.eval_shape(tx.init, variables), full_state_sh)
    out["full"] = ([variables_s, full_state, tokens], (weight_sh, full_state_sh, replicated))
    return out


# --- measurement ----------------------------------------------------------------------------------------------------

def compile_step(fn, args: list, out_shardings, donate: tuple[int, ...]) -> tuple[Any, float]:
    """jit(fn) with the arguments' shardings in and `out_shardings` out, traced, lowered and compiled against the
    abstract `args` (nothing runs); (compiled, seconds)."""
    start = time.perf_counter()
    compiled = jax.jit(fn, out_shardings=out_shardings, donate_argnums=donate).trace(*args).lower().compile()
    return compiled, time.perf_counter() - start


def figures(compiled) -> dict[str, Any]:
    """Per-device buffer sizes, FLOPs and collective bytes of a compiled step, and its largest collectives."""
    mem = hlo.memory(compiled)
    memory = {k: mem[k] for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes")}
    memory["arg_out_temp_bytes"] = mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"]
    memory["arg_temp_bytes"] = mem["argument_bytes"] + mem["temp_bytes"]
    memory["arg_out_temp_minus_alias_bytes"] = memory["arg_out_temp_bytes"] - mem["alias_bytes"]
    ops = hlo.collectives(compiled)
    rows = [{"kind": op.kind, "shapes": [list(x) for x in op.shapes], "dtypes": list(op.dtypes), "bytes": op.bytes,
             "count": op.count, "total_bytes": op.total_bytes} for op in sorted(ops, key=lambda op: -op.total_bytes)]
    return {"memory": memory, "flops": common.xla_cost(compiled)["flops"],
            "collective_bytes": hlo.collective_bytes(ops),
            "collective_ops": len(ops), "collective_counts": {k: sum(op.kind == k for op in ops) for k in hlo.KINDS},
            "all_exact": all(op.exact for op in ops), "largest_collectives": rows[:TOP]}


def measure(config: Config) -> dict[str, Any]:
    """Every layout's two compiled steps (in this process, which must have `config.devices` devices)."""
    if jax.device_count() < config.devices:
        raise RuntimeError(f"benchmarks.sharded needs {config.devices} devices, JAX has {jax.device_count()}")
    setup = abstract(config)
    result: dict[str, Any] = {"backend": jax.default_backend(), "devices": config.devices,
                              "params": common.count(setup["variables"]), "adapter_params": common.count(
                                  setup["adapters"]), "loadavg_start": common.loadavg(), "layouts": {}}
    for layout in config.layouts:
        mesh = mesh_for(layout, config.devices)
        result["layouts"][layout] = {"mesh": dict(mesh.shape)}
        steps = step_functions(setup, layout, mesh)
        for step, (args, out_sh) in arguments(setup, layout, mesh).items():
            compiled, seconds = compile_step(steps[step], args, out_sh, common.DONATE[step])
            row = {"compile_s": seconds, **figures(compiled)}
            result["layouts"][layout][step] = row
            print(f"{layout} {step}: compiled in {seconds:.1f} s, arg+out+temp "
                  f"{common.size(row['memory']['arg_out_temp_bytes'])}, collectives "
                  f"{common.size(row['collective_bytes']['total'])}", file=sys.stderr, flush=True)
            del compiled
    result["targets"] = ratios(result, "fsdp", TARGETS)
    gather = ratios(result, "fsdp_gather", TARGETS)  # the FSDP ratios of fsdp_gather, for comparison: no target
    result["fsdp_gather"] = {k: v for k, v in gather.items() if k.startswith("fsdp")}
    result["loadavg_end"] = common.loadavg()
    return result


# --- the child process ----------------------------------------------------------------------------------------------

def _device_flags(n: int) -> str:
    """XLA_FLAGS as now, with --xla_force_host_platform_device_count=n (replacing any other count)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def measure_anywhere(config: Config) -> dict[str, Any]:
    """`measure(config)` here when JAX has `config.devices` devices; on a CPU with fewer, in a child process with
    that many simulated CPU devices (XLA_FLAGS set for the child only)."""
    have = jax.device_count()
    if have >= config.devices:
        return measure(config)
    if jax.default_backend() != "cpu":
        raise RuntimeError(f"benchmarks.sharded needs {config.devices} devices and this {jax.default_backend()} "
                           f"machine has {have}: run it where there are {config.devices}, or with JAX_PLATFORMS=cpu "
                           f"on {config.devices} simulated CPU devices")
    print(f"{have} CPU device(s): measuring in a child process with {config.devices} simulated devices",
          file=sys.stderr, flush=True)
    return common.run_child("benchmarks.sharded", ["--child", json.dumps(dataclasses.asdict(config))],
                            timeout=CHILD_TIMEOUT_S,
                            env={"XLA_FLAGS": _device_flags(config.devices), "JAX_PLATFORMS": "cpu"})


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--child", help=argparse.SUPPRESS)  # a Config as JSON: measure it here, print the result
    args = p.parse_args(argv)
    if args.child:
        common.child_result(measure(common.config_from_json(Config, args.child)))
        return 0
    config = common.choose(args, Config(), QUICK)
    return common.run(config, measure_anywhere, lambda result: table(config, result))


if __name__ == "__main__":
    sys.exit(main())

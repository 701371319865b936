"""Host memory of `jlora.models.from_pretrained`: peak RSS loading onto one device vs 8-way sharded (FSDP, TP), each
safetensors tensor read by slices (`jlora.models.shards`).

    python -m benchmarks.loading            # SmolLM2-135M, about 1 min on 2 cores
    python -m benchmarks.loading --quick    # a tiny random Llama in seconds; loading_quick.{json,md}

writes results/loading.json and results/loading.md. The model: SmolLM2-135M-Instruct, whose only registry copy is
the `smollm2` asset's Q4_1 GGUF: it is dequantized once and written as a Hugging Face directory (config.json and one
bfloat16 model.safetensors, tied embeddings: the layout of the hub's SmolLM2-135M) in a temporary folder. Each
measurement runs in a fresh process (`common.run_child`) with 8 simulated CPU devices
(`--xla_force_host_platform_device_count=8`) and reports, from /proc/self/status: VmRSS before loading (after
importing jax and jlora), the peak VmHWM, and VmRSS after (the arrays alive); and, from the arrays, the model's bytes
and the bytes on the fullest device.

On simulated CPU devices every device's buffers live in this one process: a sharded model still occupies the whole
model's bytes of host memory (more by the replicated leaves, one copy per device). The RSS comparison therefore
shows what the loader itself costs on top of the arrays it returns (the transient: peak minus after), not the
per-host saving of a real multi-host mesh, where each host holds only its own devices' shards; the per-device bytes
show what one accelerator would hold.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks import common

LAYOUTS = {"unsharded": None, "fsdp": "data", "tp": "model"}  # layout: the 1-D mesh axis its preset uses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The checkpoint, the load dtypes and the layouts."""

    model: str = "smollm2"  # "smollm2" (the asset's GGUF, converted) or "tiny" (a random 2-layer Llama)
    file_dtype: str = "bfloat16"  # of the converted safetensors (the hub's SmolLM2-135M is bfloat16)
    load_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    devices: int = 8
    out_dir: str = "results"
    name: str = "loading"

    def for_gpu(self) -> Config:
        return self  # host memory on simulated CPU devices; the children force the CPU platform


QUICK = Config(model="tiny", load_dtypes=("float32",), name="loading_quick")
TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=True)


def write_checkpoint(config: Config, directory: Path) -> dict[str, Any]:
    """Writes config.json and model.safetensors (in `config.file_dtype`) into `directory`; returns what it wrote."""
    from safetensors.numpy import save_file

    from jlora.models import llama

    if config.model == "smollm2":
        from jlora import assets
        from jlora.models.gguf import read_gguf

        gguf = assets.fetch("smollm2", progress=False)
        hf_config, tensors, _ = read_gguf(gguf)
        source = f"{gguf.name} (the smollm2 asset), dequantized to float32 by jlora.models.gguf.read_gguf"
    elif config.model == "tiny":
        hf_config = TINY
        variables = llama.Llama(llama.LlamaConfig.from_hf(TINY)).init(jax.random.key(0), np.zeros((1, 1), np.int32))
        from jlora.models.hf import default_key
        from jlora.paths import named_leaves

        tensors = {default_key(p): np.asarray(x).T if p.endswith("/kernel") else np.asarray(x)
                   for p, x in named_leaves(variables)}
        source = "a random Llama (benchmarks.loading.TINY)"
    else:
        raise ValueError(f"Config.model={config.model!r} is not 'smollm2' or 'tiny'")
    dtype = np.dtype(jax.numpy.dtype(config.file_dtype))
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config))
    del tensors
    return {"source": source, "tensors": len(_names(directory)),
            "file_bytes": (directory / "model.safetensors").stat().st_size, "hf_config": hf_config}


def _names(directory: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", framework="numpy") as f:
        return list(f.keys())


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One load in this fresh process (started by `measure` with XLA_FLAGS asking for `spec["devices"]` CPU
    devices): `spec` {"dir", "dtype", "layout", "devices"}."""
    from jax.sharding import AxisType, Mesh

    from jlora import models

    devices = jax.devices()
    if len(devices) != spec["devices"]:
        raise RuntimeError(f"expected {spec['devices']} devices, JAX has {len(devices)}")
    axis = LAYOUTS[spec["layout"]]
    mesh = None if axis is None else Mesh(np.array(devices), (axis,), axis_types=(AxisType.Auto,))
    before, peak_before = common.rss_bytes(), common.peak_rss_bytes()
    start = time.perf_counter()
    _, variables = models.from_pretrained(spec["dir"], dtype=jax.numpy.dtype(spec["dtype"]), mesh=mesh,
                                          rules=None if axis is None else spec["layout"])
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    peak, after = common.peak_rss_bytes(), common.rss_bytes()
    per_device = {d.id: 0 for d in devices}
    for leaf in jax.tree.leaves(variables):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] += shard.data.nbytes
    return {"layout": spec["layout"], "dtype": spec["dtype"], "devices": len(devices), "seconds": seconds,
            "rss_before": before, "peak_before": peak_before, "peak": peak, "rss_after": after,
            "model_bytes": sum(int(x.nbytes) for x in jax.tree.leaves(variables)),
            "device_bytes_max": max(per_device.values()), "device_bytes_total": sum(per_device.values()),
            "devices_used": sum(1 for v in per_device.values() if v)}


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """`child(spec)` in a fresh process with 8 simulated CPU devices (XLA_FLAGS and JAX_PLATFORMS set for the child
    only)."""
    return common.run_child("benchmarks.loading", ["--child", json.dumps(spec)],
                            env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={spec['devices']}",
                                 "JAX_PLATFORMS": "cpu"})


def measure(config: Config) -> dict[str, Any]:
    unknown = [x for x in config.layouts if x not in LAYOUTS]
    if unknown:
        raise ValueError(f"Config.layouts {unknown} are not among {list(LAYOUTS)}")
    result: dict[str, Any] = {"loadavg_start": common.loadavg(), "rows": []}
    with tempfile.TemporaryDirectory(prefix="jlora-loading-bench-") as tmp:
        directory = Path(tmp) / config.model
        result["checkpoint"] = write_checkpoint(config, directory)
        for dtype in config.load_dtypes:
            for layout in config.layouts:
                spec = {"dir": str(directory), "dtype": dtype, "layout": layout, "devices": config.devices}
                row = _run_child(spec)
                for key in ("peak", "rss_after"):
                    row[f"{key}_over_before"] = row[key] - row["rss_before"]
                row["overhead"] = row["peak_over_before"] - row["model_bytes"]  # beyond the arrays
                result["rows"].append(row)
                print(f"{dtype} {layout}: peak {common.size(row['peak'])}, load peak over before "
                      f"{common.size(row['peak_over_before'])}", file=sys.stderr)
    result["loadavg_end"] = common.loadavg()
    return result


def table(config: Config, result: dict[str, Any]) -> str:
    ckpt = result["checkpoint"]
    label = "SmolLM2-135M-Instruct" if config.model == "smollm2" else "a tiny random Llama"
    lines = [f"# Host memory of loading {label}: one device vs {config.devices}-way sharded", "",
             f"Checkpoint: {ckpt['source']}, written as one {config.file_dtype} model.safetensors "
             f"({common.size(ckpt['file_bytes'])}, {ckpt['tensors']} tensors). Each row is a fresh process with "
             f"{config.devices} simulated CPU devices; `before` is VmRSS after importing jax and jlora, `peak` VmHWM, "
             f"`after` VmRSS with the loaded arrays alive. fsdp: mesh ('data': {config.devices}), rules 'fsdp'; "
             f"tp: mesh ('model': {config.devices}), rules 'tp'; unsharded: no mesh (device 0).", ""]
    rows = []
    base = {r["dtype"]: r for r in result["rows"] if r["layout"] == "unsharded"}
    for r in result["rows"]:
        ref = base.get(r["dtype"])
        rows.append([r["dtype"], r["layout"], common.size(r["model_bytes"]), common.size(r["device_bytes_max"]),
                     common.size(r["rss_before"]), common.size(r["peak"]), common.size(r["peak_over_before"]),
                     common.ratio(r["peak_over_before"], ref and ref["peak_over_before"]),
                     common.size(r["overhead"]), common.ratio(r["overhead"], ref and ref["overhead"]),
                     common.secs(r["seconds"])])
    lines.append(common.md_table(["dtype", "layout", "model", "fullest device", "RSS before", "peak RSS",
                                  "peak - before", "/ unsharded", "loader overhead", "/ unsharded", "load (s)"],
                                 rows, align="llrrrrrrrrr"))
    lines += ["", "- `loader overhead` = `peak - before` minus the model's bytes: what loading needs on top of the "
              "arrays it returns. Unsharded, the whole file is read (a copy of every tensor, and the memory-mapped "
              "file pages while they are read) and stays alive while the converted (transposed, cast) arrays are "
              "made; sharded, each tensor is read slice by slice, one tensor at a time, and the file is mapped only "
              "for the length of one slice. Part of it is a fixed cost of a first load in a process (importing "
              "safetensors, tracing the model's shapes, compiling the casts): the --quick run's tiny model, whose "
              "arrays weigh kilobytes, shows its size.",
              "- On simulated CPU devices every shard lives in this one process, so the sharded process still "
              "holds the whole model (the replicated leaves, the norms, once per device). On a real multi-host "
              "mesh each host would hold only its own devices' shards and each accelerator the `fullest device` "
              "figure, which one process cannot show. VmRSS after loading is not the arrays' size either: memory "
              "freed while loading stays with the allocator (it is in the .json, `rss_after`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        common.child_result(child(json.loads(sys.argv[2])))
        return 0
    args = common.parser(__doc__).parse_args(argv)
    config = common.choose(args, Config(), QUICK)
    return common.run(config, measure, lambda result: table(config, result))


if __name__ == "__main__":
    sys.exit(main())

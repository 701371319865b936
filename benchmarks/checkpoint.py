"""Adapter checkpoints: bytes on disk vs the model's, and save / restore time of `jlora.save_adapters` /
`jlora.load_adapters` against a full-model orbax checkpoint.

    python -m benchmarks.checkpoint            # GPT-2 small and MiniLM (about 1 min on 2 cores)
    python -m benchmarks.checkpoint --quick    # a 2-layer, d 64 GPT-2 in seconds; checkpoint_quick.{json,md}

writes results/checkpoint.json and results/checkpoint.md (`_gpu` appended on a GPU). For each model and LoRA
setting (r=8, alpha 16; q,v and all dense kernels; adapters with a non-zero B):
  adapter bytes on disk   the directory `jlora.save_adapters(path, adapters, cfg, variables=frozen)` writes (orbax:
                          the adapter arrays, the config and the base's fingerprint);
  model bytes             the variables' array bytes, and the directory of an orbax StandardSave of all of them;
  save / restore          seconds of `save_adapters` (a fresh path each time) and of `load_adapters(path,
                          variables=frozen)` (which checks the fingerprint), and of the full-model orbax save and
                          restore; interleaved, after a warm-up round, median of the timed rounds.
Models: GPT-2 small (`jlora.models.gpt2`, random weights) and all-MiniLM-L6-v2 (`jlora.assets.fetch("minilm")`,
BertForSequenceClassification with a new 2-label head; LoRA on query,value and on every dense kernel).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jlora
from benchmarks import common

MINILM_TARGETS = {"qv": ("query", "value"), "all": ("query", "key", "value", "dense")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(common.GPT2Shape):
    """GPT-2 small, the adapters, MiniLM, and how long to measure."""

    rank: int = 8
    alpha: float = 16.0
    adapter_std: float = 0.01  # lora_b ~ N(0, std^2): real-looking, incompressible values
    repeats: int = 7  # timed rounds; a round saves and restores every adapter set once and the full model once
    warmup: int = 1
    minilm: bool = True  # also all-MiniLM-L6-v2 (the `minilm` asset, 22.7M parameters)
    out_dir: str = "results"
    name: str = "checkpoint"

    def for_gpu(self) -> Config:
        return self  # checkpoints go through host memory; nothing to change


QUICK = Config(**common.TINY_SHAPE, n_positions=16, repeats=5, minilm=False,
               name="checkpoint_quick")


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class Saver:
    """Save / restore callables for one checkpoint kind; each save goes to a fresh directory under `root`."""

    def __init__(self, root: Path, label: str, save, restore):
        self.root, self.label, self._save, self._restore = root, label, save, restore
        self.count, self.last = 0, None

    def save(self):
        self.count += 1
        path = self.root / f"{self.label}-{self.count}"
        self._save(path)
        self.last = path

    def restore(self):
        return common.block(self._restore(self.last))


def model_rows(label: str, model, variables, example: tuple, configs: dict[str, jlora.LoraConfig], config: Config,
               root: Path) -> list[dict[str, Any]]:
    """Sizes and timings for one model: its full orbax checkpoint and each LoRA setting's adapters (the last row
    records whether restoring gave back the saved arrays exactly)."""
    savers, rows, saved = {}, {}, {}
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    savers["model"] = Saver(root, f"{label}-model",
                            lambda p: checkpointer.save(p, args=ocp.args.StandardSave(variables)),
                            lambda p: checkpointer.restore(p, args=ocp.args.StandardRestore(abstract)))
    rows["model"] = {"model": label, "what": "full model (orbax StandardSave)", "params": common.count(variables),
                     "array_bytes": common.nbytes(variables)}
    for i, (kind, cfg) in enumerate(configs.items()):
        lora = jlora.lora_transform(model.apply, cfg, strict=True)
        frozen, adapters = lora.init(variables, *example, key=jax.random.key(30 + i))
        adapters = common.perturb_adapters(adapters, jax.random.key(40 + i), std=config.adapter_std)
        saved[kind] = adapters
        savers[kind] = Saver(root, f"{label}-{kind}",
                             lambda p, a=adapters, c=cfg, f=frozen: jlora.save_adapters(p, a, c, variables=f),
                             lambda p, f=frozen: jlora.load_adapters(p, variables=f)[0])
        rows[kind] = {"model": label, "what": f"adapters {kind}: {', '.join(cfg.targets)}"
                      + (" (q, v slices)" if cfg.fused else ""), "params": common.count(adapters),
                      "array_bytes": common.nbytes(adapters)}
    runs = {f"save {k}": s.save for k, s in savers.items()}
    runs.update({f"restore {k}": s.restore for k, s in savers.items()})
    for s in savers.values():  # one checkpoint to restore from before the first restore round
        s.save()
    times = common.interleaved(runs, warmup=config.warmup, repeats=config.repeats, desc=f"checkpoint, {label}")
    out = []
    for k, s in savers.items():
        row = rows[k]
        row["disk_bytes"] = dir_bytes(s.last)
        row["save"] = common.summary(times[f"save {k}"])
        row["restore"] = common.summary(times[f"restore {k}"])
        out.append(row)
    model_row = out[0]
    for row in out:
        row["disk_over_model_disk"] = row["disk_bytes"] / model_row["disk_bytes"]
        row["save_over_model"] = row["save"]["median_s"] / model_row["save"]["median_s"]
        row["restore_over_model"] = row["restore"]["median_s"] / model_row["restore"]["median_s"]
    same = [bool(np.array_equal(a, b)) for k in configs
            for a, b in zip(jax.tree.leaves(savers[k].restore()), jax.tree.leaves(saved[k]))]
    out[-1]["restored_equal_saved"] = all(same)
    return out


def gpt2_rows(config: Config, root: Path) -> list[dict[str, Any]]:
    model = common.gpt2(config)
    example = common.tokens(jax.random.key(2), 1, 8, config.vocab_size)
    variables = jax.jit(model.init)(jax.random.key(0), example)
    configs = {k: common.lora_config(k, rank=config.rank, alpha=config.alpha) for k in common.LORA_KINDS}
    return model_rows("gpt2", model, variables, (example,), configs, config, root)


def minilm_rows(config: Config, root: Path) -> list[dict[str, Any]]:
    from jlora import assets, models

    model, variables = models.from_pretrained(assets.fetch("minilm", progress=False), num_labels=2,
                                              key=jax.random.key(0))
    ids, mask = jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)
    configs = {k: jlora.LoraConfig(rank=config.rank, alpha=config.alpha, targets=t) for k, t in MINILM_TARGETS.items()}
    return model_rows("minilm", model, variables, (ids, mask), configs, config, root)


def measure(config: Config) -> dict[str, Any]:
    result: dict[str, Any] = {"backend": jax.default_backend(), "loadavg_start": common.loadavg(), "rows": []}
    with tempfile.TemporaryDirectory(prefix="jlora-ckpt-bench-") as tmp:
        result["rows"] += gpt2_rows(config, Path(tmp) / "gpt2")
        shutil.rmtree(Path(tmp) / "gpt2")  # several full GPT-2 checkpoints: free the disk
        if config.minilm:
            result["rows"] += minilm_rows(config, Path(tmp) / "minilm")
    result["loadavg_end"] = common.loadavg()
    return result


def table(config: Config, result: dict[str, Any]) -> str:
    names = {"gpt2": common.gpt2_label(config), "minilm": "all-MiniLM-L6-v2"}
    lines = [f"# Adapter checkpoints: size and save/restore time ({result['backend']})", "",
             f"LoRA r={config.rank}, alpha={config.alpha:g}; arrays float32. Save and restore interleaved "
             f"(all rows of a model), {config.warmup} warm-up round, median of {config.repeats}.", ""]
    rows = []
    for r in result["rows"]:
        rows.append([names[r["model"]], r["what"], f"{r['params']:,}", common.size(r["array_bytes"]),
                     common.size(r["disk_bytes"]), f"{r['disk_over_model_disk']:.5f}",
                     common.secs(r["save"]["median_s"]), f"{r['save_over_model']:.3f}",
                     common.secs(r["restore"]["median_s"]), f"{r['restore_over_model']:.3f}"])
    lines.append(common.md_table(["model", "checkpoint", "params", "array bytes", "on disk", "disk / model",
                                  "save (s)", "/ model", "restore (s)", "/ model"], rows, align="llrrrrrrrr"))
    lines += ["", "- `on disk` includes orbax's metadata files; the adapter checkpoint also holds the LoRA config and "
              "the base model's fingerprint (the shape, dtype and a content digest of each adapted weight)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--no-minilm", action="store_true", help="skip MiniLM (needs the asset)")
    args = p.parse_args(argv)
    config = common.switched_off(common.choose(args, Config(), QUICK), args, {"no_minilm": "minilm"})
    return common.run(config, measure, lambda result: table(config, result))


if __name__ == "__main__":
    sys.exit(main())

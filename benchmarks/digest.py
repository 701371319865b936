"""The cost of the base fingerprint's content digest (`jlora.fingerprint`, checked by `load_adapters`).

    python -m benchmarks.digest            # SmolLM2-135M from its registry package (about 30 s on 2 cores)
    python -m benchmarks.digest --quick    # random Llama-shaped arrays in seconds; digest_quick.{json,md}

writes results/digest.json and results/digest.md (`_gpu` appended on a GPU). For each set of targeted weights (the
q_proj and v_proj kernels; every dense kernel) it times `jlora.fingerprint(variables, adapters)`, which digests each
weight as a sha256 of its shape, dtype and 4,096 evenly strided elements, against a full sha256 of the same weights'
bytes (what a digest of every element would cost); interleaved, after a warm-up round, median of the timed rounds
with min and max.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from typing import Any

import jax
import numpy as np

import jlora
from benchmarks import common
from jlora.paths import named_leaves, nest

SETS = {"q_proj, v_proj": ("q_proj/kernel", "v_proj/kernel"), "all dense kernels": ("kernel",)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The model and how long to measure."""

    model: str = "smollm2"  # a `jlora.assets` name or a directory; "" for random arrays of `random_shapes`
    random_shapes: tuple = ()  # ((name, (in, out)), ...) when model == ""
    repeats: int = 11  # timed rounds; a round runs every contender once
    warmup: int = 1
    out_dir: str = "results"
    name: str = "digest"

    def for_gpu(self) -> Config:
        return self  # the digest samples on the device and hashes on the host: the same measurement


QUICK = Config(model="", random_shapes=tuple((f"layers/{i}/{m}/kernel", (64, 96)) for i in range(2)
                                             for m in ("q_proj", "v_proj", "o_proj", "up_proj")),
               repeats=5, name="digest_quick")


def load(config: Config) -> Any:
    """The variables: the model's, or random float32 arrays of `config.random_shapes`."""
    if not config.model:
        keys = jax.random.split(jax.random.key(0), len(config.random_shapes))
        return nest({name: np.asarray(jax.random.normal(k, shape)) for k, (name, shape) in
                     zip(keys, config.random_shapes)})
    from jlora import assets, models

    return models.from_pretrained(assets.resolve_model(config.model, progress=False))[1]


def measure(config: Config) -> dict[str, Any]:
    variables = load(config)
    leaves = named_leaves(variables)
    result: dict[str, Any] = {"backend": jax.default_backend(), "params": common.count(variables), "rows": []}
    runs, chosen = {}, {}
    for label, suffixes in SETS.items():
        paths = [p for p, x in leaves if p.endswith(suffixes) and x.ndim == 2]
        chosen[label] = paths
        adapters = nest({f"{p}/{k}": np.zeros((1, 1), np.float32) for p in paths for k in ("lora_a", "lora_b")})
        weights = [np.asarray(x) for p, x in leaves if p in set(paths)]
        runs[f"digest {label}"] = lambda v=variables, a=adapters: jlora.fingerprint(v, a)
        runs[f"sha256 {label}"] = lambda ws=weights: [hashlib.sha256(w.tobytes()).digest() for w in ws]
    others: dict[str, list[float]] = {}
    times = common.interleaved(runs, warmup=config.warmup, repeats=config.repeats, desc="digest", others=others)
    for label, paths in chosen.items():
        nbytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for p, x in leaves if p in set(paths))
        digest, full = (common.summary(times[f"{k} {label}"], others[f"{k} {label}"]) for k in ("digest", "sha256"))
        result["rows"].append({"set": label, "weights": len(paths), "bytes": nbytes, "digest": digest,
                               "full_sha256": full, "digest_over_full": digest["median_s"] / full["median_s"]})
    return result


def table(config: Config, result: dict[str, Any]) -> str:
    model = config.model or f"random arrays {len(config.random_shapes)} x {config.random_shapes[0][1]}"
    lines = [f"# Base fingerprint: content digest cost ({result['backend']})", "",
             f"{model}, {result['params']:,} parameters. `jlora.fingerprint` (shape, dtype, sha256 of 4,096 strided "
             f"elements per weight) vs a full sha256 of the same bytes; interleaved, {config.warmup} warm-up round, "
             f"median (min-max) of {config.repeats}.", ""]
    rows = []
    for r in result["rows"]:
        d, f = r["digest"], r["full_sha256"]
        rows.append([r["set"], r["weights"], common.size(r["bytes"]),
                     f"{1e3 * d['median_s']:.2f} ({1e3 * d['min_s']:.2f}-{1e3 * d['max_s']:.2f})",
                     f"{1e3 * f['median_s']:.1f} ({1e3 * f['min_s']:.1f}-{1e3 * f['max_s']:.1f})",
                     f"{r['digest_over_full']:.3f}", common.cores(f.get("other_cores_median"))])
    lines.append(common.md_table(["weights digested", "count", "bytes", "fingerprint (ms)", "full sha256 (ms)",
                                  "ratio", "other load (cores)"], rows, align="lrrrrrr"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    config = common.choose(args, Config(), QUICK)
    return common.run(config, measure, lambda result: table(config, result))


if __name__ == "__main__":
    sys.exit(main())

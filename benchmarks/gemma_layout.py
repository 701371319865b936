"""Adapter sizes and update ranks for Gemma's einsum kernels: the layout jlora picks from each einsum's contracted
axes, against the rule before it (lora_a on every axis but the last).

    python -m benchmarks.gemma_layout            # the Gemma-shaped block N=8, K=1, D=256, H=32, F=1024, r=8 (seconds)
    python -m benchmarks.gemma_layout --quick    # smaller shapes; gemma_layout_quick.{json,md}

writes results/gemma_layout.json and results/gemma_layout.md. For each kernel it runs `lora.init` on the einsum
written as in gemma's `modules.py`, draws both factors at random (one starts at zero), merges, and reads the update's
matrix rank as a map from the contracted axes to the rest (numpy's SVD, float64); the figures are deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jlora
from benchmarks import common

# name: (einsum as gemma writes it, W's axes as letters, the axes the einsum contracts)
KERNELS = {
    "q_einsum": ("BTD,NDH->BTNH", "NDH", "D"),
    "kv_einsum": ("BSD,CKDH->CBSKH", "CKDH", "D"),
    "qkv_einsum": ("BTD,SNDH->SBTNH", "SNDH", "D"),
    "attn_vec_einsum": ("BTNH,NHD->BTD", "NHD", "NH"),
    "gating_einsum": ("BTD,GFD->BTGF", "GFD", "D"),
    "linear": ("BTF,FD->BTD", "FD", "F"),
}
BLOCK = ("q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum", "linear")  # a Gemma block without qkv


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The block's sizes (Gemma's letters) and the rank."""

    N: int = 8  # query heads
    K: int = 1  # key/value heads (kv_einsum)
    D: int = 256  # model width
    H: int = 32  # head dim
    F: int = 1024  # MLP hidden width
    rank: int = 8
    out_dir: str = "results"
    name: str = "gemma_layout"

    def for_gpu(self) -> Config:
        return self  # nothing timed: the same figures anywhere

    def sizes(self) -> dict[str, int]:
        return {"N": self.N, "K": self.K, "D": self.D, "H": self.H, "F": self.F, "C": 2, "S": 3, "G": 2,
                "B": 2, "T": 3}


QUICK = Config(N=3, K=1, D=24, H=5, F=40, rank=2, name="gemma_layout_quick")


def _rank(delta: np.ndarray, contracted: list[int]) -> int:
    rest = [i for i in range(delta.ndim) if i not in contracted]
    m = delta.transpose(contracted + rest).reshape(math.prod(delta.shape[i] for i in contracted), -1)
    s = np.linalg.svd(m, compute_uv=False)
    return int(np.sum(s > 1e-6 * s[0]))


def measure(config: Config) -> dict[str, Any]:
    size, r = config.sizes(), config.rank
    rows = []
    for name, (eq, axes, contracted) in tqdm(KERNELS.items(), desc="kernels", leave=False, disable=None):
        shape = tuple(size[c] for c in axes)
        c_idx = [axes.index(c) for c in contracted]
        x = jnp.ones(tuple(size[c] for c in eq.split(",")[0]))
        w = {name: jax.random.normal(jax.random.key(0), shape)}
        lora_cfg = jlora.LoraConfig(rank=r, alpha=2 * r, targets=(name,))
        lora = jlora.lora_transform(lambda p, x, eq=eq, name=name: jnp.einsum(eq, x, p[name]), lora_cfg)
        frozen, adapters = lora.init(w, x, key=jax.random.key(1))
        keys = jax.random.split(jax.random.key(2), 2)  # both factors random (one of them starts at zero)
        adapters = {name: {k: jax.random.normal(keys[i], adapters[name][k].shape, adapters[name][k].dtype)
                           for i, k in enumerate(("lora_a", "lora_b"))}}
        delta = np.asarray(jlora.merge(frozen, adapters, lora_cfg)[name] - w[name], np.float64)
        pair = adapters[name]
        n_in = math.prod(shape[i] for i in c_idx)
        n_out = math.prod(shape) // n_in
        old_a = shape[:-1]  # the rule before: lora_a on every axis but the last
        last = len(shape) - 1  # before: delta = A (old_a..., r) B (r, last); from the contracted axes C, rank
        free_a = 1 if last in c_idx else math.prod(s for i, s in enumerate(old_a) if i not in c_idx)
        old_rank_bound = min(r * free_a, n_in, n_out)  # <= r per free index of old_a outside C
        rows.append({"kernel": name, "einsum": eq, "shape": shape, "contracted": contracted,
                     "lora_a": tuple(pair["lora_a"].shape), "lora_b": tuple(pair["lora_b"].shape),
                     "params": int(pair["lora_a"].size + pair["lora_b"].size),
                     "params_before": math.prod(old_a) * r + r * shape[-1],
                     "rank": _rank(delta, c_idx), "rank_bound_before": old_rank_bound})
    block = [row for row in rows if row["kernel"] in BLOCK]
    return {"rows": rows, "block_params": sum(row["params"] for row in block),
            "block_params_before": sum(row["params_before"] for row in block)}


def table(config: Config, result: dict[str, Any]) -> str:
    lines = [f"# Gemma einsum kernels: adapter size and update rank (r = {config.rank})", "",
             f"N={config.N}, K={config.K}, D={config.D}, H={config.H}, F={config.F}. Rank: the merged update's "
             f"matrix rank as a map from the contracted axes to the rest (float64 SVD, tolerance 1e-6 of the "
             f"largest singular value). Before: lora_a on every axis but the last.", ""]
    rows = [[f"`{row['kernel']}`", f"`{row['einsum']}`", str(row["shape"]), row["contracted"], str(row["lora_a"]),
             str(row["lora_b"]), f"{row['params']:,}", f"{row['params_before']:,}", row["rank"],
             f"<= {row['rank_bound_before']}"] for row in result["rows"]]
    lines.append(common.md_table(["kernel", "einsum", "W", "contracted", "lora_a", "lora_b", "params",
                                  "params before", "update rank", "rank before"], rows, align="lllllllrrr"))
    lines += ["", f"A block ({', '.join(BLOCK)}): {result['block_params']:,} adapter parameters "
              f"(before: {result['block_params_before']:,})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    config = common.choose(args, Config(), QUICK)
    return common.run(config, measure, lambda result: table(config, result))


if __name__ == "__main__":
    sys.exit(main())

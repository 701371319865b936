"""The routed LoRA branch at the serving shapes, two ways (benchmarks.multi_adapter's routing section).

For one adapted kernel W (d_in, d_out) and a stack of K adapters A (K, d_in, r), B (K, r, d_out), a mixed batch of
`batch` examples of `per` rows each (prefill: per = prompt length; decode: per = 1), example i through adapter ids[i]:
  gather   what `jlora.routing` runs: the factors gathered per example (A[ids], B[ids]) and two batched products,
           (batch, per, d_in) x (batch, d_in, r) -> (batch, per, r) x (batch, r, d_out);
  ragged   `jax.lax.ragged_dot`: rows already sorted by adapter (the permutation and the group sizes made outside
           the timed function: the most favourable case for it, as a whole batch could be sorted once at entry),
           ragged_dot(x, A, sizes) -> (m, r), ragged_dot(h, B, sizes) -> (m, d_out);
  single   one adapter for every row, (x @ A[0]) @ B[0]: the floor any routing could reach;
  base     x @ W, the base product the branch rides beside (for scale).
Each timed call runs the kernel over `layers` layers (a `lax.scan` over distinct x, A, B, W per layer, as the model's
12 blocks), `calls` times; the figure is the median time of one kernel in one layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

METHODS = ("gather", "ragged", "single", "base")


def gather_branch(x, a, b, ids):
    """x (batch, per, d_in), a (K, d_in, r), b (K, r, d_out), ids int (batch,) -> (batch, per, d_out)."""
    h = jnp.einsum("bpi,bir->bpr", x, a[ids])
    return jnp.einsum("bpr,bro->bpo", h, b[ids])


def ragged_branch(x, a, b, sizes):
    """x (m, d_in) sorted by adapter, a (K, d_in, r), b (K, r, d_out), sizes int32 (K,) summing to m -> (m, d_out)."""
    return jax.lax.ragged_dot(jax.lax.ragged_dot(x, a, sizes), b, sizes)


def sort_rows(x, ids, size: int):
    """(x (batch * per, d_in) with examples sorted by adapter, the group sizes int32 (size,) in rows, the inverse
    permutation of the rows) for x (batch, per, d_in) and ids (batch,) in [0, size)."""
    batch, per = x.shape[:2]
    order = jnp.argsort(ids, stable=True)
    rows = (order[:, None] * per + jnp.arange(per)[None]).reshape(-1)
    sizes = (jnp.bincount(ids, length=size) * per).astype(jnp.int32)
    return x.reshape(batch * per, -1)[rows], sizes, jnp.argsort(rows)


def kernels() -> dict[str, Any]:
    """{method: jitted f(layers tree) -> the last layer's output}, each a lax.scan over the layers."""

    def scan(one):
        def run(t):
            def body(carry, layer):
                y = one(layer)
                return carry + y.reshape(-1)[0], None  # a scalar carry: XLA keeps every layer's work
            return jax.lax.scan(body, jnp.float32(0), t)[0]
        return jax.jit(run)

    return {
        "gather": scan(lambda t: gather_branch(t["x"], t["a"], t["b"], t["ids"])),
        "ragged": scan(lambda t: ragged_branch(t["sorted"], t["a"], t["b"], t["sizes"])),
        "single": scan(lambda t: (t["x"] @ t["a"][0]) @ t["b"][0]),
        "base": scan(lambda t: t["x"] @ t["w"]),
    }


def make_layers(key, *, layers: int, batch: int, per: int, d_in: int, d_out: int, rank: int, size: int, ids):
    """Random layers for `kernels`: each x (batch, per, d_in), a, b (K, ...), w; ids and the sorted copies."""
    ka, kb, kx, kw = jax.random.split(key, 4)
    x = jax.random.normal(kx, (layers, batch, per, d_in), jnp.float32)
    t = {"x": x, "a": jax.random.normal(ka, (layers, size, d_in, rank), jnp.float32) / np.sqrt(d_in),
         "b": jax.random.normal(kb, (layers, size, rank, d_out), jnp.float32) * 0.01,
         "w": jax.random.normal(kw, (layers, d_in, d_out), jnp.float32) / np.sqrt(d_in),
         "ids": jnp.broadcast_to(ids, (layers, batch))}
    t["sorted"], t["sizes"], _ = jax.vmap(lambda v: sort_rows(v, ids, size))(x)
    return t


def check(t) -> float:
    """max |gather - ragged| over one layer (unsorted back): both must be the same branch."""
    x, ids = t["x"][0], t["ids"][0]
    sorted_x, sizes, inverse = sort_rows(x, ids, t["a"].shape[1])
    want = gather_branch(x, t["a"][0], t["b"][0], ids).reshape(-1, t["b"].shape[-1])
    got = ragged_branch(sorted_x, t["a"][0], t["b"][0], sizes)[inverse]
    return float(jnp.max(jnp.abs(got - want)))


def measure(config, consumers: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """{case: {consumer: {method: summary + per-kernel seconds}, "faster": method}} for the cases prefill (per =
    prompt length) and decode (per = 1), at the serving batch and adapters."""
    size, batch = config.serve_adapters, config.serve_adapters
    ids = jnp.arange(batch, dtype=jnp.int32) % size
    out: dict[str, Any] = {}
    for case, per in (("prefill", config.prompt_len), ("decode", 1)):
        out[case] = {}
        for name, (d_in, d_out) in consumers.items():
            t = make_layers(jax.random.key(7), layers=config.n_layer, batch=batch, per=per, d_in=d_in, d_out=d_out,
                            rank=config.serve_rank, size=size, ids=ids)
            fns, methods, failed = kernels(), list(METHODS), None
            try:
                common.block(fns["ragged"](t))
            except Exception as e:  # a backend that cannot compile ragged_dot: said in the table, the rest measured
                failed, methods = f"{type(e).__name__}: {e}"[:400], [m for m in METHODS if m != "ragged"]
            runs = {m: (lambda f=fns[m], t=t: [common.block(f(t)) for _ in range(config.kernel_calls)])
                    for m in methods}
            times = common.interleaved(runs, warmup=1, repeats=config.kernel_repeats, desc=f"{case} {name} kernels")
            per_kernel = config.kernel_calls * config.n_layer
            row = {m: {**common.summary(times[m]), "kernel_s": float(np.median(times[m])) / per_kernel}
                   for m in methods}
            row.update(rows=batch * per, d_in=d_in, d_out=d_out, max_abs_diff=None, faster="gather",
                       ragged_over_gather=None, ragged_error=failed)
            if failed is None:
                row.update(max_abs_diff=check(t), faster=min(("gather", "ragged"), key=lambda m: row[m]["kernel_s"]),
                           ragged_over_gather=row["ragged"]["kernel_s"] / row["gather"]["kernel_s"])
            out[case][name] = row
    return out

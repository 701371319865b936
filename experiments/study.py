"""The learning-rate-grid machinery of experiments.alpha_over_r: the grid, the resumable run log, the evaluation
helper, and the analysis (best LR per rank, interior check, max/min ratio, log-log slope: `fit_slope([1, 4,
16], [1e-3, 2e-3, 4e-3]) == 0.5`); experiments.study_report writes the report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora.multi
from jlora.paths import flatten_adapters


@dataclasses.dataclass(frozen=True)
class Grid:
    """Ranks, seeds, step budget, and the LR lattice `lr_min * 10 ** (k / lr_per_decade)`, k = 0 .. n_lr - 1
    (k < 0 and k >= n_lr are the edge extensions)."""

    ranks: tuple[int, ...]
    seeds: tuple[int, ...]
    lr_min: float
    lr_per_decade: int
    n_lr: int
    steps: int

    def lr(self, k: int) -> float:
        return float(f"{self.lr_min * 10 ** (k / self.lr_per_decade):.6g}")


def num(x) -> float | None:
    """A float for JSON: None for None, NaN and infinities."""
    return None if x is None or not np.isfinite(x) else float(x)


class Log:
    """Finished runs, one JSON line each after a header holding the config (less out_dir and resume); `runs` maps
    (task, rank, scale, lr, seed) to the record. `resume=True` reads an existing log (the config must match, a
    torn last line is dropped; a field named in `growable`, a list such as the seeds, may have gained entries, so
    a finished study takes another seed); otherwise the file is started afresh."""

    def __init__(self, path: Path, config: dict, *, resume: bool, growable: Sequence[str] = ()):
        self.path, self.runs = Path(path), {}
        config = json.loads(json.dumps({k: v for k, v in config.items() if k not in ("resume", "out_dir")}))
        if resume and self.path.is_file():
            lines = self.path.read_text().splitlines()
            saved = json.loads(lines[0])["config"]
            diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k)
                          and not (k in growable and set(saved.get(k) or ()) <= set(config.get(k) or ())))
            if diff:
                raise ValueError(f"{self.path} was written with another config (fields {diff} differ); rerun "
                                 f"without --resume to start afresh, or with the same flags (seeds may be added)")
            for line in lines[1:]:
                with contextlib.suppress(json.JSONDecodeError):  # a line torn by an interruption
                    self._add(json.loads(line))
        self.path.write_text("".join(json.dumps(x) + "\n" for x in [{"config": config}, *self.runs.values()]))

    def _add(self, record: dict):
        self.runs[(record["task"], record["rank"], record["scale"], record["lr"], record["seed"])] = record

    def append(self, record: dict):
        self._add(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")


def record(task, lcfg: jlora.LoraConfig, seed: int, lr: float, frozen, adapters, losses, train_s: float,
           start: float) -> dict:
    """A finished run's record of experiments.alpha_over_r (held-out loss None when it diverged); `task` an
    alpha_over_r.Task, `start` the run's perf_counter start."""
    diverged = not (np.isfinite(losses).all() and all(np.isfinite(x).all() for x in jax.tree.leaves(adapters)))
    loss, acc = (None, None) if diverged else task.evaluate(jlora.merge(frozen, adapters, lcfg))
    return dict(task=task.name, rank=lcfg.rank, scale=scale_of(lcfg), alpha=lcfg.alpha, lr=lr, seed=seed,
                eval_loss=num(loss), accuracy=num(acc), diverged=diverged,
                train_loss=num(losses[-10:].mean()), steps=len(losses), losses=[num(x) for x in losses],
                norms={} if diverged else update_norms(adapters, lcfg), train_s=train_s,
                total_s=time.perf_counter() - start)


def scale_of(lcfg: jlora.LoraConfig) -> float:
    return round(lcfg.scale_for(lcfg.targets[0]), 12)


def update_norms(adapters, lcfg: jlora.LoraConfig) -> dict[str, float]:
    """||scale * a @ b||_F per adapted weight, from the factors in float64 (the kernels here are 2-D)."""
    pairs, _ = flatten_adapters(adapters)
    return {p: float(np.linalg.norm(lcfg.scale_for(p) * (np.asarray(f["lora_a"], np.float64)
                                                        @ np.asarray(f["lora_b"], np.float64))))
            for p, f in sorted(pairs.items())}


def extend(losses: Sequence[float], lo: int, hi: int, n_lr: int, extend: int) -> tuple[int, int, tuple[int, ...]]:
    """(lo, hi, ks): a grid k = lo .. hi whose best of `losses` sits on an edge grows one LR that way (ks), up to
    `extend` beyond 0 .. n_lr - 1; ks is () when it does not grow."""
    best = best_index(losses)
    if best == 0 and lo > -extend:
        return lo - 1, hi, (lo - 1,)
    if best == len(losses) - 1 and hi < n_lr - 1 + extend:
        return lo, hi + 1, (hi + 1,)
    return lo, hi, ()


def train_stacked(apply, frozen, runs: Sequence[tuple], batches, loss: Callable, factors: Sequence[float]) -> list:
    """K LoRA runs `[(adapters, LoraConfig, lr), ...]` of one frozen model on one batch stream `[(inputs, targets),
    ...]` trained in one program (`jlora.multi`), each as a sequential run of experiments.alpha_over_r: Adam
    (`scale_by_adam`), then `-lr * factors[i]` at step i. Returns `[(trained adapters, losses float64 (steps,))]`,
    each run's losses cut where a sequential run stops (its first 10th step whose loss is not finite)."""
    stacked, sc = jlora.multi.stack([a for a, _, _ in runs], [c for _, c, _ in runs])
    tx = jlora.multi.stacked_optimizer(lambda learning_rate: optax.chain(optax.scale_by_adam(),
                                                                         optax.scale(-learning_rate)),
                                       learning_rate=[0.0] * len(runs))
    step = jlora.multi.train_step(jlora.multi.stacked_transform(apply, sc, strict=True), tx, loss)
    state, losses = tx.init(stacked), []
    for i, (inputs, targets) in enumerate(batches):  # the rate is data: one compile for every step
        state = jlora.multi.with_hyperparams(state, learning_rate=np.float32([lr * factors[i] for *_, lr in runs]))
        stacked, state, step_losses = step(frozen, stacked, state, inputs, targets)
        losses.append(step_losses)
        if i % 10 == 9 and not np.isfinite(np.asarray(step_losses)).any():
            break  # all diverged
    out = []
    for (adapters, _), row in zip(jlora.multi.unstack(stacked, sc), np.asarray(jax.device_get(losses), np.float64).T):
        stop = [i for i in range(9, len(row), 10) if not np.isfinite(row[i])]
        out.append((adapters, row[: stop[0] + 1] if stop else row))
    return out


def xent(logits, labels):  # mean cross entropy of logits (n, classes) and int labels (n,)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def evaluator(apply, pairs, inputs: tuple, targets: np.ndarray, batch: int) -> Callable:
    """variables -> (held-out mean cross entropy, accuracy) over `targets`, in batches of `batch`, one jit for all
    runs; `pairs(logits, targets)` -> (logits (n, classes), labels (n,)) as in training."""
    if len(targets) % batch:
        raise ValueError(f"{len(targets)} held-out examples are not a multiple of the eval batch {batch}")

    @jax.jit
    def sums(v, *chunk):
        logits, labels = pairs(apply(v, *chunk[:-1]), chunk[-1])
        return jnp.stack([xent(logits, labels) * labels.size, jnp.sum(jnp.argmax(logits, -1) == labels), labels.size])

    def evaluate(v):
        arrays = (*inputs, targets)
        t = np.sum([sums(v, *(x[i: i + batch] for x in arrays)) for i in range(0, len(targets), batch)], axis=0)
        return float(t[0] / t[2]), float(t[1] / t[2])

    return evaluate


def mean_loss(runs: Mapping, key: tuple, seeds: Sequence[int], field: str = "eval_loss") -> float:
    """Mean of `field` over seeds of the runs `key + (seed,)`: inf when one diverged, NaN when one is missing."""
    values = [runs[key + (s,)][field] if key + (s,) in runs else np.nan for s in seeds]
    return float(np.mean([np.inf if v is None else v for v in values]))


def best_index(losses: Sequence[float]) -> int:
    """Index of the lowest loss; NaN (missing) and inf (diverged) never win unless all are."""
    x = np.asarray(losses, np.float64)
    return int(np.argmin(np.where(np.isfinite(x), x, np.inf)))


def is_interior(index: int, n: int) -> bool:
    """Whether the best of n grid points has a neighbour on both sides (else the grid may not contain the optimum)."""
    return 0 < index < n - 1


def refine(lrs: Sequence[float], losses: Sequence[float], index: int) -> float:
    """The vertex of the parabola in log10(lr) through the best point and its two neighbours, clipped to them; the
    grid LR itself when the best is on the edge or the three points are not convex."""
    x, y = np.log10(lrs[index - 1: index + 2]), np.asarray(losses[index - 1: index + 2], np.float64)
    if not is_interior(index, len(lrs)) or not np.isfinite(y).all():
        return float(lrs[index])
    a, b, _ = np.polyfit(x, y, 2)
    return float(10 ** np.clip(-b / (2 * a), x[0], x[2])) if a > 0 else float(lrs[index])


def spread(best_lrs: Sequence[float]) -> float:
    """max / min of the best LRs across ranks: 1 when the best LR does not move."""
    return float(np.max(best_lrs) / np.min(best_lrs))


def fit_slope(ranks: Sequence[int], best_lrs: Sequence[float]) -> float:
    """Least-squares slope of log(best LR) against log(r): best LR ~ r ** slope."""
    return float(np.polyfit(np.log(ranks), np.log(best_lrs), 1)[0])


def summarise(runs: Sequence[dict], groups: Mapping[tuple[str, int], float], grid: Grid) -> dict:
    """Per (scaling, r) in `groups` (-> its scale): the LR curve, best LR, its loss/accuracy/update norms (means over
    seeds); per scaling: max/min ratio and slope of the best LR across r, and the edge flags."""
    index = {(r["task"], r["rank"], r["scale"], r["lr"], r["seed"]): r for r in runs}
    rows, seeds = [], grid.seeds
    for (scaling, rank), scale in groups.items():
        lrs = sorted({r["lr"] for r in runs if (r["rank"], r["scale"]) == (rank, scale)})
        keys = [(runs[0]["task"], rank, scale, lr) for lr in lrs]
        losses = [mean_loss(index, k, seeds) for k in keys]
        if not lrs or not np.isfinite(losses).any():
            continue
        i = best_index(losses)
        at_best = [index[keys[i] + (s,)] for s in seeds if keys[i] + (s,) in index]
        norms = {p: float(np.mean([r["norms"][p] for r in at_best])) for p in at_best[0]["norms"]}
        rows.append(dict(scaling=scaling, rank=rank, scale=scale, lrs=lrs, losses=[num(x) for x in losses],
                         best_lr=lrs[i], best_lr_refined=refine(lrs, losses, i), interior=is_interior(i, len(lrs)),
                         eval_loss=losses[i], accuracy=mean_loss(index, keys[i], seeds, "accuracy"),
                         train_loss=mean_loss(index, keys[i], seeds, "train_loss"), norms=norms,
                         norm_mean=float(np.mean(list(norms.values()))),
                         seed_best=[lrs[best_index([mean_loss(index, k, (s,)) for k in keys])] for s in seeds]))
    scalings = {}
    for scaling in dict.fromkeys(s for s, _ in groups):
        rs = [r for r in rows if r["scaling"] == scaling]
        if len(rs) < 2:
            continue
        ranks, best, refined = ([r[k] for r in rs] for k in ("rank", "best_lr", "best_lr_refined"))
        per_seed = [fit_slope(ranks, seed_best) for seed_best in zip(*(r["seed_best"] for r in rs))]
        scalings[scaling] = dict(ratio=spread(best), slope=fit_slope(ranks, best), ratio_refined=spread(refined),
                                 slope_refined=fit_slope(ranks, refined), slope_seeds=per_seed,
                                 edges=[r["rank"] for r in rs if not r["interior"]])
    flattest = min(scalings, key=lambda s: (abs(scalings[s]["slope_refined"]), scalings[s]["ratio"]), default=None)
    return dict(grid=dataclasses.asdict(grid), rows=rows, scalings=scalings, flattest=flattest, runs=list(runs))


"""The learning-rate-grid machinery of experiments.alpha_over_r: the grid, the resumable run log, the evaluation
helper, the analysis (best LR per rank, interior check, max/min ratio, log-log slope: `fit_slope([1, 4,
16], [1e-3, 2e-3, 4e-3]) == 0.5`), and the report (Markdown, JSON, PNG plots)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax


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


NAMES = {"lora": "alpha/r (LoRA)", "rslora": "alpha/sqrt(r) (rsLoRA)", "none": "none (scale 1)"}
PLOTS = ("loss_vs_lr", "best_lr", "heatmap", "update_norm")


def environment() -> dict:
    return dict(jax=jax.__version__, backend=jax.default_backend(), device=str(jax.devices()[0]), cpus=os.cpu_count())


def writeup(task: str, s: dict) -> list[str]:
    """The generated findings of one task: how far the best LR moves across r per scaling, and the flattest."""
    lines = []
    for scaling, m in s["scalings"].items():
        edge = f"; best LR on the grid's edge at r = {m['edges']} (flagged)" if m["edges"] else ""
        lines.append(f"- {NAMES[scaling]}: the best LR moves by a factor {m['ratio']:.3g} across r (max/min; "
                     f"{m['ratio_refined']:.3g} interpolated), slope of log best-LR vs log r {m['slope']:+.2f} "
                     f"({m['slope_refined']:+.2f} interpolated; per seed {[round(x, 2) for x in m['slope_seeds']]})"
                     f"{edge}.")
    if s["flattest"]:
        m = s["scalings"][s["flattest"]]
        lines.append(f"- Flattest on {task}: **{NAMES[s['flattest']]}** (|slope| {abs(m['slope_refined']):.2f}, "
                     f"ratio {m['ratio']:.3g}); a slope of 0 means the LR needs no retuning when r changes.")
    if {"lora", "none"} <= set(s["scalings"]):
        gap = s["scalings"]["lora"]["slope_refined"] - s["scalings"]["none"]["slope_refined"]
        lines.append(f"- Slope(alpha/r) - slope(none) = {gap:.2f}. The two differ only in scale, by a factor r: were "
                     f"the optimum a function of lr x scale (Adam steps of B on a fixed A) the gap would be 1; of "
                     f"lr^2 x scale (both factors moving far from their init) 0.5.")
    return lines


def markdown(result: dict, stem: str) -> str:
    c = result["config"]
    out = [f"# Best learning rate vs LoRA rank under alpha/r, alpha/sqrt(r) and no scaling ({stem})", "",
           f"Scalings equal at r = {c['ref_rank']} (scale 1): alpha = {c['ref_rank']} for alpha/r, "
           f"sqrt({c['ref_rank']}) for alpha/sqrt(r), alpha = r for none. Adam, warm-up {c['warmup_ratio']:.0%} then "
           f"linear decay; the best LR minimises the held-out loss averaged over seeds; 'edge' flags a best LR at "
           f"the end of the (extended) grid. {result['ran']} runs made in this invocation; "
           f"{result['traces']} train-step compiles; {result['environment']['backend']}, "
           f"{result['environment']['cpus']} CPUs, jax {result['environment']['jax']}.", ""]
    for task, s in result["tasks"].items():
        g = s["grid"]
        out += [f"## {task}", "", f"r in {g['ranks']}; LR grid {g['lr_min']:.3g} x 10^(k/{g['lr_per_decade']}), k = 0.."
                f"{g['n_lr'] - 1}, extended by up to {c['extend']} per side on an edge; seeds {g['seeds']}; "
                f"{g['steps']} steps.", "", "### Findings", "", *writeup(task, s), "",
                "| scaling | r | scale | best LR | interpolated | held-out loss | accuracy | train loss "
                "| mean ‖scale·AB‖_F per layer | edge |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        out += [f"| {NAMES[r['scaling']]} | {r['rank']} | {r['scale']:.3g} | {r['best_lr']:.3g} | "
                f"{r['best_lr_refined']:.3g} | {r['eval_loss']:.4f} | {100 * r['accuracy']:.1f}% | "
                f"{r['train_loss']:.4f} | {r['norm_mean']:.3g} | {'' if r['interior'] else 'EDGE'} |"
                for r in s["rows"]]
        out += ["", "| scaling | best LR max/min across r | slope | interpolated max/min | interpolated slope |",
                "|---|---:|---:|---:|---:|"]
        out += [f"| {NAMES[k]} | {m['ratio']:.3g} | {m['slope']:+.2f} | {m['ratio_refined']:.3g} | "
                f"{m['slope_refined']:+.2f} |" for k, m in s["scalings"].items()]
        out += ["", *(f"![{p}]({stem}_{task}_{p}.png)" for p in PLOTS), ""]
    return "\n".join(out)


def layer_of(path: str) -> tuple[int, str]:  # ".../layer/3/attention/self/query/kernel" -> (3, "query")
    parts = path.split("/")
    return next((int(p) for p in parts if p.isdigit()), 0), parts[-2]


def plots(task: str, s: dict, path_of) -> None:
    """The four PNGs of a task; `path_of(plot name)` -> its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalings = list(dict.fromkeys(r["scaling"] for r in s["rows"]))
    ranks = sorted({r["rank"] for r in s["rows"]})
    color = {r: plt.cm.viridis(i / max(len(ranks) - 1, 1)) for i, r in enumerate(ranks)}

    def panels(name, fill, **kw):
        fig, axes = plt.subplots(1, len(scalings), figsize=(5 * len(scalings), 4), squeeze=False, **kw)
        for ax, scaling in zip(axes[0], scalings):
            fill(ax, [r for r in s["rows"] if r["scaling"] == scaling])
            ax.set_title(f"{task}: {NAMES[scaling]}")
        fig.tight_layout()
        fig.savefig(path_of(name), dpi=90)
        plt.close(fig)

    def curves(ax, rows):
        for r in rows:
            ax.plot(r["lrs"], [np.nan if x is None else x for x in r["losses"]], "o-", ms=3, color=color[r["rank"]],
                    label=f"r={r['rank']}")
            ax.plot(r["best_lr"], r["eval_loss"], "k*" if r["interior"] else "rx", ms=9)
        ax.set(xscale="log", xlabel="learning rate", ylabel="held-out loss (mean over seeds)")
        ax.legend(fontsize=7)

    lrs = sorted({lr for r in s["rows"] for lr in r["lrs"]})

    def heat(ax, rows):
        grid = np.full((len(ranks), len(lrs)), np.nan)
        for r in rows:
            for lr, x in zip(r["lrs"], r["losses"]):
                grid[ranks.index(r["rank"]), lrs.index(lr)] = np.nan if x is None else x
        finite = [x for r in s["rows"] for x in r["losses"] if x is not None]
        im = ax.imshow(grid, aspect="auto", origin="lower", vmin=min(finite), vmax=np.percentile(finite, 90))
        ax.set(xticks=range(len(lrs)), xticklabels=[f"{x:.1g}" for x in lrs], yticks=range(len(ranks)),
               yticklabels=ranks, xlabel="learning rate", ylabel="r")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.plot([lrs.index(r["best_lr"]) for r in rows], [ranks.index(r["rank"]) for r in rows], "w*")
        plt.colorbar(im, ax=ax, label="held-out loss (blank: diverged or not run)")

    def norms(ax, rows):  # one line per (r, module) over the layers
        for r in rows:
            by_module = {}
            for path, norm in r["norms"].items():
                by_module.setdefault(layer_of(path)[1], []).append((layer_of(path)[0], norm))
            for style, (module, points) in zip(("o-", "s--", "^:"), sorted(by_module.items())):
                ax.plot(*zip(*sorted(points)), style, ms=3, color=color[r["rank"]], label=f"r={r['rank']} {module}")
        ax.set(yscale="log", xlabel="layer", ylabel="‖scale·AB‖_F at the best LR")
        ax.legend(fontsize=6, ncol=2)

    def best(ax, rows):
        x, m = [r["rank"] for r in rows], s["scalings"].get(rows[0]["scaling"], {})
        ax.plot(x, [r["best_lr_refined"] for r in rows], "o-", label=f"interpolated: slope "
                f"{m.get('slope_refined', np.nan):+.2f}, max/min {m.get('ratio_refined', np.nan):.3g}")
        ax.plot(x, [r["best_lr"] for r in rows], "s", mfc="none", label=f"grid: slope {m.get('slope', np.nan):+.2f}")
        ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="best learning rate", xticks=x, xticklabels=x)
        ax.legend(fontsize=7)

    panels("loss_vs_lr", curves)
    panels("best_lr", best, sharey=True)
    panels("heatmap", heat)
    panels("update_norm", norms)


def write(result: dict, out: Path, stem: str) -> None:
    """<stem>.json (allow_nan=False: diverged values are null), <stem>.md, and the PNGs of each task."""
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    (out / f"{stem}.md").write_text(markdown(result, stem))
    for task, s in result["tasks"].items():
        if s["rows"]:
            plots(task, s, lambda p, task=task: out / f"{stem}_{task}_{p}.png")

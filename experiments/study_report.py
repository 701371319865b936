"""The report of an experiments.alpha_over_r study (the results of `study.summarise` per task): the generated
findings, the Markdown tables, the JSON and the PNG plots (loss vs LR per r, best LR vs r, a heatmap, update norms)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

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
    c, runs = result["config"], [r for s in result["tasks"].values() for r in s["runs"]]
    hours = sum(r["total_s"] for r in runs) / 3600
    out = [f"# Best learning rate vs LoRA rank under alpha/r, alpha/sqrt(r) and no scaling ({stem})", "",
           f"Scalings equal at r = {c['ref_rank']} (scale 1): alpha = {c['ref_rank']} for alpha/r, "
           f"sqrt({c['ref_rank']}) for alpha/sqrt(r), alpha = r for none. Adam, warm-up {c['warmup_ratio']:.0%} then "
           f"linear decay; the best LR minimises the held-out loss averaged over seeds; 'edge' flags a best LR at "
           f"the end of the (extended) grid. {len(runs)} runs in all, {hours:.2f} h of run time ({result['ran']} "
           f"made in this invocation, the rest read back from the log; {result['traces']} train-step compiles); "
           f"{result['environment']['backend']}, "
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

"""The PNGs of experiments.alpha_over_r_v2, from the summary of alpha_v2_report: held-out loss vs learning rate per
part (every run a dot, the mean over seeds a line through the grid points, a diverged run an 'x' on the top edge,
the best LR a star; panels of a figure share their y-axis), and best LR vs r with its bootstrap interval."""

from __future__ import annotations

import numpy as np

PLOTS = ("part1", "part2", "part2_steps", "part3", "part4", "part5", "best_lr")


def _label(g: dict) -> str:
    if g["method"] == "full":
        return "full fine-tuning"
    return f"{g['placement']} r={g['rank']}" + (f" LoRA+ x{g['ratio']:g}" if g["ratio"] != 1 else "")


def _log_ticks(axis, lo: float, hi: float) -> None:
    """Labels a log axis at 1, 2 and 5 x 10^k within [lo, hi], in plain numbers, and no minor tick labels
    (matplotlib's default labels minor ticks on a short range, and they overlap)."""
    from matplotlib.ticker import NullFormatter

    ticks = [m * 10.0 ** k for k in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
             for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]
    if len(ticks) < 2:  # a range too short for two of them: its ends and middle
        ticks = [float(f"{t:.2g}") for t in np.geomspace(lo, hi, 5)[1:-1]]
    axis.set_ticks(ticks, [f"{t:g}" for t in ticks])
    axis.set_minor_formatter(NullFormatter())


def _curves(ax, rows, top: float):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    for i, g in enumerate(rows):
        color = cmap(i / max(len(rows) - 1, 1))
        lrs, per_seed = np.array(g["lrs"]), g["per_seed"]
        finite = [(lr, x) for lr, xs in zip(lrs, per_seed) for x in xs if isinstance(x, float)]
        bad = [lr for lr, xs in zip(lrs, per_seed) for x in xs if x == "diverged"]
        if finite:
            ax.plot(*zip(*finite), ".", color=color, alpha=0.45, ms=4)
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=color, ms=6, clip_on=False)
        mean = [np.nan if x is None else x for x in g["loss"]]
        ax.plot(lrs, mean, "o-", color=color, ms=3, lw=1, label=_label(g))
        if g["best_lr"]["value"] and g["best_loss"]["value"] is not None:
            ax.plot(g["best_lr"]["value"], g["best_loss"]["value"], "*", color=color, ms=11, mec="k", mew=0.5)
    ax.plot([], [], "k.", alpha=0.45, label="one run (seed)")
    ax.plot([], [], "kx", label="diverged (loss > initial)")
    ax.plot([], [], "k*", label="best LR (vertex)")
    ax.set(xscale="log", xlabel="learning rate (lora_a's for LoRA+)", ylabel="held-out loss")
    _log_ticks(ax.xaxis, *ax.get_xlim())
    ax.legend(fontsize=6)


def _panels(path, panels: dict, top: float) -> bool:
    from matplotlib.figure import Figure

    if not panels:
        return False
    fig = Figure(figsize=(4.5 * len(panels), 3.8), layout="tight")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, rows) in zip(axes, panels.items()):
        _curves(ax, rows, top)
        ax.set_title(title, fontsize=9)
    finite = [x for rows in panels.values() for g in rows for xs in g["per_seed"] for x in xs if isinstance(x, float)]
    if finite:
        axes[0].set_ylim(min(finite) - 0.01 * abs(min(finite)), top)
    fig.savefig(path, dpi=90)
    return True


def _best_lr(path, panels: dict) -> bool:
    from matplotlib.figure import Figure

    if not panels:
        return False
    fig = Figure(figsize=(4.5 * len(panels), 3.8), layout="tight")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels.items()):
        for name, rows in series.items():
            rows = sorted(rows, key=lambda g: g["rank"])
            _errorbar(ax, [g["rank"] for g in rows], [g["best_lr"] for g in rows], name)
        ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="best learning rate", title=title)
        ranks = sorted({g["rank"] for rows in series.values() for g in rows})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        _log_ticks(ax.yaxis, *ax.get_ylim())
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    return True


def _errorbar(ax, x, stats: list[dict], label: str) -> None:
    """Estimates joined by a line, each with its 95 % interval as a capped bar (a percentile interval need not
    contain its estimate: the spread across ranks of a max - min is biased upwards, so the bar is drawn as is)."""
    y = np.array([np.nan if m["value"] is None else m["value"] for m in stats], np.float64)
    lo = np.array([np.nan if m["ci95"][0] is None else m["ci95"][0] for m in stats], np.float64)
    hi = np.array([np.nan if m["ci95"][1] is None else m["ci95"][1] for m in stats], np.float64)
    (line,) = ax.plot(x, y, "o-", ms=4, label=f"{label} (bars: 95 % interval)")
    ok = np.isfinite(lo) & np.isfinite(hi)
    ax.errorbar(np.asarray(x)[ok], ((lo + hi) / 2)[ok], yerr=((hi - lo) / 2)[ok], fmt="none", capsize=3,
                color=line.get_color())


def _steps(path, task: str, checkpoints: dict) -> bool:
    """Part 2 during the long runs: each rank's held-out loss at its best final LR (one panel per scaling, shared
    y-axis), and the spread across ranks vs step, all with 95 % intervals."""
    from matplotlib.figure import Figure

    if not checkpoints:
        return False
    fig = Figure(figsize=(4.5 * (len(checkpoints) + 1), 3.8), layout="tight")
    axes = fig.subplots(1, len(checkpoints) + 1, squeeze=False)[0]
    for ax in axes[1:-1]:  # the per-scaling panels share their y-axis; the spread has its own
        ax.sharey(axes[0])
    for ax, (scaling, m) in zip(axes, checkpoints.items()):
        for r, stats in m["by_rank"].items():
            _errorbar(ax, m["steps"], stats, f"r={r}")
        ax.set(xlabel="step", ylabel="held-out loss", title=f"{task} {scaling}: loss at each r's best final LR")
        ax.set_xticks(m["steps"])
        ax.legend(fontsize=7)
    for scaling, m in checkpoints.items():
        _errorbar(axes[-1], m["steps"], m["spread"], scaling)
    axes[-1].set(xlabel="step", ylabel="max - min across r (nats)", title=f"{task}: spread across ranks")
    axes[-1].axhline(0, color="0.6", lw=0.5)
    axes[-1].legend(fontsize=7)
    fig.savefig(path, dpi=90)
    return True


def plots(task: str, t: dict, path_of) -> list[str]:
    """The PNGs of one task's summary `t`; `path_of(plot name)` -> its path. Returns the names of those written
    (a plot with no data is not)."""
    rows = [g for k in ("part1", "part2", "part5") for g in t.get(k, {}).get("rows", [])]
    rows += t.get("part4", []) + ([t["part3"]["full"]] if "part3" in t else [])
    inits = [x for g in rows for xs in g["per_seed"] for x in xs if isinstance(x, float)]
    top = max(inits) if inits else 1.0

    def by(key, source):
        out = {}
        for g in source:
            out.setdefault(key(g), []).append(g)
        return out

    p1, p2 = t.get("part1", {}).get("rows", []), t.get("part2", {}).get("rows", [])
    panels = dict(
        part1={f"{task} {g}: {r[0]['steps']} steps": r for g, r in by(lambda g: g["scaling"], p1).items()},
        part2={f"{task} {k[0]}: {k[1]} steps": r for k, r in by(lambda g: (g["scaling"], g["steps"]), p2).items()},
        part3={f"{task}: full fine-tuning": [t["part3"]["full"]],
               f"{task}: LoRA alpha/r": [g for g in p1 if g["scaling"] == "lora"]} if "part3" in t else {},
        part4={f"{task}: {g['placement']} (r={g['rank']})": [g] for g in t.get("part4", [])},
        part5={f"{task}: LoRA+ ratio {q:g}": r for q, r in by(lambda g: g["ratio"],
                                                              t.get("part5", {}).get("rows", [])).items()})
    best = {f"{task} part 1": by(lambda g: g["scaling"], p1)}
    best |= {f"{task} part 2, {h} steps": by(lambda g: g["scaling"], [g for g in p2 if g["steps"] == h])
             for h in dict.fromkeys(g["steps"] for g in p2)}
    best |= {f"{task} part 5 (LoRA+)": by(lambda g: f"ratio {g['ratio']:g}", t.get("part5", {}).get("rows", []))}
    ok = {name: _panels(path_of(name), panels[name], top) for name in panels}
    ok["part2_steps"] = _steps(path_of("part2_steps"), task, t.get("part2", {}).get("checkpoints", {}))
    ok["best_lr"] = _best_lr(path_of("best_lr"), {k: v for k, v in best.items() if v})
    return [name for name in PLOTS if ok[name]]

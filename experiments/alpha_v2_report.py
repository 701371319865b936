"""The analysis and report of experiments.alpha_over_r_v2: bootstrap fits per group (experiments.alpha_v2_stats),
the statistics each requirement asks for with 95 % intervals, <name>.json, <name>.md and the PNGs (alpha_v2_plots).

Every interval is a percentile interval over `n_boot` replicates that resample the seeds and the held-out examples
together, the same draws for every group of a task (so differences and ratios are paired)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments import alpha_v2_plots, study_report
from experiments.alpha_v2_stats import SCALE_EXPONENT, Draws, Fit, scale_power, slope, summary

NAMES = study_report.NAMES | {"full": "full fine-tuning"}
# Thinking Machines' "LoRA Without Regret" uses alpha = 32 with alpha/r; at scale s the optimum behaves like
# lr x s^p (part 1 measures p), so their 10x (15x for short runs) reads as 10 x (32 / alpha)^p here
THEIR_ALPHA, THEIR_RATIO, THEIR_SHORT = 32.0, 10.0, 15.0


def _fits(runs: list[dict], groups: list[dict], c, draws: Draws) -> list[tuple[dict, Fit]]:
    from experiments.alpha_over_r_v2 import gkey

    out = []
    for g in groups:
        mine = [r for r in runs if gkey(r, c) == gkey(g, c)]
        if mine:
            out.append((g, Fit([(r["lr"], r["seed"], None if r["diverged"] else np.asarray(r["examples"]))
                                for r in mine], draws)))
    return out


def _row(g: dict, f: Fit) -> dict:
    per_seed = [[x if np.isfinite(x) else (None if np.isnan(x) else "diverged") for x in row]
                for row in f.per_seed.tolist()]
    return dict(g, lrs=f.lrs.tolist(), loss=[x if np.isfinite(x) else None for x in f.loss.tolist()],
                n_seeds=f.n_seeds.tolist(), per_seed=per_seed, interior=f.interior,
                best_lr=summary(f.best_lr, f.best_lr_boot), best_loss=summary(f.best_loss, f.best_loss_boot))


def _slopes(fits: list[tuple[dict, Fit]], key) -> dict:
    """Per value of `key(group)`: slope of log best-LR on log r, max/min across r, best-loss spread across r."""
    out = {}
    for k in dict.fromkeys(key(g) for g, _ in fits):
        fs = sorted([(g["rank"], f) for g, f in fits if key(g) == k], key=lambda t: t[0])
        if len(fs) < 2:
            continue
        ranks, lr0 = [r for r, _ in fs], np.array([f.best_lr for _, f in fs])
        boot = np.stack([f.best_lr_boot for _, f in fs])
        loss0, lboot = np.array([f.best_loss for _, f in fs]), np.stack([f.best_loss_boot for _, f in fs])
        out[k] = dict(ranks=ranks, slope=summary(slope(ranks, lr0), slope(ranks, boot)),
                      ratio=summary(lr0.max() / lr0.min(), boot.max(0) / boot.min(0)),
                      loss_spread=summary(loss0.max() - loss0.min(), lboot.max(0) - lboot.min(0)),
                      edges=[r for r, f in fs if not f.interior])
    return out


def _ratio(a: Fit, b: Fit) -> dict:
    with np.errstate(invalid="ignore", divide="ignore"):  # replicates where a group diverged: not finite, dropped
        return summary(a.best_lr / b.best_lr, a.best_lr_boot / b.best_lr_boot)


def _diff(a: Fit, b: Fit) -> dict:
    with np.errstate(invalid="ignore"):  # inf - inf where both diverged in a replicate: NaN, dropped by `interval`
        return summary(a.best_loss - b.best_loss, a.best_loss_boot - b.best_loss_boot)


def _checkpoint_spread(runs: list[dict], fits: list[tuple[dict, Fit]], c, draws: Draws) -> dict:
    """Per scaling of the long horizon: at each checkpoint, each rank's held-out loss at its best final learning rate
    (the grid point nearest the optimum after the whole run) and the spread across ranks (max - min), with 95 %
    intervals over the same seed and example draws as every other figure."""
    from experiments.alpha_over_r_v2 import gkey

    def examples(r: dict, step: int, last: int):
        ex = r["examples"] if step == last else r.get("checkpoint_examples", {}).get(str(step))
        return None if ex is None else np.asarray(ex)

    out = {}
    for scaling in dict.fromkeys(g["scaling"] for g, _ in fits):
        at = {}  # rank -> step -> Fit of the one learning rate
        for g, f in fits:
            if g["scaling"] != scaling:
                continue
            lr = float(f.lrs[f.best_index])
            rs = [r for r in runs if r["lr"] == lr and gkey(r, c) == gkey(g, c)]
            steps = sorted({int(k) for r in rs for k in r.get("checkpoint_examples", {})} | {g["steps"]})
            at[g["rank"]] = {s: Fit([(lr, r["seed"], examples(r, s, g["steps"])) for r in rs], draws) for s in steps}
        common = sorted(set.intersection(*(set(v) for v in at.values()))) if at else []
        est = {s: [v[s].best_loss for v in at.values()] for s in common}
        boot = {s: np.ptp([v[s].best_loss_boot for v in at.values()], 0) for s in common}
        out[scaling] = dict(steps=common, spread=[summary(max(est[s]) - min(est[s]), boot[s]) for s in common],
                            by_rank={r: [summary(v[s].best_loss, v[s].best_loss_boot) for s in common]
                                     for r, v in at.items()})
    return out


def summarise(runs: list[dict], meta: dict, c) -> dict:
    from experiments.alpha_over_r_v2 import groups as part_groups
    from experiments.alpha_over_r_v2 import short

    tasks = {}
    for task, m in meta.items():
        mine = [r for r in runs if r["task"] == task]
        if not mine:
            continue
        draws = Draws(c.seeds, m["n_test"], n_boot=c.n_boot, rng_seed=0)
        fit = lambda gs, mine=mine, draws=draws: _fits(mine, gs, c, draws)  # noqa: E731
        t, s = {}, short(c, task)
        p1 = fit(m["groups"][1])
        if p1:
            t["part1"] = dict(rows=[_row(g, f) for g, f in p1], scalings=_slopes(p1, lambda g: g["scaling"]))
            sc = t["part1"]["scalings"]
            if "lora" in sc and {"none", "rslora"} & set(sc):
                fl = {k: [f for g, f in p1 if g["scaling"] == k] for k in sc}
                ranks = [g["rank"] for g, _ in p1 if g["scaling"] == "lora"]
                p0, other = scale_power(ranks, {k: np.array([f.best_lr for f in fs]) for k, fs in fl.items()})
                pb, _ = scale_power(ranks, {k: np.stack([f.best_lr_boot for f in fs]) for k, fs in fl.items()})
                t["part1"]["p"] = summary(p0, pb) | dict(other=other)
        p2 = fit([g for g in m["groups"][2]])
        if p2:
            t["part2"] = dict(rows=[_row(g, f) for g, f in p2],
                              horizons={h: _slopes([(g, f) for g, f in p2 if g["steps"] == h], lambda g: g["scaling"])
                                        for h in c.minilm_horizons},
                              checkpoints=_checkpoint_spread(mine, [(g, f) for g, f in p2
                                                                    if g["steps"] == max(c.minilm_horizons)], c, draws))
        p3 = fit(part_groups(c, 3, task, m["params_per_rank"])[:1])
        lora = [(g, f) for g, f in fit([dict(g, rank=r) for g in part_groups(c, 3, task, m["params_per_rank"])[1:]
                                        for r in sorted({c.ref_rank, *c.ranks})]) if g["steps"] == s]
        if p3:
            full = p3[0][1]
            t["part3"] = dict(full=_row(*p3[0]), ratios={g["rank"]: _ratio(f, full) for g, f in lora})
            if "p" in t.get("part1", {}) and t["part1"]["p"]["value"] is not None:
                p = t["part1"]["p"]
                claim = {}
                for name, k in (("long", THEIR_RATIO), ("short", THEIR_SHORT)):
                    value, lo, hi = (None if x is None else k * (THEIR_ALPHA / c.ref_rank) ** x
                                     for x in (p["value"], *p["ci95"]))
                    claim[name] = dict(p=p, value=value, ci95=[lo, hi])
                t["part3"]["claim_here"] = claim
        p4 = fit(m["groups"][4])
        if p4:
            ref = next((f for g, f in p4 if g["placement"] == "qv"), None)
            mlp = next((f for g, f in p4 if g["placement"] == "mlp"), None)
            full = p3[0][1] if p3 else None
            t["part4"] = [_row(g, f) | dict(params=m["params_per_rank"][g["placement"]] * g["rank"],
                                            loss_minus_qv=None if ref is None else _diff(f, ref),
                                            loss_minus_mlp=None if mlp is None else _diff(f, mlp),
                                            loss_minus_full=None if full is None else _diff(f, full),
                                            lr_over_qv=None if ref is None else _ratio(f, ref)) for g, f in p4]
        p5 = fit(m["groups"][5])
        if p5:
            base = {g["rank"]: f for g, f in p5 if g["ratio"] == 1}
            t["part5"] = dict(rows=[_row(g, f) | dict(loss_minus_ratio1=_diff(f, base[g["rank"]]) if g["rank"] in base
                                                       else None) for g, f in p5],
                              ratios=_slopes(p5, lambda g: g["ratio"]))
        tasks[task] = t
    return dict(config={k: getattr(c, k) for k in c.__dataclass_fields__}, environment=study_report.environment(),
                runs=len(runs), run_hours=sum(r["total_s"] for r in runs) / 3600, tasks=tasks)


def _ci(s: dict | None, fmt: str = "{:.3g}") -> str:
    if not s or s["value"] is None:
        return "n/a"
    lo, hi = (("?" if x is None else fmt.format(x)) for x in s["ci95"])
    return f"{fmt.format(s['value'])} [{lo}, {hi}]"


def markdown(result: dict, stem: str, plots: dict | None = None) -> str:
    """The report; `plots` maps each task to the names of its PNGs (all of alpha_v2_plots.PLOTS when None)."""
    c, out = result["config"], []
    out += [f"# The alpha/r study, second round ({stem})", "",
            f"{result['runs']} runs, {result['run_hours']:.2f} h of run time; {result['environment']['backend']}, "
            f"{result['environment']['cpus']} CPUs, jax {result['environment']['jax']}. Values: estimate [bootstrap "
            f"95 % interval over seeds {list(c['seeds'])} and held-out examples, {c['n_boot']} replicates]. Best LR: "
            f"parabola vertex in log LR through the lowest point and its neighbours. Diverged: held-out loss above "
            f"the initial loss (or not finite).", ""]
    for task, t in result["tasks"].items():
        out += [f"## {task}", ""]
        if "part1" in t:
            out += ["### 1. Best LR vs r with intervals (short horizon)", "",
                    "| scaling | slope of log best-LR on log r | max/min across r | best-loss spread across r | edge |",
                    "|---|---:|---:|---:|---|"]
            out += [f"| {NAMES[k]} | {_ci(m['slope'], '{:+.2f}')} | {_ci(m['ratio'])} | "
                    f"{_ci(m['loss_spread'], '{:.4f}')} | {m['edges'] or ''} |"
                    for k, m in t["part1"]["scalings"].items()]
            if "p" in t["part1"]:
                p = t["part1"]["p"]
                k = 1 / (SCALE_EXPONENT[p["other"]] - SCALE_EXPONENT["lora"])  # scale_power's divisor
                how = f"{k:g} x (slope(alpha/r) - slope({NAMES[p['other']].split(' ')[0]}))"
                out += ["", f"The optimum as a function of lr x scale^p: p = {how} = {_ci(p, '{:.2f}')}."]
            out += [""]
        ranked = [g for k in ("part1", "part2") for g in t.get(k, {}).get("rows", [])]
        if ranked:
            out += ["Best learning rate and best reachable loss of each group (parts 1 and 2):", "",
                    "| scaling | r | steps | best LR | best loss | optimum inside the grid |",
                    "|---|---:|---:|---:|---:|---|"]
            seen = set()
            for g in sorted(ranked, key=lambda g: (g["steps"], g["scaling"], g["rank"])):
                if (k := (g["scaling"], g["rank"], g["steps"])) not in seen:
                    seen.add(k)
                    out += [f"| {NAMES[g['scaling']]} | {g['rank']} | {g['steps']} | {_ci(g['best_lr'])} | "
                            f"{_ci(g['best_loss'], '{:.4f}')} | {'yes' if g['interior'] else 'no (edge)'} |"]
            out += [""]
        p2_ranks = sorted({g["rank"] for g in t.get("part2", {}).get("rows", [])})
        for h, sc in t.get("part2", {}).get("horizons", {}).items():
            out += [f"### 2. {h} steps (fresh tweets; r in {p2_ranks})", "",
                    "| scaling | slope | max/min | best-loss spread across r |",
                    "|---|---:|---:|---:|"]
            out += [f"| {NAMES[k]} | {_ci(m['slope'], '{:+.2f}')} | {_ci(m['ratio'])} | "
                    f"{_ci(m['loss_spread'], '{:.4f}')} |" for k, m in sc.items()] + [""]
        for k, m in t.get("part2", {}).get("checkpoints", {}).items():
            out += [f"{NAMES[k]}, {max(m['steps'], default=0)}-step runs at each rank's best final LR: held-out loss "
                    "during the run", "", "| step | " + " | ".join(f"r = {r}" for r in m["by_rank"]) +
                    " | spread across r |", "|---:|" + "---:|" * (len(m["by_rank"]) + 1)]
            out += [f"| {s} | " + " | ".join(_ci(v[i], "{:.4f}") for v in m["by_rank"].values()) +
                    f" | {_ci(m['spread'][i], '{:.4f}')} |" for i, s in enumerate(m["steps"])] + [""]
        if "part3" in t:
            p3 = t["part3"]
            out += ["### 3. LoRA / full fine-tuning optimal LR", "", f"Full fine-tuning best LR "
                    f"{_ci(p3['full']['best_lr'])}, loss {_ci(p3['full']['best_loss'], '{:.4f}')}.", "",
                    "| r (alpha/r) | LoRA best LR / full best LR |", "|---:|---:|"]
            out += [f"| {r} | {_ci(v)} |" for r, v in p3["ratios"].items()]
            if "claim_here" in p3:
                ch = p3["claim_here"]
                out += ["", f"The claim, {THEIR_RATIO:g}x ({THEIR_SHORT:g}x for short runs), is at alpha = "
                        f"{THEIR_ALPHA:g}; here alpha = {c['ref_rank']}, and with the optimum a function of lr x "
                        f"scale^p (p from part 1) it reads {_ci(ch['long'])}x ({_ci(ch['short'])}x)."]
            out += [""]
        if "part4" in t:
            out += ["### 4. Placement at matched trainable parameters", "",
                    "| placement | r | params | best LR | best loss | loss - q,v | loss - MLP | loss - full FT | "
                    "LR / q,v's |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            out += [f"| {g['placement']} | {g['rank']} | {g['params']:,} | {_ci(g['best_lr'])} | "
                    f"{_ci(g['best_loss'], '{:.4f}')} | {_ci(g['loss_minus_qv'], '{:+.4f}')} | "
                    f"{_ci(g['loss_minus_mlp'], '{:+.4f}')} | {_ci(g['loss_minus_full'], '{:+.4f}')} | "
                    f"{_ci(g['lr_over_qv'])} |" for g in t["part4"]] + [""]
        if "part5" in t:
            out += ["### 5. LoRA+ (alpha/r)", "", "| ratio | r | best LR of lora_a | best loss | loss - ratio 1 |",
                    "|---:|---:|---:|---:|---:|"]
            out += [f"| {g['ratio']:g} | {g['rank']} | {_ci(g['best_lr'])} | {_ci(g['best_loss'], '{:.4f}')} | "
                    f"{'(reference)' if g['ratio'] == 1 else _ci(g['loss_minus_ratio1'], '{:+.4f}')} |"
                    for g in t["part5"]["rows"]]
            out += ["", *(f"- ratio {k:g}: slope {_ci(m['slope'], '{:+.2f}')}"
                          for k, m in t["part5"]["ratios"].items())]
            out += [""]
        out += [f"![{p}]({stem}_{task}_{p}.png)" for p in (alpha_v2_plots.PLOTS if plots is None
                                                              else plots.get(task, []))] + [""]
    return "\n".join(out)


def write(result: dict, out: Path, stem: str) -> None:
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, allow_nan=False, default=str) + "\n")
    written = {task: alpha_v2_plots.plots(task, t, lambda p, task=task: out / f"{stem}_{task}_{p}.png")
               for task, t in result["tasks"].items()}
    (out / f"{stem}.md").write_text(markdown(result, stem, written))

"""experiments.alpha_over_r_v2: the --quick study end to end and resumed, the search plan, and the statistics on
synthetic data with known answers (bootstrap interval of a slope and a ratio; the divergence rule)."""

import json

import numpy as np
import pytest

from experiments import alpha_over_r_v2 as v2
from experiments import alpha_v2_plots, parse_config
from experiments.alpha_v2_stats import Draws, Fit, diverged, interval, scale_power, slope, vertex

PNG = b"\x89PNG\r\n\x1a\n"
STEM = "alpha_over_r_v2_quick"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    assert v2.main(["--quick", "--out_dir", str(out)]) == 0
    return out


@pytest.mark.assets
def test_quick_writes_every_part(quick):
    result = json.loads((quick / f"{STEM}.json").read_text())  # strict JSON: no NaN or Infinity
    m = result["tasks"]["minilm"]
    assert {"part1", "part2", "part3", "part4", "part5"} <= set(m) and {"part1", "part3"} <= set(
        result["tasks"]["smollm2"])
    assert set(m["part1"]["scalings"]) == {"lora", "none"} and "p" in m["part1"]
    for s in m["part1"]["scalings"].values():
        lo, hi = s["slope"]["ci95"]
        assert lo <= hi and s["ranks"] == [1, 8]
    assert set(m["part2"]["horizons"]) == {"6", "12"}
    assert {p["placement"] for p in m["part4"]} == {"qv", "mlp", "all"}
    place, checked = {p["placement"]: p["best_loss"]["value"] for p in m["part4"]}, 0
    refs = dict(loss_minus_qv=place["qv"], loss_minus_mlp=place["mlp"],
                loss_minus_full=m["part3"]["full"]["best_loss"]["value"])
    for p in m["part4"]:  # paired differences against q,v, MLP and full fine-tuning (where both are finite)
        for key, ref in refs.items():
            if None not in (ref, p["best_loss"]["value"]):
                assert p[key]["value"] == pytest.approx(p["best_loss"]["value"] - ref)
                checked += 1
    assert checked >= 1  # the tiny models diverge at many rates: some placements have no finite best
    assert {g["ratio"] for g in m["part5"]["rows"]} == {1.0, 16.0}
    records = [json.loads(line) for line in (quick / f"{STEM}.jsonl").read_text().splitlines()[1:]]
    for r in records:  # per-example held-out losses, or None for a diverged run
        assert r["diverged"] == diverged(r["initial_loss"], r["eval_loss"])
        assert r["examples"] is None or len(r["examples"]) == (40 if r["task"] == "minilm" else 4)
    full = [r for r in records if r["method"] == "full"]
    assert full and all(r["trainable"] > 10 * max(x["trainable"] for x in records if x["method"] == "lora")
                        for r in full)
    long = [r for r in records if r["task"] == "minilm" and r["steps"] == 12 and r["eval_loss"] is not None]
    assert long and all(set(r["checkpoints"]) == {"6", "12"} for r in long)  # held-out loss every 6 steps
    for r in long:  # with the per-example losses at each checkpoint (the last is `examples`)
        assert set(r["checkpoint_examples"]) == {"6"} and np.isclose(np.mean(r["checkpoint_examples"]["6"]),
                                                                      r["checkpoints"]["6"], atol=1e-4)
    for scaling, cp in m["part2"]["checkpoints"].items():  # spread across r = max - min of each rank's loss
        assert cp["steps"] == [6, 12] and set(cp["by_rank"]) == {"1", "8"}
        for i, step in enumerate(cp["steps"]):
            at = [v[i]["value"] for v in cp["by_rank"].values()]
            if None not in at:
                assert cp["spread"][i]["value"] == pytest.approx(max(at) - min(at))
                lo, hi = cp["spread"][i]["ci95"]
                assert 0 <= lo <= hi
            runs = [r for r in long if r["scaling"] in (scaling, "lora") and r["rank"] == 1]
            assert runs and all(str(step) in r["checkpoints"] for r in runs)
    near = [r for r in records if r["task"] == "minilm" and r["rank"] == 1 and r["scaling"] == "lora"
            and r["steps"] == 6]
    assert {r["seed"] for r in near} == {0, 1}  # 2 seeds near the optimum, 1 (far_seeds) elsewhere
    md = (quick / f"{STEM}.md").read_text()
    assert "slope of log best-LR" in md and "Placement" in md and "LoRA+" in md and "[" in md
    assert "spread across r" in md and "best reachable loss of each group" in md
    for plot in alpha_v2_plots.PLOTS:
        assert (quick / f"{STEM}_minilm_{plot}.png").read_bytes().startswith(PNG)


@pytest.mark.assets
def test_resume_makes_only_missing_runs(quick, tmp_path):
    lines = (quick / f"{STEM}.jsonl").read_text().splitlines()
    (tmp_path / f"{STEM}.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    argv = ["--quick", "--out_dir", str(tmp_path), "--resume", "--parts", "4", "--tasks", "minilm"]
    result = v2.run_study(parse_config(v2.Config, argv, quick=v2.QUICK))
    assert result["made"] <= 2  # at most the two lost runs (part 4's, the last made)
    with pytest.raises(ValueError, match="seeds"):
        v2.run_study(parse_config(v2.Config, argv + ["--seeds", "5", "6"], quick=v2.QUICK))


def test_plan_scouts_then_reseeds_near_the_best():
    c = v2.Config()
    assert v2.plan({}, 0, c) == {(j, s) for j in (-2, 0, 2) for s in (0, 1)}
    loss = lambda j: 0.5 + 0.01 * (j - 1.2) ** 2  # noqa: E731  best at j = 1, between scouting points
    results = {j: {s: loss(j) for s in (0, 1)} for j in (-2, 0, 2)}
    assert v2.plan(results, 0, c) == {(4, 0), (4, 1)}  # the best scouted point, j = 2, is on the edge: grow
    results[4] = {s: loss(4) for s in (0, 1)}
    assert v2.plan(results, 0, c) == {(j, s) for j in (1, 2, 3) for s in (0, 1, 2, 3)} - {(2, 0), (2, 1)}
    for _ in range(5):
        for j, s in v2.plan(results, 0, c):
            results.setdefault(j, {})[s] = loss(j)
    assert v2.plan(results, 0, c) == set()  # done, around the true best j = 1
    assert all(len(results[j]) == 4 for j in (0, 1, 2)) and all(len(results[j]) >= 2 for j in (-1, 3))
    edge = {j: {s: 0.5 - 0.01 * j for s in (0, 1)} for j in (-2, 0, 2)}  # still falling at the top: grow
    assert v2.plan(edge, 0, c) == {(4, 0), (4, 1)}
    with pytest.raises(ValueError, match="parts"):
        v2.groups(c, 6, "minilm")


def test_divergence_rule():
    assert diverged(0.69, 0.70) and diverged(0.69, None) and diverged(0.69, float("nan"))
    assert diverged(0.69, float("inf")) and not diverged(0.69, 0.69) and not diverged(0.69, 0.5)


def _group(best_lr: float, draws: Draws, rng, lrs, noise=0.02):
    """Per-example losses 0.3 + (log10 lr - log10 best)^2 + per-seed and per-example noise."""
    points = []
    for seed in draws.seeds:
        shift = rng.normal(0, noise)
        for lr in lrs:
            base = 0.3 + (np.log10(lr) - np.log10(best_lr)) ** 2 + shift
            points.append((lr, seed, base + rng.normal(0, noise, draws.example_w.shape[1])))
    return points


def test_bootstrap_interval_of_a_slope_and_a_ratio_covers_the_truth():
    rng, lrs = np.random.default_rng(1), list(np.logspace(-4, -1, 19))
    draws = Draws((0, 1, 2, 3), 200, n_boot=400, rng_seed=0)
    ranks = [1, 8, 64]
    fits = [Fit(_group(3e-3 * r ** -0.5, draws, rng, lrs), draws) for r in ranks]
    est = slope(ranks, np.array([f.best_lr for f in fits]))
    lo, hi = interval(slope(ranks, np.stack([f.best_lr_boot for f in fits])))
    assert lo < -0.5 < hi and hi - lo < 0.2 and abs(est + 0.5) < 0.05
    full = Fit(_group(3e-4, draws, rng, lrs), draws)
    lo, hi = interval(fits[1].best_lr_boot / full.best_lr_boot)
    truth = 3e-3 * 8 ** -0.5 / 3e-4
    assert lo < truth < hi and hi / lo < 1.5
    assert slope([1, 8, 64], np.array([1e-3, 1e-3, 1e-3])) == pytest.approx(0.0, abs=1e-12)


def test_fit_counts_diverged_runs_and_keeps_sparse_points():
    draws = Draws((0, 1, 2, 3), 3, n_boot=50, rng_seed=0)
    ones = np.ones(3)
    points = [(1e-3, s, 0.5 * ones) for s in (0, 1)] + [(2e-3, s, 0.4 * ones) for s in (0, 1, 2, 3)]
    points += [(4e-3, 0, 0.1 * ones), (4e-3, 1, None)]  # one seed diverged: the point cannot be best
    f = Fit(points, draws)
    assert f.best_index == 1 and np.isinf(f.loss[2]) and f.n_seeds.tolist() == [2, 4, 2]
    assert np.isfinite(f.best_loss_boot).all()  # a replicate drawing neither seed of a point keeps its mean
    assert f.per_seed[2, 1] == np.inf and np.isnan(f.per_seed[0, 3])


def test_vertex_of_a_parabola_and_edges():
    x = np.log10([1e-4, 1e-3, 1e-2])
    y = (x - np.log10(2e-3)) ** 2
    assert 10 ** vertex(x, y[None], np.array([1]))[0] == pytest.approx(2e-3)
    assert vertex(x, y[None], np.array([0]))[0] == x[0]  # an edge: the grid value


def test_scale_power_recovers_p_from_either_pair_of_scalings():
    ranks = np.array([1.0, 8.0, 64.0])
    scales = dict(lora=8 / ranks, rslora=np.sqrt(8 / ranks), none=np.ones(3))
    best = {k: 3e-3 * ranks ** 0.1 * v ** -0.45 for k, v in scales.items()}  # best LR ~ g(r) x scale^-0.45
    p, other = scale_power(ranks, best)
    assert other == "none" and p == pytest.approx(0.45)
    p, other = scale_power(ranks, {k: best[k] for k in ("lora", "rslora")})
    assert other == "rslora" and p == pytest.approx(0.45)
    boot = {k: np.stack([v, 2 * v], axis=1) for k, v in best.items()}  # (R, B): a common factor leaves p
    assert scale_power(ranks, boot)[0] == pytest.approx([0.45, 0.45])

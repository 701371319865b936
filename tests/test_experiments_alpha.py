"""experiments.alpha_over_r: the --quick study end to end and resumed, and the analysis helpers on known answers."""

import json
import math

import numpy as np
import pytest
from tqdm import tqdm

from experiments import alpha_over_r, parse_config, study, study_report

PNG = b"\x89PNG\r\n\x1a\n"
QUICK_RUNS = (3 + 1) * 3  # r = 1 under 3 scalings, r = 8 once for all three (scale 1), x 3 LRs x 1 seed
STEM = "alpha_over_r_quick"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    assert alpha_over_r.main(["--quick", "--out_dir", str(out)]) == 0
    return out


@pytest.mark.assets
def test_quick_writes_json_md_png(quick):
    result = json.loads((quick / f"{STEM}.json").read_text())  # strict JSON: no NaN or Infinity
    assert result["ran"] == QUICK_RUNS and result["traces"] == 4  # one compile per (r, scale), shared by 3 LRs
    s = result["tasks"]["minilm"]
    assert len(s["runs"]) == QUICK_RUNS
    rows = {(r["scaling"], r["rank"]): r for r in s["rows"]}
    assert set(rows) == {(a, r) for a in alpha_over_r.SCALINGS for r in (1, 8)}
    assert [rows[a, 1]["scale"] for a in alpha_over_r.SCALINGS] == [8, round(math.sqrt(8), 12), 1]
    assert rows["lora", 8]["losses"] == rows["rslora", 8]["losses"] == rows["none", 8]["losses"]  # the shared runs
    assert {rows[a, 8]["scale"] for a in alpha_over_r.SCALINGS} == {1}
    for row in s["rows"]:
        assert row["lrs"] == [1e-3, 1e-2, 1e-1] and row["best_lr"] in row["lrs"]
        assert len(row["norms"]) == 12 and all(n > 0 for n in row["norms"].values())  # 6 layers x query, value
        assert 0 <= row["accuracy"] <= 1 and np.isfinite(row["eval_loss"])
    assert set(s["scalings"]) == set(alpha_over_r.SCALINGS) and s["flattest"] in alpha_over_r.SCALINGS
    md = (quick / f"{STEM}.md").read_text()
    assert "| scaling | r | scale | best LR |" in md and "max/min" in md and "Flattest on minilm" in md
    for plot in study_report.PLOTS:
        assert (quick / f"{STEM}_minilm_{plot}.png").read_bytes().startswith(PNG)
    lines = (quick / f"{STEM}.jsonl").read_text().splitlines()
    assert len(lines) == 1 + QUICK_RUNS and "config" in json.loads(lines[0])


@pytest.mark.assets
def test_resume_skips_finished_runs(quick, tmp_path):
    lines = (quick / f"{STEM}.jsonl").read_text().splitlines()
    kept = lines[:-2]  # the last group (r=8, all scalings) lost its last two LRs
    (tmp_path / f"{STEM}.jsonl").write_text("\n".join(kept) + '\n{"task": "minilm", "ra')  # and a torn line
    config = parse_config(alpha_over_r.Config, ["--quick", "--out_dir", str(tmp_path), "--resume"],
                          quick=alpha_over_r.QUICK)
    result = alpha_over_r.run_study(config)
    assert result["ran"] == 2 and result["traces"] == 1
    after = (tmp_path / f"{STEM}.jsonl").read_text().splitlines()
    assert after[: len(kept)] == kept and len(after) == 1 + QUICK_RUNS
    other = parse_config(alpha_over_r.Config, ["--quick", "--out_dir", str(tmp_path), "--resume", "--steps", "11"],
                         quick=alpha_over_r.QUICK)
    with pytest.raises(ValueError, match="steps"):
        alpha_over_r.run_study(other)


@pytest.mark.assets
def test_stacked_runs_equal_the_sequential_ones(quick, tmp_path):
    """--stacked trains the grid of a seed in one program (jlora.multi) and gives the sequential records: here the
    4 runs at lr = 1e-2 (r = 1 at scales 8, 2.83, 1 padded to r = 8, and r = 8), to 1e-5. (Not at lr = 0.1, scale
    8, which is chaotic: there a 1-ulp nudge of the LoRA init changes the sequential run's own losses by 4e-4 and
    its update norms by 4%, so the rounding of a batched matmul, summed in another order, is not held to 1e-5.)"""
    argv = ["--quick", "--stacked", "--lr_min", "1e-2", "--n_lr", "1"]  # the quick grid's middle LR alone
    config = parse_config(alpha_over_r.Config, argv, quick=alpha_over_r.QUICK)
    log = study.Log(tmp_path / "stacked.jsonl", {}, resume=False)
    alpha_over_r.Group.traces = 0
    assert alpha_over_r.run_task(alpha_over_r.minilm_task(config), config, log, tqdm(total=0, disable=True)) == 4
    assert alpha_over_r.Group.traces == 1  # one program for the 4 runs
    sequential = [json.loads(line) for line in (quick / f"{STEM}.jsonl").read_text().splitlines()[1:]]
    sequential = {(r["task"], r["rank"], r["scale"], r["lr"], r["seed"]): r for r in sequential}
    assert set(log.runs) == {k for k in sequential if k[3] == 1e-2}
    for key, got in log.runs.items():
        want = sequential[key]
        np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([got[f] for f in ("eval_loss", "accuracy", "train_loss")],
                                   [want[f] for f in ("eval_loss", "accuracy", "train_loss")], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([got["norms"][p] for p in sorted(want["norms"])],
                                   [want["norms"][p] for p in sorted(want["norms"])], rtol=1e-5)
        assert got["steps"] == want["steps"] and got["diverged"] == want["diverged"] is False


def test_scalings_meet_at_ref_rank():
    for rank, want in ((1, (8, math.sqrt(8), 1)), (8, (1, 1, 1)), (64, (1 / 8, 1 / math.sqrt(8), 1))):
        got = [alpha_over_r.lora_config(s, rank, ref_rank=8, targets=("query",)).scale_for("query")
               for s in alpha_over_r.SCALINGS]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    with pytest.raises(ValueError, match="scaling"):
        alpha_over_r.lora_config("sqrt", 4, ref_rank=8, targets=("query",))


def test_best_index_interior_refine():
    assert study.best_index([0.5, np.nan, 0.3, np.inf, 0.4]) == 2
    assert study.is_interior(2, 5) and not study.is_interior(0, 5) and not study.is_interior(4, 5)
    lrs = [1e-4, 1e-3, 1e-2]
    losses = [(np.log10(lr) - np.log10(2e-3)) ** 2 for lr in lrs]  # a parabola in log lr, vertex at 2e-3
    assert math.isclose(study.refine(lrs, losses, 1), 2e-3, rel_tol=1e-9)
    assert study.refine(lrs, [0.1, 0.2, 0.3], 0) == 1e-4  # on the edge: the grid value, no extrapolation


def test_spread_and_slope_of_a_power_law():
    ranks = [1, 2, 4, 8, 16, 32, 64]
    assert math.isclose(study.fit_slope(ranks, [3e-3 * r ** -0.5 for r in ranks]), -0.5)
    assert math.isclose(study.spread([3e-3 * r ** -0.5 for r in ranks]), 8.0)
    assert study.fit_slope(ranks, [1e-3] * 7) == pytest.approx(0.0, abs=1e-12) and study.spread([1e-3] * 7) == 1


def synthetic_runs(slopes: dict, ranks, grid: study.Grid, seeds=(0, 1)):
    """Held-out loss 0.3 + (log10 lr - log10 best)^2 with best = 1e-3 * r ** slope; scale = a distinct tag."""
    runs = []
    for i, slope in enumerate(slopes.values()):
        for r in ranks:
            for k in range(grid.n_lr):
                lr = grid.lr(k)
                loss = 0.3 + (np.log10(lr) - np.log10(1e-3 * r ** slope)) ** 2
                runs += [dict(task="t", rank=r, scale=float(i), lr=lr, seed=s, eval_loss=loss, accuracy=0.5,
                              train_loss=loss, norms={"w": 1.0}) for s in seeds]
    return runs


def test_summarise_known_answers():
    ranks = (1, 4, 16, 64)
    grid = study.Grid(ranks, (0, 1), 1e-5, 4, 17, 10)  # 1e-5 .. 1e-1, four points per decade
    slopes = {"lora": 0.0, "rslora": -0.5, "none": -1.0}
    groups = {(s, r): float(i) for i, s in enumerate(slopes) for r in ranks}
    s = study.summarise(synthetic_runs(slopes, ranks, grid), groups, grid)
    for scaling, slope in slopes.items():
        m = s["scalings"][scaling]
        assert m["slope_refined"] == pytest.approx(slope, abs=1e-9)  # the parabola is exact in log lr
        assert m["ratio_refined"] == pytest.approx(64 ** -slope, rel=1e-9) and m["edges"] == []
        assert m["slope"] == pytest.approx(slope, abs=0.1)  # the grid optimum, quantised to 10 ** 0.25
        assert m["slope_seeds"] == [m["slope"]] * 2  # the seeds agree here
    assert s["flattest"] == "lora"
    narrow = study.Grid(ranks, (0, 1), 1e-4, 4, 9, 10)  # 1e-4 .. 1e-2: "none" wants 6.3e-5 at r = 16, 1.6e-5 at 64
    s = study.summarise(synthetic_runs({"none": -1.0}, ranks, narrow), {("none", r): 0.0 for r in ranks}, narrow)
    assert s["scalings"]["none"]["edges"] == [16, 64]
    assert [r["interior"] for r in s["rows"]] == [True, True, False, False]
    assert [r["best_lr"] for r in s["rows"]][2:] == [1e-4, 1e-4]


def test_mean_loss_diverged_and_missing():
    runs = {("t", 1, 1.0, 0.1, 0): {"eval_loss": 0.4}, ("t", 1, 1.0, 0.1, 1): {"eval_loss": None}}
    assert study.mean_loss(runs, ("t", 1, 1.0, 0.1), (0,)) == 0.4
    assert study.mean_loss(runs, ("t", 1, 1.0, 0.1), (0, 1)) == np.inf  # a diverged seed
    assert np.isnan(study.mean_loss(runs, ("t", 1, 1.0, 0.1), (0, 2)))  # a missing seed


def test_log_resume_takes_added_seeds_only(tmp_path):
    path, config = tmp_path / "s.jsonl", {"seeds": [0], "steps": 5, "resume": True, "out_dir": "x"}
    record = dict(task="t", rank=2, scale=1.0, lr=0.1, seed=0, eval_loss=0.5)
    study.Log(path, config, resume=False).append(record)
    grown = study.Log(path, {**config, "seeds": [0, 1]}, resume=True, growable=("seeds",))
    assert list(grown.runs) == [("t", 2, 1.0, 0.1, 0)]  # the finished seed is kept, seed 1 is left to run
    assert json.loads(path.read_text().splitlines()[0])["config"]["seeds"] == [0, 1]  # the header says so now
    with pytest.raises(ValueError, match=r"\['seeds'\].*seeds may be added"):  # dropping one is another study
        study.Log(path, {**config, "seeds": [1]}, resume=True, growable=("seeds",))
    with pytest.raises(ValueError, match=r"\['seeds'\]"):  # and only fields named growable may grow
        study.Log(path, {**config, "seeds": [0, 1, 2]}, resume=True)

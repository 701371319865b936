"""The statistics of experiments.alpha_over_r_v2: the divergence rule, and bootstrap 95 % intervals over seeds and
held-out examples for best learning rates and the slopes and ratios built from them.

    diverged(initial=0.69, final=0.71)                     # True: a run that ends above where it started
    fit = Fit(points, rng_seed=0, n_boot=1000)             # points: [(lr, seed, per-example losses | None)], one group
    fit.best_lr, fit.best_lr_boot                          # the estimate, and its (n_boot,) bootstrap replicates
    interval(np.log(a.best_lr_boot / b.best_lr_boot))      # a 95 % interval of any statistic of the replicates

A replicate draws multinomial weights over the seeds (`n_seeds` draws from the study's seed set, shared by every
group of a task: comparisons are paired) and over the held-out examples (likewise shared), and recomputes every
group's loss-vs-LR curve: the loss at a learning rate is the weighted mean over its seeds of each seed's weighted
mean over examples; a point whose seeds all have weight 0 in a replicate (a point run with 2 seeds of 4) keeps its
unweighted mean over its seeds. A diverged run counts as +inf (the point cannot be best) whenever its seed has
weight. The best LR is the vertex of the parabola in log10(lr) through the lowest point and its neighbours
(`vertex`; the grid value on an edge). Intervals are the 2.5 and 97.5 percentiles of the replicates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def diverged(initial: float, final: float | None) -> bool:
    """The study's rule: a run diverged when its final held-out loss is not finite (None, NaN, inf) or is above the
    initial (untrained) held-out loss; a run that learnt nothing and ends exactly at it has not diverged."""
    return final is None or not np.isfinite(final) or final > initial


def vertex(x: np.ndarray, y: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Vectorised over rows: x (P,) sorted log10 learning rates, y (B, P) losses, i (B,) the index of each row's
    lowest loss -> (B,) the vertex of the parabola through points i-1, i, i+1, clipped to [x[i-1], x[i+1]]; x[i] on
    an edge, when a neighbour is not finite, or when the three points are collinear."""
    n, rows = len(x), np.arange(len(i))
    out = x[i].astype(np.float64)
    inner = (i > 0) & (i < n - 1)
    lo, hi = np.clip(i - 1, 0, n - 1), np.clip(i + 1, 0, n - 1)
    x0, x1, x2 = x[lo], x[i], x[hi]
    y0, y1, y2 = y[rows, lo], y[rows, i], y[rows, hi]
    with np.errstate(all="ignore"):
        den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
        v = x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / den
    ok = inner & np.isfinite(y0) & np.isfinite(y2) & np.isfinite(v) & (den != 0)
    out[ok] = np.clip(v[ok], x0[ok], x2[ok])
    return out


def interval(samples, level: float = 0.95) -> list[float | None]:
    """[low, high]: the percentile interval of the finite bootstrap replicates (None, None when there are none)."""
    s = np.asarray(samples, np.float64)
    s = s[np.isfinite(s)]
    if not s.size:
        return [None, None]
    return [float(np.percentile(s, 50 * (1 - level))), float(np.percentile(s, 50 * (1 + level)))]


class Draws:
    """The bootstrap weights of one task: `seed_w` (n_boot, n_seeds) and `example_w` (n_boot, n_examples), row 0
    of neither used (`Fit` computes the estimate with unit weights)."""

    def __init__(self, seeds: Sequence[int], n_examples: int, *, n_boot: int, rng_seed: int = 0):
        rng = np.random.default_rng(rng_seed)
        self.seeds = list(seeds)
        self.seed_w = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), size=n_boot).astype(float)
        self.example_w = rng.multinomial(n_examples, np.full(n_examples, 1 / n_examples), size=n_boot) / n_examples


class Fit:
    """The loss-vs-LR curve of one group and its best LR, with bootstrap replicates (see the module docstring).

    points: [(lr, seed, per-example held-out losses (n,) or None for a diverged run)]; draws: the task's `Draws`.
    Attributes: lrs (P,) sorted; loss (P,) the point estimate (mean over seeds; inf when a seed diverged); n_seeds
    (P,); per_seed (P, S) each run's held-out loss (NaN not run, inf diverged); best_lr,
    best_loss (floats: the vertex and the lowest point's loss); best_lr_boot, best_loss_boot
    (n_boot,); interior (the lowest point has a neighbour each side)."""

    def __init__(self, points: Sequence[tuple], draws: Draws):
        self.lrs = np.array(sorted({p[0] for p in points}), np.float64)
        seeds, n_ex = draws.seeds, draws.example_w.shape[1]
        P, S = len(self.lrs), len(seeds)
        ex, have, div = np.zeros((P, S, n_ex)), np.zeros((P, S), bool), np.zeros((P, S), bool)
        for lr, seed, losses in points:
            p, s = int(np.searchsorted(self.lrs, lr)), seeds.index(seed)
            have[p, s] = True
            if losses is None:
                div[p, s] = True
            else:
                ex[p, s] = losses
        self.n_seeds = have.sum(1)
        self.per_seed = np.where(have, np.where(div, np.inf, ex.mean(-1)), np.nan)  # (P, S): each run's mean
        x = np.log10(self.lrs)
        est = self._curves(ex, have, div, np.ones((1, S)), np.full((1, n_ex), 1 / n_ex))
        boot = self._curves(ex, have, div, draws.seed_w, draws.example_w)
        self.loss = est[0]
        i0, ib = best(est), best(boot)
        self.best_index, self.interior = int(i0[0]), bool(0 < i0[0] < P - 1)
        self.best_lr = float(10 ** vertex(x, est, i0)[0])
        self.best_loss = float(est[0, i0[0]])
        self.best_lr_boot = 10 ** vertex(x, boot, ib)
        self.best_loss_boot = boot[np.arange(len(ib)), ib]
        self.best_index_boot = ib

    @staticmethod
    def _curves(ex, have, div, seed_w, example_w) -> np.ndarray:
        """(B, P): per replicate, the loss at each LR (see the module docstring)."""
        per_seed = np.einsum("psn,bn->bps", ex, example_w)  # (B, P, S)
        w = seed_w[:, None, :] * have[None]  # (B, P, S)
        fallback = w.sum(-1, keepdims=True) == 0
        w = np.where(fallback, have[None].astype(float), w)
        with np.errstate(all="ignore"):
            curve = (w * per_seed).sum(-1) / w.sum(-1)
        curve[(w * div[None]).sum(-1) > 0] = np.inf
        curve[w.sum(-1) == 0] = np.nan
        return curve


def best(curves: np.ndarray) -> np.ndarray:
    """(B,) index of each row's lowest finite value (0 when none is finite)."""
    return np.argmin(np.where(np.isfinite(curves), curves, np.inf), axis=-1)


def slope(ranks: Sequence[float], lrs: np.ndarray) -> np.ndarray:
    """Least-squares slope of log(lr) on log(r), vectorised: lrs (R,) or (R, B) -> () or (B,)."""
    x = np.log(np.asarray(ranks, np.float64))
    y = np.log(np.asarray(lrs, np.float64))
    xc = x - x.mean()
    return np.tensordot(xc, y - y.mean(0), axes=(0, 0)) / (xc @ xc)


# the exponent e of each scaling's scale ~ r^e (alpha/r, alpha/sqrt(r), none)
SCALE_EXPONENT = dict(lora=-1.0, rslora=-0.5, none=0.0)


def scale_power(ranks: Sequence[float], best_lrs: dict) -> tuple[np.ndarray, str]:
    """p in "the best LR depends on lr x scale^p", from the slopes of log best-LR on log r under alpha/r and one other
    scaling (none's when given, else alpha/sqrt(r)'s): with best LR ~ g(r) x scale^-p and scale ~ r^e, slope(a) -
    slope(b) = p (e_b - e_a). best_lrs: scaling -> (R,) or (R, B) best LRs at `ranks` -> (p: () or (B,), the other)."""
    other = next(k for k in ("none", "rslora") if k in best_lrs)
    gap = slope(ranks, best_lrs["lora"]) - slope(ranks, best_lrs[other])
    return gap / (SCALE_EXPONENT[other] - SCALE_EXPONENT["lora"]), other


def summary(estimate, boot) -> dict:
    """{"value": the estimate, "ci95": [low, high]} for JSON."""
    value = float(estimate)
    return dict(value=value if np.isfinite(value) else None, ci95=interval(boot))

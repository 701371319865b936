"""The models, data and single runs of experiments.alpha_over_r_v2: MiniLM on fresh tweets, SmolLM2 on Shakespeare
(or tiny random models of the same architectures for `--quick`), adapter placements at matched parameter counts, and
one training run (LoRA, LoRA+ or full fine-tuning) with per-example held-out losses.

Every run: Adam (optax.adam: no weight decay or clipping), 6 % warm-up then linear decay (experiments.nlu.schedule),
the learning rate a traced argument (one compile per group). LoRA runs train the pairs through `jlora.loraplus`
(ratio 1 is plain Adam: lora_b at ratio x the rate of lora_a); full runs train every weight, the classifier included.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from experiments import count_params, data
from experiments.alpha_over_r import lora_config
from experiments.alpha_v2_stats import diverged
from experiments.nlu import run_keys, schedule
from experiments.study import num, scale_of
from jlora import assets, models
from jlora.tokenizers import load_tokenizer

# adapter placements per architecture: attention q and v, the MLP, every linear map of the blocks
BERT_PLACES = dict(qv=("query", "value"), mlp=r".*/layer/\d+/(intermediate|output)/dense/kernel",
                   all=r".*/layer/\d+/(attention/self/(query|key|value)|attention/output/dense|intermediate/dense"
                       r"|output/dense)/kernel")
LLAMA_PLACES = dict(qv=("q_proj", "v_proj"), mlp=("gate_proj", "up_proj", "down_proj"),
                    all=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


@dataclasses.dataclass(frozen=True)
class Task:
    """A model and its data. `apply(variables, *inputs)` -> logits; `variables(seed)`; `batches(seed, steps)`
    yields (inputs, targets), fresh examples each step when `fresh`; `held_out(variables)` -> (per-example loss
    (n,) float64, per-example accuracy (n,)); `per_example(logits, targets)` -> (losses, accuracy) of a batch."""

    name: str
    apply: Callable
    variables: Callable[[int], Any]
    example: tuple
    places: dict
    batches: Callable[[int, int], Iterator[tuple]]
    per_example: Callable
    held_out: Callable
    n_test: int


def _evaluator(apply, per_example, inputs: tuple, targets, batch: int) -> Callable:
    if len(targets) % batch:
        raise ValueError(f"{len(targets)} held-out examples are not a multiple of the eval batch {batch}")
    fn = jax.jit(lambda v, *chunk: per_example(apply(v, *chunk[:-1]), chunk[-1]))

    def held_out(v):
        out = [fn(v, *(x[i: i + batch] for x in (*inputs, targets))) for i in range(0, len(targets), batch)]
        return tuple(np.concatenate([np.asarray(o[k], np.float64) for o in out]) for k in range(2))

    return held_out


def _classify(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels), (jnp.argmax(logits, -1) == labels) * 1.0


def _next_token(logits, tokens):  # per window: mean next-token loss and accuracy over its seq - 1 predictions
    logits, labels = logits[:, :-1], tokens[:, 1:]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return xent.mean(-1), (jnp.argmax(logits, -1) == labels).mean(-1)


def minilm(c, tiny: bool = False) -> Task:
    """all-MiniLM-L6-v2 (tiny: a 2-layer random BERT with its tokenizer), frozen pooler and seed's classifier."""
    path = assets.fetch("minilm", progress=False)
    n_train = c.minilm_batch * max(c.minilm_horizons)  # fresh data: one pass, no example twice
    split, tokenizer = data.tweets(n_train=n_train, n_test=c.minilm_test), load_tokenizer(path)
    train, test = (data.encode(tokenizer, s, max_len=c.max_len) for s in (split.train, split.test))
    if tiny:
        module = models.BertForSequenceClassification(models.BertConfig(hidden_size=32, num_hidden_layers=2,
                                                                        num_attention_heads=2, intermediate_size=64,
                                                                        max_position_embeddings=64))
        base = module.init(jax.random.key(7), train.ids[:1], train.mask[:1])
        load = functools.cache(lambda seed: module.init(run_keys(seed)["head"], train.ids[:1], train.mask[:1]) | {
            "params": base["params"] | {"classifier": module.init(run_keys(seed)["head"], train.ids[:1],
                                                                  train.mask[:1])["params"]["classifier"]}})
    else:
        module = models.from_pretrained(path, num_labels=2, key=run_keys(0)["head"])[0]
        load = functools.cache(lambda seed: models.from_pretrained(path, num_labels=2, key=run_keys(seed)["head"])[1])

    def batches(seed, steps):  # the seed's permutation of the n_train tweets; a shorter run reads its head
        for idx in data.take(len(train), c.minilm_batch, steps, run_keys(seed)["order"]):
            yield (train.ids[idx], train.mask[idx]), train.labels[idx]

    return Task("minilm", module.apply, load, (train.ids[:1], train.mask[:1]), BERT_PLACES, batches, _classify,
                _evaluator(module.apply, _classify, (test.ids, test.mask), test.labels, c.eval_batch), len(test))


def smollm2(c, tiny: bool = False) -> Task:
    """SmolLM2-135M (GGUF; tiny: a 2-layer random Llama with its tokenizer) on Shakespeare, one play held out."""
    gguf = assets.fetch("smollm2", progress=False)
    train, test = data.shakespeare(load_tokenizer(gguf), seq=c.lm_seq, held_out="tempest", n_held=c.lm_test)
    if tiny:
        module = models.Llama(models.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        variables = module.init(jax.random.key(7), train[:1])
    else:
        module, variables = models.from_pretrained(gguf)

    def batches(seed, steps):
        for idx in data.take(len(train), c.lm_batch, steps, run_keys(seed)["order"]):
            yield (train[idx],), train[idx]

    return Task("smollm2", module.apply, lambda seed: variables, (train[:1],), LLAMA_PLACES, batches, _next_token,
                _evaluator(module.apply, _next_token, (test,), test, c.lm_eval_batch), len(test))


def adapter_config(task: Task, group: dict, ref_rank: int) -> jlora.LoraConfig:
    return lora_config(group["scaling"], group["rank"], ref_rank=ref_rank, targets=task.places[group["placement"]])


def params_per_rank(task: Task, placement: str) -> int:
    """Trainable LoRA parameters per unit of rank at `placement` (shapes only: nothing is computed)."""
    cfg = jlora.LoraConfig(rank=1, alpha=1.0, targets=task.places[placement])
    shapes = jax.eval_shape(lambda v: jlora.lora_transform(task.apply, cfg).init(v, *task.example,
                                                                                   key=jax.random.key(0))[1],
                            task.variables(0))
    return count_params(shapes)


def matched_ranks(per_rank: dict[str, int], reference: str, rank: int) -> dict[str, int]:
    """The rank per placement whose parameter count is nearest that of `reference` at `rank`."""
    budget = per_rank[reference] * rank
    return {p: max(1, round(budget / n)) for p, n in per_rank.items()}


class Runner:
    """Trains the runs of a task: one jitted step per group (the LR traced), initial losses cached per seed."""

    def __init__(self, task: Task, config):
        self.task, self.c, self.steps, self.initial = task, config, {}, {}
        self.traces = 0

    def initial_loss(self, seed: int) -> float:
        if seed not in self.initial:
            self.initial[seed] = float(self.task.held_out(self.task.variables(seed))[0].mean())
        return self.initial[seed]

    def _step(self, group: dict, lcfg):
        key = tuple(sorted(group.items()))
        if key in self.steps:
            return self.steps[key]
        task, shape = self.task, schedule(self.c, lr=1.0, total_steps=group["steps"])
        lora = None if lcfg is None else jlora.lora_transform(task.apply, lcfg, strict=True)

        def optimizer(lr):
            rate = lambda count: lr * shape(count)  # noqa: E731
            return optax.adam(rate) if lora is None else jlora.loraplus(optax.adam, rate, ratio=group["ratio"])

        def step(frozen, trainable, opt_state, lr, inputs, targets):
            self.traces += 1

            def loss(t):
                logits = task.apply(t, *inputs) if lora is None else lora.apply(frozen, t, *inputs)
                return task.per_example(logits, targets)[0].mean()

            value, grads = jax.value_and_grad(loss)(trainable)
            updates, opt_state = optimizer(lr).update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, value

        self.steps[key] = (jax.jit(step), optimizer, lora)
        return self.steps[key]

    def run(self, group: dict, lr: float, seed: int, checkpoints=()) -> dict:
        """One run of `group` (task, method, placement, scaling, rank, ratio, steps) at (lr, seed) -> its record."""
        start, task = time.perf_counter(), self.task
        lcfg = None if group["method"] == "full" else adapter_config(task, group, self.c.ref_rank)
        step, optimizer, lora = self._step(group, lcfg)
        if lora is None:
            frozen, trainable = None, task.variables(seed)
        else:
            frozen, trainable = lora.init(task.variables(seed), *task.example, key=run_keys(seed)["lora"])
        variables = (lambda t: t) if lora is None else (lambda t: jlora.merge(frozen, t, lcfg))
        opt_state, losses, marks = optimizer(1.0).init(trainable), [], {}
        for i, (inputs, targets) in enumerate(task.batches(seed, group["steps"])):
            trainable, opt_state, loss = step(frozen, trainable, opt_state, np.float32(lr), inputs, targets)
            losses.append(loss)
            if i % 10 == 9 and not np.isfinite(float(loss)):
                break  # diverged: stop spending the budget on it
            if i + 1 in checkpoints and i + 1 < group["steps"]:
                mark = task.held_out(variables(trainable))[0]  # (n_test,) per-example losses
                marks[str(i + 1)] = None if not np.isfinite(mark).all() else mark
        losses = np.asarray(jax.device_get(losses), np.float64)
        train_s = time.perf_counter() - start
        finite = np.isfinite(losses).all() and all(np.isfinite(x).all() for x in jax.tree.leaves(trainable))
        ex, acc = task.held_out(variables(trainable)) if finite else (None, None)
        final = None if ex is None or not np.isfinite(ex).all() else float(ex.mean())
        initial = self.initial_loss(seed)
        means = {k: None if v is None else float(v.mean()) for k, v in marks.items()}
        if final is not None:
            means[str(len(losses))] = final
        return dict(group, lr=lr, seed=seed, scale=None if lcfg is None else scale_of(lcfg),
                    trainable=count_params(trainable),
                    initial_loss=initial, eval_loss=final, accuracy=None if acc is None else float(acc.mean()),
                    diverged=diverged(initial, final), train_loss=num(losses[-10:].mean()), steps_run=len(losses),
                    losses=[num(round(float(x), 5)) for x in losses], checkpoints=means,
                    checkpoint_examples={k: None if v is None else np.round(v, 4).tolist() for k, v in marks.items()},
                    examples=None if final is None else np.round(ex, 4).tolist(), train_s=train_s,
                    total_s=time.perf_counter() - start)

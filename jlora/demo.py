"""A one-minute tour of jlora on CPU: adapt a small frozen transformer with LoRA, checkpoint, merge.

    python -m jlora.demo      # what `make demo` runs; about 20-30 s on 2 CPU cores

The model is a 2-layer `jlora.models.gpt2.GPT2LMHeadModel` (Hugging Face names: fused `c_attn` q|k|v, `c_proj`,
`c_fc`; lm head tied to `wte`) with random, frozen weights. The task is next-token prediction on arithmetic
sequences `x[t+1] = x[t] + s (mod vocab)`, with a stride `s` drawn per sequence, so the model must attend to earlier
tokens to infer `s`. Only LoRA adapters
train (rank 8 on q and v of `c_attn`, loralib's MergedLinear `enable_lora=[True, False, True]`, and on `c_fc`).
Then the adapters are saved and reloaded, merged into plain variables, and the merged model is checked against the
factored one. Any failed check exits non-zero.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.models.gpt2 import GPT2Config, GPT2LMHeadModel


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Model, task and training settings of the demo."""

    n_layer: int = 2  # enough depth for attention to find the stride and an MLP to add it
    d_model: int = 64  # 4 heads * 16 dims
    n_head: int = 4
    vocab: int = 32  # tokens 0..31; sequences wrap around mod 32
    seq: int = 32  # 32 tokens per sequence, 31 predictions each
    max_stride: int = 4  # s in 1..4: only the first prediction is a guess, so the loss floor is ln(4) / 31 = 0.045
    embed_std: float = 0.3  # the frozen tied embedding must be large enough for confident logits (GPT-2's 0.02 caps
    # them near 1.3 at d_model 64, so no adapter could push the loss below about 3.3)
    batch: int = 32  # 32 sequences * 31 predictions = 992 targets per step
    rank: int = 8
    alpha: float = 16.0  # scale alpha / rank = 2
    steps: int = 200
    learning_rate: float = 1e-2  # adapters start at B = 0; a high rate suits the few steps
    log_every: int = 25
    seed: int = 0
    merge_atol: float = 1e-4  # |model.apply(merged) - lora.apply| must stay below this


def make_model(config: Config, example, key) -> tuple[GPT2LMHeadModel, dict]:
    """The frozen model and its random variables; the tied embedding `wte` redrawn from N(0, embed_std^2)."""
    model = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab, n_positions=config.seq, n_embd=config.d_model,
                                       n_layer=config.n_layer, n_head=config.n_head))
    key_init, key_wte = jax.random.split(key)
    variables = model.init(key_init, example)
    wte = variables["params"]["transformer"]["wte"]
    wte["embedding"] = config.embed_std * jax.random.normal(key_wte, wte["embedding"].shape, wte["embedding"].dtype)
    return model, variables


def make_batch(key, config: Config):
    """Arithmetic sequences mod vocab, int32 (batch, seq): a random start and a random stride in 1..max_stride."""
    k_start, k_stride = jax.random.split(key)
    start = jax.random.randint(k_start, (config.batch, 1), 0, config.vocab)
    stride = jax.random.randint(k_stride, (config.batch, 1), 1, config.max_stride + 1)
    return (start + stride * jnp.arange(config.seq)) % config.vocab


def next_token_loss(logits, tokens):
    """Mean cross entropy of `tokens[:, 1:]` given `logits[:, :-1]`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def max_abs_diff(a, b) -> float:
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in leaves)


def _progress(steps: int):
    """A tqdm bar when tqdm is installed (it is not a dependency) and stderr is a terminal, else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, desc="training", unit="step", leave=False) if sys.stderr.isatty() else None


def main(config: Config | None = None) -> int:
    config = config or Config()
    failures = []

    def check(ok: bool, message: str):
        print(("  ok    " if ok else "  FAIL  ") + message)
        if not ok:
            failures.append(message)

    key_data, key_eval = jax.random.split(jax.random.key(config.seed + 1))
    example = make_batch(key_data, config)
    model, variables = make_model(config, example, jax.random.key(config.seed))
    print(f"model: {config.n_layer}-layer GPT-2 (jlora.models.gpt2), n_embd={config.d_model}, vocab={config.vocab}, "
          f"seq={config.seq}; random weights, frozen")
    floor = math.log(config.max_stride) / (config.seq - 1)
    print(f"task: x[t+1] = x[t] + s mod {config.vocab}, stride s in 1..{config.max_stride} per sequence "
          f"(loss floor ln({config.max_stride}) / {config.seq - 1} = {floor:.3f})")

    # 1. LoRA on q and v of the fused c_attn (k left alone) and on c_fc
    lora_config = jlora.LoraConfig(rank=config.rank, alpha=config.alpha, targets=("c_attn", "c_fc"),
                                   fused={"c_attn": (True, False, True)})
    lora = jlora.lora_transform(model.apply, lora_config, strict=True)  # a non-factored consumer would be an error
    frozen, adapters = lora.init(variables, example, key=jax.random.key(config.seed + 2))
    print(f"\nLoRA rank {config.rank}, alpha {config.alpha:g} on c_attn (q, v of q|k|v) and c_fc:")
    for path, leaf in jax.tree_util.tree_leaves_with_path(adapters):
        print(f"  {'/'.join(str(k.key) for k in path):52s} {tuple(leaf.shape)}")
    n_base, n_train = count(variables), count(adapters)
    print(f"parameters: {n_train:,} trainable / {n_base + n_train:,} total "
          f"({100 * n_train / (n_base + n_train):.2f}%; the base's {n_base:,} stay frozen)")

    # 2. train the adapters only: the gradient is taken w.r.t. `adapters`, never w.r.t. the frozen weights
    optimizer = jlora.masked_optimizer(optax.adamw(config.learning_rate, weight_decay=0.0))
    opt_state = optimizer.init(adapters)

    @jax.jit
    def train_step(adapters, opt_state, key):
        tokens = make_batch(key, config)
        loss, grads = jax.value_and_grad(lambda a: next_token_loss(lora.apply(frozen, a, tokens), tokens))(adapters)
        updates, opt_state = optimizer.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    @jax.jit
    def eval_loss(adapters, tokens):
        return next_token_loss(lora.apply(frozen, adapters, tokens), tokens)

    held_out = make_batch(key_eval, config)
    before = float(eval_loss(adapters, held_out))
    print(f"\ntraining {config.steps} steps, adamw lr {config.learning_rate:g}; held-out loss before: {before:.4f}")
    bar, write = _progress(config.steps), print
    if bar is not None:
        write = bar.write
    start = time.perf_counter()
    for step, key in enumerate(jax.random.split(jax.random.key(config.seed + 3), config.steps), start=1):
        adapters, opt_state, loss = train_step(adapters, opt_state, key)
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{float(loss):.4f}")
        if step % config.log_every == 0 or step == 1:
            write(f"  step {step:4d}  train loss {float(loss):.4f}")
    if bar is not None:
        bar.close()
    after = float(eval_loss(adapters, held_out))
    print(f"held-out loss after: {after:.4f} ({time.perf_counter() - start:.1f} s)")
    check(after < 0.5 * before, f"the loss fell: {before:.4f} -> {after:.4f}")

    tokens = held_out[:1]
    predicted = np.asarray(jnp.argmax(lora.apply(frozen, adapters, tokens), axis=-1))[0]
    print(f"  sequence  {np.asarray(tokens)[0, :12].tolist()}\n  predicted {[None, *predicted[:11].tolist()]}")

    # 3. checkpoint the adapters alone, reload them
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapters"
        jlora.save_adapters(path, adapters, lora_config, variables=variables)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        print(f"\nsaved the adapters to {path} ({size:,} bytes)")
        restored, restored_config = jlora.load_adapters(path, variables=variables)
    check(restored_config == lora_config, "the reloaded config equals the saved one")
    same_tree = jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(adapters)
    check(same_tree and max_abs_diff(restored, adapters) == 0.0, "the reloaded adapters equal the trained ones")
    adapters = restored

    # 4. merge for inference: plain variables for the unmodified model
    merged = jlora.merge(frozen, adapters, lora_config)
    diff = float(jnp.max(jnp.abs(model.apply(merged, held_out) - lora.apply(frozen, adapters, held_out))))
    print(f"\nmerged: model.apply(jlora.merge(frozen, adapters, config)) vs lora.apply: max |diff| = {diff:.2e}")
    check(diff <= config.merge_atol, f"merged and factored outputs agree within {config.merge_atol:g}")
    check(float(next_token_loss(model.apply(merged, held_out), held_out)) < 0.5 * before,
          "the merged model keeps the trained loss")

    if failures:
        print(f"\ndemo FAILED: {len(failures)} check(s): {failures}")
        return 1
    print("\ndemo passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

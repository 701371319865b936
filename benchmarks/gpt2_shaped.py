"""A minimal GPT-2-shaped decoder in flax.linen, randomly initialised, for cost measurement and tests.

Parameter paths follow Hugging Face GPT-2 (`params/h_0/attn/c_attn/kernel`, `params/h_0/mlp/c_fc/kernel`, ...),
so PEFT-style targets `("c_attn", "c_proj", "c_fc")` select every dense kernel. Kernels are `(in, out)` like
HF's `Conv1D`; `c_attn` is the fused q, k, v projection `(d, 3d)`. Pre-LN blocks, learned positions, causal
attention, a 4x GELU MLP and an lm head tied to the token embedding (`Embed.attend`). No dropout.

    model = GPT2(GPT2Config(n_layer=2, d_model=64, n_head=4, seq=16, vocab=97))
    variables = model.init(jax.random.key(0), tokens)  # tokens: int32 (batch, seq)
    logits = model.apply(variables, tokens)  # (batch, seq, vocab)
    loss = next_token_loss(logits, tokens)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

DENSE_TARGETS = ("c_attn", "c_proj", "c_fc")  # every dense kernel: attn c_attn, attn c_proj, mlp c_fc, mlp c_proj


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """Shape of the model; the defaults are GPT-2 small (124M parameters) at a short context."""

    n_layer: int = 12  # GPT-2 small
    d_model: int = 768  # GPT-2 small; must divide by n_head
    n_head: int = 12  # 768 / 12 = 64 dims per head
    seq: int = 128  # the context the positions table covers (GPT-2 has 1,024; 128 keeps the benchmark light)
    vocab: int = 50257  # GPT-2's BPE vocabulary

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"GPT2Config.d_model={self.d_model} must be divisible by n_head={self.n_head}")


_init = nn.initializers.normal(stddev=0.02)  # GPT-2's init for every weight


class Attention(nn.Module):
    """Causal self-attention: fused `c_attn` (d, 3d) -> q, k, v; `c_proj` (d, d)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x):  # x: shape=(batch, seq, d)
        c = self.config
        b, t, d = x.shape
        hd = d // c.n_head
        qkv = nn.Dense(3 * d, kernel_init=_init, name="c_attn")(x)  # shape=(batch, seq, 3d)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k, v = (z.reshape(b, t, c.n_head, hd) for z in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(x.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, d)
        return nn.Dense(d, kernel_init=_init, name="c_proj")(y)


class MLP(nn.Module):
    """`c_fc` (d, 4d), GELU (tanh approximation, as GPT-2), `c_proj` (4d, d)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x):  # x: shape=(batch, seq, d)
        d = self.config.d_model
        h = nn.gelu(nn.Dense(4 * d, kernel_init=_init, name="c_fc")(x), approximate=True)
        return nn.Dense(d, kernel_init=_init, name="c_proj")(h)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.config, name="attn")(nn.LayerNorm(epsilon=1e-5, name="ln_1")(x))
        return x + MLP(self.config, name="mlp")(nn.LayerNorm(epsilon=1e-5, name="ln_2")(x))


class GPT2(nn.Module):
    """tokens int (batch, t <= seq) -> logits (batch, t, vocab)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        if tokens.shape[-1] > c.seq:
            raise ValueError(f"GPT2: {tokens.shape[-1]} tokens exceed the {c.seq} positions of GPT2Config.seq")
        wte = nn.Embed(c.vocab, c.d_model, embedding_init=_init, name="wte")
        wpe = nn.Embed(c.seq, c.d_model, embedding_init=_init, name="wpe")
        x = wte(tokens) + wpe(jnp.arange(tokens.shape[-1]))
        for i in range(c.n_layer):
            x = Block(c, name=f"h_{i}")(x)
        return wte.attend(nn.LayerNorm(epsilon=1e-5, name="ln_f")(x))


def next_token_loss(logits, tokens):
    """Mean cross entropy of predicting `tokens[:, 1:]` from `logits[:, :-1]`; logits (batch, t, vocab)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def dense_kernels(variables) -> dict[str, tuple[int, ...]]:
    """`{path: shape}` of every dense kernel (the leaves `DENSE_TARGETS` selects), '/'-joined paths."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        names = [str(getattr(k, "key", k)) for k in path]
        if len(names) >= 2 and names[-1] == "kernel" and names[-2] in DENSE_TARGETS:
            out["/".join(names)] = tuple(leaf.shape)
    return out

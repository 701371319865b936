"""GPT-2 in flax.linen, equivalent to transformers' `GPT2LMHeadModel`, with a key/value cache for decoding.

    model, variables = jlora.models.gpt2.from_pretrained("path/to/gpt2")   # config.json + safetensors
    logits = model.apply(variables, ids)                                   # shape=(batch, seq, vocab), float32
    logits, cache = model.apply(variables, ids, cache=model.init_cache(batch, max_len))

Parameter paths mirror the Hugging Face module names with '.' -> '/' (`params/transformer/h/0/attn/c_attn/kernel`
is `transformer.h.0.attn.c_attn.weight`), so PEFT-style targets work unchanged. HF's Conv1D stores its weight as
(in, out), as flax's Dense kernel does: no transpose. The fused c_attn stays ONE (d, 3d) kernel consumed by one
matmul, so `LoraConfig(targets=("c_attn",), fused={"c_attn": (True, False, True)})` is loralib's MergedLinear on q
and v. The head is tied to `wte` (`Embed.attend`) unless `tie_word_embeddings=False` (a bias-free `lm_head`).

Cache layout: `{"index": int32 scalar, "k": (n_layer, batch, max_len, n_head, head_dim), "v": same}`, as jlora's
Llama: the batch is axis 1 of every non-scalar leaf, which `jlora.models.generation.generate` (`cache_batch_axis=1`)
relies on to repeat and reorder beams.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jlora.models import hf, shards

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # HF's NewGELU: the tanh approximation
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyperparameters (the defaults are GPT-2 small's); `from_hf` reads a Hugging Face config.json.

    Dropout rates default to 0 here; `from_hf` takes the checkpoint's (0.1 for the released GPT-2s), active only
    with `deterministic=False`."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPT2Config.activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GPT2Config.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, config: dict) -> GPT2Config:
        """From a Hugging Face GPT-2 config.json dict; a ValueError for any other model type."""
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        if model_type != "gpt2" or any(not a.startswith("GPT2") for a in architectures):
            raise ValueError(f"not a GPT-2 checkpoint: model_type={model_type!r}, architectures={architectures}; "
                             f"jlora.models.gpt2 reads model_type 'gpt2' (GPT2LMHeadModel / GPT2Model)")
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {k: config.get(k, default) for k, default in fields.items() if k != "activation"}
        values["activation"] = config.get("activation_function", fields["activation"])
        return cls(**values)


def init_cache(config: GPT2Config, batch: int, max_len: int, dtype=jnp.float32) -> dict[str, Any]:
    """An empty key/value cache for `max_len` positions (at most `n_positions`).

    Returns `{"index": int32 scalar (the next position), "k": (n_layer, batch, max_len, n_head, head_dim),
    "v": same}`; the batch is axis 1 of every non-scalar leaf (jlora.models.generation relies on it)."""
    if not 1 <= max_len <= config.n_positions:
        raise ValueError(f"init_cache: max_len={max_len} must be in [1, n_positions={config.n_positions}]")
    shape = (config.n_layer, batch, max_len, config.n_head, config.head_dim)
    return {"index": jnp.zeros((), jnp.int32), "k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, kv, index, deterministic: bool):
        """x: (batch, seq, d); kv: None or the whole cache (k, v), each (n_layer, batch, max_len, h, hd)."""
        c = self.config
        batch, seq, d = x.shape
        qkv = nn.Dense(3 * d, dtype=self.dtype, name="c_attn")(x)  # shape=(batch, seq, 3 * d): q | k | v
        q, k, v = (t.reshape(batch, seq, c.n_head, c.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        q_pos = index + jnp.arange(seq)
        if kv is not None:
            kv = tuple(lax.dynamic_update_slice(full, new[None].astype(full.dtype), (self.layer, 0, index, 0, 0))
                       for full, new in zip(kv, (k, v)))  # in place: one buffer for all layers
            k, v = (full[self.layer].astype(self.dtype) for full in kv)  # shape=(batch, max_len, h, hd)
        mask = jnp.arange(k.shape[1])[None, :] <= q_pos[:, None]  # shape=(seq, keys)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if c.scale_attn_weights:
            scores = scores / jnp.sqrt(jnp.float32(c.head_dim))
        if c.scale_attn_by_inverse_layer_idx:
            scores = scores / float(self.layer + 1)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # shape=(batch, h, seq, keys)
        probs = nn.Dropout(c.attn_pdrop)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, d)
        out = nn.Dense(d, dtype=self.dtype, name="c_proj")(out)
        return nn.Dropout(c.resid_pdrop)(out, deterministic=deterministic), kv


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.config
        h = nn.Dense(c.n_inner or 4 * c.n_embd, dtype=self.dtype, name="c_fc")(x)
        h = nn.Dense(c.n_embd, dtype=self.dtype, name="c_proj")(ACTIVATIONS[c.activation](h))
        return nn.Dropout(c.resid_pdrop)(h, deterministic=deterministic)


class GPT2Block(nn.Module):
    config: GPT2Config
    layer: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, kv, index, deterministic: bool):
        eps = self.config.layer_norm_epsilon
        h = nn.LayerNorm(eps, dtype=self.dtype, name="ln_1")(x)
        h, kv = GPT2Attention(self.config, self.layer, self.dtype, name="attn")(h, kv, index, deterministic)
        x = x + h
        h = nn.LayerNorm(eps, dtype=self.dtype, name="ln_2")(x)
        return x + GPT2MLP(self.config, self.dtype, name="mlp")(h, deterministic), kv


class GPT2Layers(nn.Module):
    """The `h` container: blocks named "0", "1", ... as in Hugging Face's `h` ModuleList."""

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, kv, index, deterministic: bool):
        for i in range(self.config.n_layer):
            x, kv = GPT2Block(self.config, i, self.dtype, name=str(i))(x, kv, index, deterministic)
        return x, kv


class GPT2Model(nn.Module):
    """The `transformer`: embeddings, blocks, final LayerNorm. Returns hidden states (batch, seq, d)."""

    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.wte = nn.Embed(c.vocab_size, c.n_embd, dtype=self.dtype)
        self.wpe = nn.Embed(c.n_positions, c.n_embd, dtype=self.dtype)
        self.drop = nn.Dropout(c.embd_pdrop)
        self.h = GPT2Layers(c, self.dtype)
        self.ln_f = nn.LayerNorm(c.layer_norm_epsilon, dtype=self.dtype)

    def __call__(self, input_ids, kv, index, deterministic: bool):
        positions = index + jnp.arange(input_ids.shape[1])  # shape=(seq,)
        x = self.drop(self.wte(input_ids) + self.wpe(positions)[None], deterministic=deterministic)
        x, kv = self.h(x, kv, index, deterministic)
        return self.ln_f(x), kv

    def attend(self, h):
        return self.wte.attend(h)


class GPT2LMHeadModel(nn.Module):
    """transformers' GPT2LMHeadModel. `dtype` is the computation dtype (the parameters' comes from
    `from_pretrained`); logits are returned in float32."""

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, *, cache=None, deterministic: bool = True):
        """input_ids: int32 (batch, seq). Without `cache`: logits (batch, seq, vocab). With a cache from
        `init_cache`: `(logits, new_cache)`, the input placed at positions `cache["index"]` onwards.

        Dropout (rates from the config) needs `rngs={"dropout": key}` and `deterministic=False`. Writing past the
        cache's `max_len` cannot be caught under jit: those logits come back NaN."""
        c = self.config
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer (batch, seq), got {input_ids.dtype} {input_ids.shape}")
        seq = input_ids.shape[1]
        if cache is None:
            if seq > c.n_positions:
                raise ValueError(f"sequence length {seq} exceeds n_positions={c.n_positions}")
            kv, index = None, jnp.zeros((), jnp.int32)
        else:
            kv, index = (cache["k"], cache["v"]), cache["index"]
            max_len = cache["k"].shape[2]
            want = (c.n_layer, input_ids.shape[0], max_len, c.n_head, c.head_dim)
            if cache["k"].shape != want or cache["v"].shape != want or seq > max_len:
                raise ValueError(f"cache k/v {cache['k'].shape}/{cache['v'].shape} do not fit input_ids "
                                 f"{input_ids.shape}; expected (n_layer={c.n_layer}, batch={input_ids.shape[0]}, "
                                 f"max_len>={seq}, n_head={c.n_head}, head_dim={c.head_dim})")
        transformer = GPT2Model(c, self.dtype, name="transformer")
        h, kv = transformer(input_ids, kv, index, deterministic)  # shape=(batch, seq, d)
        if c.tie_word_embeddings:
            logits = transformer.attend(h)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head")(h)
        logits = logits.astype(jnp.float32)  # shape=(batch, seq, vocab)
        if cache is None:
            return logits
        logits = jnp.where(index + seq <= max_len, logits, jnp.nan)
        return logits, {"index": index + seq, "k": kv[0], "v": kv[1]}

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
        """`init_cache(self.config, batch, max_len, dtype or self.dtype)`; needs no parameters."""
        return init_cache(self.config, batch, max_len, dtype or self.dtype)


def from_pretrained(path_or_dir: str | os.PathLike, *, dtype=jnp.float32, strict: bool = True, mesh=None,
                    rules=None) -> tuple[GPT2LMHeadModel, dict]:
    """`(module, variables)` from a Hugging Face GPT-2 directory (config.json + safetensors) or hub id.

    Parameters and computation in `dtype`. Tensor names may carry the "transformer." prefix (GPT2LMHeadModel) or
    not (GPT2Model); an untied `lm_head.weight` is read transposed (vocab, d) -> (d, vocab), a tied one must equal
    `wte`. The causal-mask buffers old checkpoints hold (`attn.bias`, `attn.masked_bias`) are skipped; any other
    tensor the model does not use (e.g. layers beyond config.json's `n_layer`) is a ValueError, or with
    `strict=False` an `UnusedTensorsWarning` listing them. Raises FileNotFoundError for a missing directory or file,
    ValueError for a non-GPT-2 or malformed config, a damaged file, missing tensors or tensors that do not match
    the config (naming the tensor and both shapes). With `mesh` (a `jax.sharding.Mesh`), each parameter is laid out
    by `rules` (`jlora.models.partitioning`; None: from the mesh's axis names) and each device reads only its slice
    of each tensor (`jlora.models.shards`)."""
    directory = hf.resolve(path_or_dir)
    config = hf.parse_config(GPT2Config.from_hf, hf.read_config(directory), source=directory / "config.json")
    model = GPT2LMHeadModel(config, dtype=dtype)
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    shardings = shards.placement(template, mesh, rules, "gpt2")
    tensors = hf.read_safetensors(directory, lazy=shardings is not None)
    prefixed = any(k.startswith("transformer.") for k in tensors)

    def key_of(path: str) -> str:
        key = hf.default_key(path)
        return key if prefixed or not key.startswith("transformer.") else key.removeprefix("transformer.")

    tied = ("lm_head.weight", key_of("params/transformer/wte/embedding")) if config.tie_word_embeddings else None
    variables = hf.convert(template, tensors, key_of=key_of, transpose=hf.TRANSPOSED["gpt2"],
                           dtype=dtype, source=str(directory), strict=strict, tied=tied,
                           buffers=(r"(?:^|\.)attn\.(?:masked_)?bias$",), layers=("n_layer", config.n_layer),
                           shardings=shardings)
    return model, variables

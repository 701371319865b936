"""Llama (transformers' `LlamaForCausalLM`) in flax.linen, with a key/value cache for generation.

    module, variables = from_pretrained("path/to/hf_dir")        # config.json + safetensors
    module, variables = from_pretrained("model.Q4_1.gguf")       # GGUF, dequantized (quantized=True: kept as blocks)
    logits = module.apply(variables, input_ids)                  # (batch, seq, vocab) float32

Parameter paths mirror the Hugging Face names ('.' -> '/', layers numbered): `params/model/layers/0/self_attn/
q_proj/kernel` is `model.layers.0.self_attn.q_proj.weight` transposed, so PEFT-style targets ("q_proj", "v_proj")
work unchanged. RoPE uses the rotate-half layout, RMSNorm runs in float32, attention softmax in float32, as HF does.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jlora.models import shards
from jlora.models.gguf import read_gguf
from jlora.models.hf import TRANSPOSED, convert, parse_config, read_config, read_safetensors, resolve


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama decoder; `head_dim` None means hidden_size // num_attention_heads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    rope_scaling: None = None  # only plain RoPE; from_hf raises for scaled variants

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be a positive even int, got {self.head_dim}")
        if self.rope_scaling is not None:
            raise ValueError(f"LlamaConfig.rope_scaling: only None (plain RoPE) is supported, got {self.rope_scaling}")

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """From a Hugging Face `config.json` dict (the transformers 4 `rope_theta`/`rope_scaling` keys or the
        transformers 5 `rope_parameters`). Raises a ValueError for what this model does not implement."""
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {hf['model_type']!r} is not a Llama config")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if flag := next((f for f in ("attention_bias", "mlp_bias") if hf.get(f)), None):
            raise ValueError(f"{flag}=True is not supported (Llama projections without bias only)")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if (kind := rope.get("rope_type", rope.get("type", "default"))) != "default":
            raise ValueError(f"RoPE scaling {kind!r} ({rope}) is not supported; only plain RoPE (rope_type 'default')")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), head_dim=hf.get("head_dim"),
        )


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty cache: `index` int32 () (the next position), `k` and `v` (layers, batch, max_len, kv_heads,
    head_dim); the batch is axis 1 of k and v (jlora.models.generation relies on it). Size it for prompt + new
    tokens: writing past max_len cannot be caught under jit, so those logits come back NaN."""
    if max_len < 1 or batch < 1:
        raise ValueError(f"init_cache: batch={batch} and max_len={max_len} must be >= 1")
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return {"index": jnp.zeros((), jnp.int32), "k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32 (seq, head_dim) for int positions (seq,), HF's layout: the frequencies repeated twice."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (batch, seq, heads, head_dim) rotated as HF: x * cos + rotate_half(x) * sin, cos/sin cast to x's dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm: normalised in float32, cast back, times `scale` (hidden,)."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(x.dtype)


def _dense(features: int, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=dtype, name=name)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE; `kv` the layer's cache slices (batch, max_len, kv_heads, head_dim)."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        """x (batch, seq, hidden); cos/sin (seq, head_dim); mask bool (seq, keys) -> (out, (k, v) or None)."""
        c = self.config
        b, s, _ = x.shape
        q = _dense(c.num_attention_heads * c.head_dim, self.dtype, "q_proj")(x)
        k = _dense(c.num_key_value_heads * c.head_dim, self.dtype, "k_proj")(x)
        v = _dense(c.num_key_value_heads * c.head_dim, self.dtype, "v_proj")(x)
        q = apply_rotary(q.reshape(b, s, c.num_attention_heads, c.head_dim), cos, sin)
        k = apply_rotary(k.reshape(b, s, c.num_key_value_heads, c.head_dim), cos, sin)
        v = v.reshape(b, s, c.num_key_value_heads, c.head_dim)
        new = None
        if kv is not None:
            k = lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
            v = lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
            new = (k, v)
        groups = c.num_attention_heads // c.num_key_value_heads  # q head g * groups + r reads kv head g (repeat_kv)
        q = q.reshape(b, s, c.num_key_value_heads, groups, c.head_dim)
        scores = jnp.einsum("bsgrd,btgd->bgrst", q, k.astype(q.dtype)) * c.head_dim**-0.5
        scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bgrst,btgd->bsgrd", probs, v.astype(self.dtype))
        out = out.reshape(b, s, c.num_attention_heads * c.head_dim)
        return _dense(c.hidden_size, self.dtype, "o_proj")(out), new


class LlamaMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c.intermediate_size, self.dtype, "gate_proj")(x)
        up = _dense(c.intermediate_size, self.dtype, "up_proj")(x)
        return _dense(c.hidden_size, self.dtype, "down_proj")(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); x (batch, seq, hidden) -> (same, new kv or None)."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, index=None):
        c = self.config
        h, new = LlamaAttention(c, self.dtype, name="self_attn")(
            RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x), cos, sin, mask, kv, index)
        x = x + h
        mlp = getattr(c, "mlp", LlamaMLP)  # the feed-forward block: a Mixtral config's is its sparse MoE block
        x = x + mlp(c, self.dtype, name="mlp")(RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x))
        return x, new


class LlamaLayers(nn.Module):
    """The decoder layers as submodules "0", "1", ... (HF's `model.layers.N`)."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None):
        new_k, new_v = [], []
        for i in range(self.config.num_hidden_layers):
            kv = None if cache is None else (cache["k"][i], cache["v"][i])
            index = None if cache is None else cache["index"]
            x, new = LlamaDecoderLayer(self.config, self.dtype, name=str(i))(x, cos, sin, mask, kv, index)
            if new is not None:
                new_k.append(new[0])
                new_v.append(new[1])
        return x, (None if cache is None else (jnp.stack(new_k), jnp.stack(new_v)))


class LlamaModel(nn.Module):
    """HF's `model`: ids (batch, seq) -> final-normed hidden (batch, seq, hidden) and the stacked new k/v or None."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.layers = LlamaLayers(c, self.dtype)
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)

    def __call__(self, input_ids, cos, sin, mask, cache=None):
        x, kv = self.layers(self.embed_tokens(input_ids), cos, sin, mask, cache)
        return self.norm(x), kv

    def attend(self, x):
        """The tied head: x (batch, seq, hidden) @ embedding.T -> (batch, seq, vocab)."""
        return self.embed_tokens.attend(x)


class Llama(nn.Module):
    """LlamaForCausalLM. `dtype` is both the parameters' and the computation's (float32 or bfloat16)."""

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, *, cache: dict | None = None):
        """input_ids int (batch, seq) -> logits float32 (batch, seq, vocab); with `cache` (see `init_cache`)
        -> (logits, new_cache), the tokens placed at positions cache["index"] ... index + seq - 1."""
        c = self.config
        if getattr(input_ids, "ndim", None) != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an int array (batch, seq), got {getattr(input_ids, 'dtype', None)} "
                             f"{getattr(input_ids, 'shape', None)}")
        seq = input_ids.shape[1]
        if cache is None:
            start, keys = 0, seq
        else:
            want = (c.num_hidden_layers, input_ids.shape[0], None, c.num_key_value_heads, c.head_dim)
            got = tuple(cache["k"].shape)
            if len(got) != 5 or any(w is not None and w != g for w, g in zip(want, got)) or cache["v"].shape != got:
                raise ValueError(f"cache k/v have shape {got} / {tuple(cache['v'].shape)}, expected (layers={want[0]}, "
                                 f"batch={want[1]}, max_len, kv_heads={want[3]}, head_dim={want[4]})")
            if seq > got[2]:
                raise ValueError(f"input_ids has {seq} tokens, more than the cache's max_len {got[2]}")
            start, keys = cache["index"], got[2]
        positions = start + jnp.arange(seq, dtype=jnp.int32)
        mask = jnp.arange(keys, dtype=jnp.int32)[None, :] <= positions[:, None]  # (seq, keys), causal
        cos, sin = rotary(positions, c.head_dim, c.rope_theta)
        model = LlamaModel(c, self.dtype, name="model")
        h, kv = model(input_ids.astype(jnp.int32), cos, sin, mask, cache)
        head = model.attend if c.tie_word_embeddings else _dense(c.vocab_size, self.dtype, "lm_head")
        logits = head(h).astype(jnp.float32)  # shape=(batch, seq, vocab)
        if cache is None:
            return logits
        logits = jnp.where(cache["index"] + seq <= cache["k"].shape[2], logits, jnp.nan)  # past max_len: NaN
        return logits, {"index": (cache["index"] + seq).astype(jnp.int32), "k": kv[0], "v": kv[1]}

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """`init_cache(self.config, batch, max_len, dtype or self.dtype)`; needs no parameters."""
        return init_cache(self.config, batch, max_len, dtype or self.dtype)


def from_tensors(hf_config: dict | LlamaConfig, tensors: dict, *, dtype=jnp.float32, source: str = "",
                 strict: bool = True, mesh=None, rules=None) -> tuple[Llama, dict]:
    """(module, variables) from a HF config dict or LlamaConfig and `{hf_name: array or LazyTensor}` (torch layout,
    Linear (out, in)); `source`, the file they came from, is named in errors. `strict`, `mesh`, `rules`: see below."""
    config = parse_config(LlamaConfig.from_hf, hf_config, source=source) if isinstance(hf_config, dict) else hf_config
    module = Llama(config, dtype=dtype)
    template = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return module, convert(template, tensors, transpose=TRANSPOSED["llama"], dtype=dtype,
                           source=source, strict=strict, buffers=(r"(?:^|\.)rotary_emb\.inv_freq$",),
                           layers=("num_hidden_layers", config.num_hidden_layers),
                           shardings=shards.placement(template, mesh, rules, "llama"),
                           tied=("lm_head.weight", "model.embed_tokens.weight") if config.tie_word_embeddings else None)


def from_pretrained(path_or_dir: str | os.PathLike, *, dtype=jnp.float32, strict: bool = True, mesh=None,
                    rules=None, quantized: bool = False) -> tuple[Llama, dict]:
    """(module, variables) from a HF directory (config.json + safetensors), a hub id, or a `.gguf` file (`read_gguf`:
    float32, or with `quantized=True` its blocks as QuantizedArrays; cast to `dtype`). Unused tensors are a ValueError
    (an UnusedTensorsWarning with `strict=False`; `inv_freq` skipped). `mesh`, `rules`: see `models.from_pretrained`."""
    kw = dict(dtype=dtype, source=str(path_or_dir), strict=strict, mesh=mesh, rules=rules)
    if str(path_or_dir).endswith(".gguf") or quantized:  # (hf config, tensors, tokenizer); quantized: GGUF only
        return from_tensors(*read_gguf(path_or_dir, quantized=quantized)[:2], **kw)
    directory = resolve(path_or_dir)
    config = parse_config(LlamaConfig.from_hf, read_config(directory), source=directory / "config.json")
    return from_tensors(config, read_safetensors(directory, lazy=mesh is not None), **kw | {"source": str(directory)})

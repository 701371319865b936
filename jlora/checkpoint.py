"""Checkpoints of the adapters alone (lora pairs and leaves trained in full), restored against an abstract target.

    jlora.save_adapters("/ckpt/run1", adapters, config, variables=frozen)
    adapters, config = jlora.load_adapters("/ckpt/run1", variables=variables)

A checkpoint is an orbax composite of two items: `adapters`, the adapter tree (StandardSave), and `meta`, a JSON
file (`meta/metadata`) `{"format": "jlora.adapters/2", "config", "arrays", "base", "sha256"}`: the config
(`LoraConfig.to_dict`), the shape and dtype of every adapter array keyed by its '/'-joined path (the abstract restore
target), the base fingerprint (`jlora.fingerprint`: shapes, dtypes and content digests of the adapted weights), or
null when saved without `variables`, and the sha256 of the canonical JSON (sorted keys, no spaces) of the other four
fields. A metadata file whose checksum differs is refused. Checkpoints of format "jlora.adapters/1" (no checksum,
no digests) still load, with the base compared by shapes and dtypes. The frozen base weights are never written.
The checkpoint is written beside `path` and moved into place when complete (`jlora.atomic.replace_dir`): a crash
mid-save leaves `path` as it was, and an overwritten checkpoint stays readable until its replacement is whole.

Several processes (`jax.distributed.initialize`, adapters sharded over a global mesh): every process calls
`save_adapters` with the same arguments, on a filesystem they share; each writes the shards its devices hold (orbax),
process 0 the metadata, into one staging directory, and process 0 commits it by one rename once all have written
(an error on any process raises on all). Every process calls `load_adapters` too; each reads its own shards.
On load, each array is placed by, first match wins: `target`'s sharding; `jlora.adapter_shardings(variables, ...)`
(each adapter sharded like its base weight, on the variables' mesh, whatever mesh it was saved from); the device
of a base weight held whole (one device); the saved sharding when its devices exist here; else the default device
(one process) or replicated on all devices (several).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jlora import multihost, validate
from jlora.atomic import replace_dir
from jlora.basecheck import _slots, _spec, check_base, fingerprint
from jlora.config import LoraConfig
from jlora.paths import flatten_adapters, named_leaves, nest, path_str
from jlora.quiet import quiet_orbax
from jlora.sharding import adapter_shardings

FORMAT = "jlora.adapters/2"
_KEYS = {"jlora.adapters/1": {"format", "config", "arrays", "base"},
         FORMAT: {"format", "config", "arrays", "base", "sha256"}}
_ENTRIES = {"_CHECKPOINT_METADATA", "commit_success.txt", "meta", "adapters"}  # what orbax writes at the top
WHAT = "jlora adapter checkpoint"


class CorruptCheckpointError(ValueError):
    """A checkpoint directory that is not a whole, intact jlora adapter checkpoint; the message names the path and
    what is wrong."""


def checksum(body: dict) -> str:
    """The hex sha256 of `body`'s canonical JSON (sorted keys, no spaces, ASCII)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def absolute(path) -> pathlib.Path:
    """`path` (str or PathLike) as an absolute pathlib.Path."""
    return pathlib.Path(os.path.abspath(os.fspath(path)))


def is_jlora_checkpoint(path) -> bool:
    """True when `path` is a directory holding only what `save_adapters` writes, whose `meta/metadata` is a JSON
    object of a jlora adapter format (checked cheaply: the checksum and the arrays are not read)."""
    path = pathlib.Path(path)
    try:
        if path.is_symlink() or not path.is_dir() or not set(os.listdir(path)) <= _ENTRIES:
            return False
        meta = json.loads((path / "meta" / "metadata").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") in _KEYS


def save_args(adapters, config: LoraConfig, variables) -> ocp.args.Composite:
    """The orbax arguments that write a checkpoint of `adapters`, after checking them (`jlora.validate`)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jlora.LoraConfig, got {type(config).__name__}")
    pairs, _ = flatten_adapters(adapters)
    leaves = named_leaves(adapters)
    if not leaves:
        raise ValueError("the adapters tree holds no arrays: nothing to save")
    bad = [p for p, x in leaves if not (hasattr(x, "shape") and hasattr(x, "dtype"))]
    if bad:
        raise ValueError(f"adapter leaves at {bad} are not arrays (no shape/dtype); only arrays can be saved")
    if variables is None:
        validate.check_pairs(adapters, config)
    else:
        validate.check_adapters(variables, adapters, config)
    if callable(config.targets):
        config = config.with_targets(pairs)
    body = {
        "format": FORMAT,
        "config": config.to_dict(),
        "arrays": {p: _spec(x) for p, x in leaves},
        "base": None if variables is None else fingerprint(variables, adapters),
    }
    meta = {**body, "sha256": checksum(body)}
    return ocp.args.Composite(adapters=ocp.args.StandardSave(adapters), meta=ocp.args.JsonSave(meta))


def write(path: pathlib.Path, args: ocp.args.Composite) -> None:
    """Writes a checkpoint with orbax to `path`, which must not exist (orbax's log records held, see quiet)."""
    with quiet_orbax(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args=args)


def save_adapters(path, adapters, config: LoraConfig, *, variables=None, overwrite: bool = False) -> None:
    """Writes `adapters` (the tree from `lora.init`: lora pairs `lora_a`/`lora_b` of any float dtype and the leaves
    trained in full), `config` and the base fingerprint to the directory `path`, atomically.

    The adapters are checked against `config` first (`jlora.validate`: every pair's rank and layout, and with
    `variables` every target covered and every leaf trained in full present); a ValueError names the path. A
    predicate `config.targets` is saved as `config.with_targets(<lora pair paths>)`. With `variables` (the full or
    frozen tree) the base shapes, dtypes and content digests are recorded and `load_adapters(..., variables=...)`
    compares them; without, only the adapter shapes are stored and loading onto variables checks that each pair
    fits its weight (`layout.read_layout`).

    An existing `path` raises FileExistsError unless `overwrite=True`, which replaces it atomically: the new
    checkpoint is written beside and swapped in only when whole, so a crash or an error (disk full) during the
    write leaves the old one loadable. `overwrite=True` on a directory that is not a jlora adapter checkpoint (a run
    folder holding other files) raises a ValueError and deletes nothing.
    """
    path = absolute(path)
    args = save_args(adapters, config, variables)
    with replace_dir(path, overwrite=overwrite, is_ours=is_jlora_checkpoint, what=WHAT) as new:
        write(new, args)


def _corrupt(where: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{where} is not a complete jlora adapter checkpoint: {what}")


def read_meta(path: pathlib.Path) -> tuple[dict, LoraConfig]:
    """`(meta, config)` from `path/meta/metadata`, verified (format, keys, checksum, config, array specs); raises a
    CorruptCheckpointError naming the file and what is wrong."""
    file = path / "meta" / "metadata"
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _corrupt(str(path), f"its metadata cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") not in _KEYS or set(meta) != _KEYS[meta["format"]]:
        got = (f"format {meta.get('format')!r} with the keys {sorted(meta)}" if isinstance(meta, dict)
               else f"a JSON {type(meta).__name__}")
        raise CorruptCheckpointError(
            f"{path} is not a jlora adapter checkpoint: its metadata {file} is not of format {FORMAT!r} with the keys "
            f"{sorted(_KEYS[FORMAT])} (nor 'jlora.adapters/1' without 'sha256'); got {got}")
    if "sha256" in meta:
        body = {k: v for k, v in meta.items() if k != "sha256"}
        if checksum(body) != meta["sha256"]:
            raise _corrupt(str(path), f"the metadata file {file} does not match its sha256 checksum (the file was "
                                      f"changed or damaged after it was written); restore it from a copy")
    try:
        config = LoraConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise _corrupt(str(path), f"the saved config is invalid ({e})") from e
    try:
        specs = [*meta["arrays"].values(), *(meta["base"] or {}).values()]
        for s in specs:
            jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"]))
            if not isinstance(s.get("digest"), str | None):
                raise TypeError(f"digest {s['digest']!r} is not a string")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise _corrupt(str(path), f"the saved array specs are malformed ({type(e).__name__}: {e})") from e
    return meta, config


def _abstract(meta: dict, target, where: str):
    """The restore target: ShapeDtypeStructs from the saved metadata, or from `target` after checking its paths."""
    arrays = meta["arrays"]
    if target is None:
        return nest({p: jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"])) for p, s in arrays.items()})
    leaves = dict(named_leaves(target))
    problems = [f"{p}: missing from the target" for p in sorted(set(arrays) - set(leaves))]
    problems += [f"{p}: not in the checkpoint" for p in sorted(set(leaves) - set(arrays))]
    problems += [f"{p}: saved shape {tuple(arrays[p]['shape'])}, target {tuple(x.shape)}"
                 for p, x in leaves.items() if p in arrays and tuple(x.shape) != tuple(arrays[p]["shape"])]
    if problems:
        raise ValueError(f"the target does not match the checkpoint at {where}:\n  " + "\n  ".join(problems))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        target)


def _placed(abstract, variables, config: LoraConfig):
    """`abstract` with a sharding on every leaf that has none: `adapter_shardings` of `variables`, or where the base
    weight lies whole (one device, or replicated), or still None (orbax's saved sharding, else `_fallback`)."""
    derived = dict(named_leaves(adapter_shardings(variables, abstract, config=config)))
    pairs, _ = flatten_adapters(abstract)
    slots = _slots(variables)

    def pick(key_path, leaf):
        p = path_str(key_path)
        sharding = getattr(leaf, "sharding", None) or derived.get(p)
        if sharding is None:
            owner, name = p.rsplit("/", 1) if "/" in p else ("", p)
            whole = getattr(slots.get(owner if owner in pairs and name in ("lora_a", "lora_b") else p), "sharding",
                            None)
            sharding = whole if isinstance(whole, jax.sharding.Sharding) and whole.is_fully_replicated else None
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(pick, abstract)


def _fallback() -> jax.sharding.Sharding:
    """Where an array goes when neither the target nor the variables place it and its saved sharding names devices
    this run lacks (another mesh, another number of processes): the default device with one process, else
    replicated on every device."""
    if multihost.count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = jax.sharding.Mesh(jax.devices(), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def load_adapters(path, *, variables=None, target=None, check_weights: bool = True) -> tuple[dict, LoraConfig]:
    """`(adapters, config)` from a `save_adapters` directory: jax arrays of the saved shapes and dtypes, nested as
    saved (`{"params": {"query": {"kernel": {"lora_a": (in, r), "lora_b": (r, out)}, "bias": (out,)}}}`).

    The arrays are restored against an abstract target (`jax.ShapeDtypeStruct`s) built from the saved metadata, or
    from `target` (a tree of arrays or ShapeDtypeStructs with the saved paths and shapes, whose dtypes and shardings
    are used). With `variables` (full or frozen), each array that `target` does not place is placed like its base
    weight (`jlora.adapter_shardings`): adapters saved on 8 devices by 2 processes load onto variables on one
    device, or sharded on a 4-device mesh, each where it belongs (the module docstring gives the other cases).
    With `variables`, a base that differs from the saved fingerprint, or lacks a saved path, raises a ValueError
    naming every such path with both shapes and dtypes; with `check_weights` (default) the content digest of each
    adapted weight is compared too, so another fine-tune of the same architecture is refused
    (`check_weights=False` compares shapes and dtypes only; abstract variables need it). A missing directory raises
    FileNotFoundError; a corrupt or partial checkpoint, or metadata whose checksum differs, a CorruptCheckpointError
    (a ValueError) naming the path.
    """
    path = absolute(path)
    if not path.exists():
        raise FileNotFoundError(f"no adapter checkpoint at {path}: the directory does not exist")
    meta, config = read_meta(path)
    if variables is not None:
        check_base(meta, config, variables, str(path), check_weights)
    abstract = _abstract(meta, target, str(path))
    if variables is not None:
        abstract = _placed(abstract, variables, config)
    try:
        with quiet_orbax(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restore = ocp.args.StandardRestore(abstract, fallback_sharding=_fallback())
            args = ocp.args.Composite(adapters=restore)
            adapters = checkpointer.restore(path, args=args).adapters
    except Exception as e:
        raise CorruptCheckpointError(f"{path} is corrupt or partial: its adapter arrays cannot be read "
                                     f"({type(e).__name__}: {e})") from e
    return adapters, config


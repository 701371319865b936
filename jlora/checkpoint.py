"""Checkpoints of the adapters alone (lora pairs and leaves trained in full), restored against an abstract target.

    jlora.save_adapters("/ckpt/run1", adapters, config, variables=frozen)
    adapters, config = jlora.load_adapters("/ckpt/run1", variables=variables)

A checkpoint is an orbax composite of two items: `adapters`, the adapter tree (StandardSave), and `meta`, a JSON
object `{"format", "config", "arrays", "base"}`: the config (`LoraConfig.to_dict`), the shape and dtype of every
adapter array keyed by its '/'-joined path (the abstract restore target), and the base fingerprint (see
`fingerprint`), or null when saved without `variables`. The frozen base weights are never written. orbax writes
into a temporary directory and renames it when complete, so a crash mid-save leaves no checkpoint at that path and
every other checkpoint untouched.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from jlora import layout
from jlora.config import LoraConfig
from jlora.paths import flatten_adapters, named_leaves, nest, path_str
from jlora.transform import as_variables

FORMAT = "jlora.adapters/1"


def _spec(x) -> dict:
    return {"shape": [int(d) for d in x.shape], "dtype": jnp.dtype(x.dtype).name}


def _text(spec: dict) -> str:
    return f"{tuple(spec['shape'])} {spec['dtype']}"


def _slots(variables) -> dict[str, Any]:
    """`{path: leaf}` over `variables`, None slots (leaves trained in full, in a frozen tree) included."""
    flat = jax.tree_util.tree_flatten_with_path(as_variables(variables), is_leaf=lambda x: x is None)[0]
    return {path_str(p): x for p, x in flat}


def _base_specs(variables, pairs, full) -> tuple[dict[str, dict | None], list[str]]:
    """`({path: spec of the base parameter, or None where the variables hold a None slot}, [missing paths])`."""
    slots, specs, missing = _slots(variables), {}, []
    for path in sorted({*pairs, *full}):
        leaf = slots.get(path)
        if leaf is None and not (path in slots and path in full):
            missing.append(path)
        else:
            specs[path] = None if leaf is None else _spec(leaf)
    return specs, missing


def fingerprint(variables, adapters) -> dict[str, dict]:
    """`{path: {"shape": [...], "dtype": "float32"}}`: the base parameter's shape and dtype at every path that has
    an adapter (a lora pair or a leaf trained in full), sorted by path; JSON-able.

    `variables` is the full variables tree or the frozen one; where frozen holds None (a leaf trained in full) the
    shape and dtype are those of the adapter array itself. Raises a ValueError naming paths absent from `variables`.
    """
    pairs, full = flatten_adapters(adapters)
    specs, missing = _base_specs(variables, pairs, full)
    if missing:
        raise ValueError(f"the adapters have paths {missing} that the variables lack")
    return {p: _spec(full[p]) if s is None else s for p, s in specs.items()}


def _save_args(adapters, config: LoraConfig, variables) -> ocp.args.Composite:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jlora.LoraConfig, got {type(config).__name__}")
    pairs, _ = flatten_adapters(adapters)
    leaves = named_leaves(adapters)
    if not leaves:
        raise ValueError("the adapters tree holds no arrays: nothing to save")
    bad = [p for p, x in leaves if not (hasattr(x, "shape") and hasattr(x, "dtype"))]
    if bad:
        raise ValueError(f"adapter leaves at {bad} are not arrays (no shape/dtype); only arrays can be saved")
    if callable(config.targets):
        config = config.with_targets(pairs)
    meta = {
        "format": FORMAT,
        "config": config.to_dict(),
        "arrays": {p: _spec(x) for p, x in leaves},
        "base": None if variables is None else fingerprint(variables, adapters),
    }
    return ocp.args.Composite(adapters=ocp.args.StandardSave(adapters), meta=ocp.args.JsonSave(meta))


def _path(path) -> epath.Path:
    path = epath.Path(path)
    return path if path.is_absolute() else path.absolute()


def save_adapters(path, adapters, config: LoraConfig, *, variables=None, overwrite: bool = False) -> None:
    """Writes `adapters` (the tree from `lora.init`: lora pairs `lora_a`/`lora_b` of any float dtype and the leaves
    trained in full), `config` and the base fingerprint to the directory `path`, atomically.

    A predicate `config.targets` is saved as `config.with_targets(<lora pair paths>)`. With `variables` (the full
    or frozen tree) the base shapes and dtypes are recorded and `load_adapters(..., variables=...)` compares them
    exactly; without, only the adapter shapes are stored (lora_a/lora_b shapes do not determine W for every
    layout), and loading onto variables checks that each pair fits its weight (`layout.read_layout`).
    An existing `path` raises FileExistsError unless `overwrite=True` (which deletes it first, so not atomically).
    """
    path = _path(path)
    args = _save_args(adapters, config, variables)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args=args, force=overwrite)


def _read_meta(restore, where: str) -> tuple[dict, LoraConfig]:
    try:
        meta = restore(ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
        raise ValueError(f"{where} is not a complete jlora adapter checkpoint: its metadata cannot be read "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not {"config", "arrays", "base"} <= set(meta):
        raise ValueError(f"{where} is not a jlora adapter checkpoint: its metadata is not of format {FORMAT!r}")
    try:
        config = LoraConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: the saved config is invalid ({e})") from e
    try:
        specs = [*meta["arrays"].values(), *(meta["base"] or {}).values()]
        for s in specs:
            jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"]))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: the saved array specs are malformed ({type(e).__name__}: {e})") from e
    return meta, config


def _check_base(meta: dict, config: LoraConfig, variables, where: str):
    """Raises one ValueError naming every path whose base differs from the saved fingerprint, or is missing."""
    arrays = meta["arrays"]
    pairs = {p.rsplit("/", 1)[0] for p in arrays if p.rsplit("/", 1)[-1] in ("lora_a", "lora_b")}
    full = set(arrays) - {f"{p}/{k}" for p in pairs for k in ("lora_a", "lora_b")}
    specs, missing = _base_specs(variables, pairs, full)
    problems = [f"{p}: missing from the variables" for p in missing]
    for path, spec in specs.items():
        if spec is None:  # a None slot of a frozen tree: the saved array is the base
            continue
        if meta["base"] is not None:
            saved = meta["base"].get(path)
            if saved != spec:
                was = "not recorded" if saved is None else _text(saved)
                problems.append(f"{path}: saved base {was}, variables have {_text(spec)}")
        elif path in full:
            if arrays[path] != spec:
                problems.append(f"{path}: saved array {_text(arrays[path])}, variables have {_text(spec)}")
        else:
            a, b = arrays[f"{path}/lora_a"]["shape"], arrays[f"{path}/lora_b"]["shape"]
            try:
                layout.read_layout(path, spec["shape"], a, b, config.fused_for(path))
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise ValueError(f"the checkpoint at {where} does not fit these variables (base fingerprint differs):\n  "
                         + "\n  ".join(problems))


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


def _restore(restore, where: str, variables, target) -> tuple[dict, LoraConfig]:
    meta, config = _read_meta(restore, where)
    if variables is not None:
        _check_base(meta, config, variables, where)
    abstract = _abstract(meta, target, where)
    try:
        adapters = restore(ocp.args.Composite(adapters=ocp.args.StandardRestore(abstract))).adapters
    except Exception as e:
        raise ValueError(f"{where} is corrupt or partial: its adapter arrays cannot be read "
                         f"({type(e).__name__}: {e})") from e
    return adapters, config


def load_adapters(path, *, variables=None, target=None) -> tuple[dict, LoraConfig]:
    """`(adapters, config)` from a `save_adapters` directory: jax arrays of the saved shapes and dtypes, nested as
    saved (`{"params": {"query": {"kernel": {"lora_a": (in, r), "lora_b": (r, out)}, "bias": (out,)}}}`).

    The arrays are restored against an abstract target (`jax.ShapeDtypeStruct`s) built from the saved metadata, or
    from `target` (a tree of arrays or ShapeDtypeStructs with the saved paths and shapes, whose dtypes and shardings
    are used). With `variables` (full or frozen), a base that differs from the saved fingerprint, or lacks a saved
    path, raises a ValueError naming every such path with both shapes and dtypes. A missing directory raises
    FileNotFoundError; a corrupt or partial checkpoint a ValueError naming the path.
    """
    path = _path(path)
    if not path.exists():
        raise FileNotFoundError(f"no adapter checkpoint at {path}: the directory does not exist")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return _restore(lambda args: checkpointer.restore(path, args=args), str(path), variables, target)


class AdapterCheckpointManager:
    """Step-numbered adapter checkpoints under `directory` (`<directory>/<step>`), keeping the last `max_to_keep`.

        with jlora.AdapterCheckpointManager("/ckpt/run1", max_to_keep=3) as manager:
            manager.save(step, adapters, config, variables=frozen)
            adapters, config = manager.restore(variables=variables)  # the latest step

    Each step holds what `save_adapters` writes. Saves are synchronous: `save` returns once the step is complete
    and renamed into place, so a crash mid-save leaves the earlier steps, and `restore()`, intact.
    """

    def __init__(self, directory, *, max_to_keep: int | None = 3):
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                        or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None (keep all), got {max_to_keep!r}")
        self.directory = _path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, adapters, config: LoraConfig, *, variables=None) -> None:
        """Saves step `step` (an int greater than every saved step); see `save_adapters` for `variables`."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(f"step {step} is not after the latest saved step {latest} in {self.directory}")
        args = _save_args(adapters, config, variables)
        if not self._manager.save(step, args=args):
            raise RuntimeError(f"orbax skipped saving step {step} in {self.directory}")
        self._manager.wait_until_finished()

    def restore(self, step: int | None = None, *, variables=None, target=None) -> tuple[dict, LoraConfig]:
        """`(adapters, config)` of `step` (the latest when None); see `load_adapters` for `variables`/`target`."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no adapter checkpoints in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; the steps are {steps}")
        where = str(self.directory / str(step))
        return _restore(lambda args: self._manager.restore(step, args=args), where, variables, target)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, ascending."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> AdapterCheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Adapter shardings derived from the base weights' shardings: `adapter_shardings`, and `place` for `lora.init`.

A weight W of shape `P + ...` with `NamedSharding(mesh, spec)` (spec padded with None to W's rank) and its pair
laid out as `jlora.layout` describes (lora_a `P + A + (r,)`, lora_b `P + (r,) + B`, A and B sets of W's axes)
get, on the same mesh:

    lora_a: spec[P axes] + spec[A axes] + (None,)      the rank axis replicated
    lora_b: spec[P axes] + (None,) + spec[B axes]

so each factor keeps W's partitioning on the axes it shares with W, in its own axis order, and a mesh axis that
W uses on an axis the factor lacks is simply not used by that factor (the factor is replicated over it). The rule
is positional, whichever side x contracts: a kernel (out, in) consumed as `x @ W.T` has lora_a (out, r) with W's
`out` entry and lora_b (r, in) with W's `in` entry; a Gemma einsum kernel (N, D, H) contracted on D has lora_a
(D, r) with spec[D] and lora_b (r, N, H) with (spec[N], spec[H]); a conv kernel (kh, kw, cin, cout) has lora_a
(kh, kw, cin, r) and lora_b (r, cout); an embedding table (vocab, dim), tied or not, lora_a (vocab, r) and lora_b
(r, dim). A fused projection (n slices of d, e enabled) has lora_b (r, e*d) carrying W's output-axis entry: with
every slice enabled it has W's size n*d and the same shard boundaries. An entry whose mesh axes do not divide the
factor's axis (only a fused lora_b with disabled slices can differ from W in size) is dropped (replicated).
Leaves trained in full (biases, `modules_to_save`) keep the base leaf's sharding (or their own, where the base
tree holds None there, as lora.init's `frozen` does).

Where W's sharding comes from, first match wins:
  1. the value's own `NamedSharding`: a placed `jax.Array`, a `jax.ShapeDtypeStruct(..., sharding=...)`, or
     (inside jit) a tracer whose type carries a sharding on a mesh of Explicit axes;
  2. Flax metadata, only in `adapter_shardings` and only with a mesh (`mesh=`, or the one the box records):
     linen `nn.Partitioned` names (mesh axes), `nn.LogicallyPartitioned` names through its rules or the
     context's `nn.logical_axis_rules`, an NNX `Variable`'s `out_sharding` (with `sharding_rules` / context rules)
     in an `nnx.State`;
  3. otherwise None (a weight on one device, a tracer of an Auto mesh, no metadata): the adapters get None.
The adapters themselves are plain arrays: the metadata is read through, not copied onto them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jlora.config import LoraConfig
from jlora.layout import read_layout
from jlora.paths import MAGNITUDE, flatten_adapters, path_str
from jlora.qarray import is_quantized


def adapter_shardings(variables, adapters, *, config=None, mesh=None):
    """A tree shaped like `adapters` of `jax.sharding.NamedSharding` (None where the base weight has none), each
    pair's derived from its base weight's sharding by the rule in this module's docstring.

    Args:
      variables: the base: a variables pytree (linen dict, possibly with `nn.Partitioned` /
        `nn.LogicallyPartitioned` boxes), an `nnx.State`, or lora.init's `frozen`, whose leaves are arrays or
        `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`), sharded or not.
      adapters: what `lora.init` returns (arrays) or its `jax.eval_shape` (ShapeDtypeStructs): pairs
        `{"lora_a": P + A + (r,), "lora_b": P + (r,) + B}` and leaves trained in full.
      config: the `LoraConfig` (or the `LoraTransform`); needed only for fused projections (`config.fused`).
      mesh: the `jax.sharding.Mesh` (or AbstractMesh) for leaves whose sharding is Flax metadata only (boxes of
        unplaced arrays or ShapeDtypeStructs); not needed when the values carry their own shardings.

    Use it as `out_shardings` to create adapters sharded without materialising them on one device::

        abstract = jax.eval_shape(lambda v: lora.init(v, x, key=key)[1], variables)
        shardings = jlora.adapter_shardings(variables, abstract, config=lora.config)
        adapters = jax.jit(lambda v: lora.init(v, x, key=key)[1], out_shardings=shardings)(variables)

    Raises a ValueError naming the path when a pair has no weight in `variables` or does not fit it, when metadata
    needs a mesh or logical rules that are not given, or names axes the mesh lacks; a TypeError for a `mesh` that
    is not a mesh, a `config` that is not a LoraConfig, or `adapters` that are not a mapping.
    """
    if mesh is not None and not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (or AbstractMesh), got {type(mesh).__name__}")
    config = getattr(config, "config", config)  # a LoraTransform carries its config
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"config must be the jlora.LoraConfig (or the LoraTransform) the adapters were made with, "
                        f"got {type(config).__name__}")
    return _derive(variables, adapters, config, mesh, metadata=True)


def place(variables, adapters, config):
    """`adapters` with each concrete leaf `jax.device_put` to its derived sharding (from the values' own shardings
    only, not Flax metadata); inside jit, a leaf whose sharding the types carry (Explicit mesh axes) is resharded
    to it, other tracers are returned as they are (use `out_shardings`). Leaves with no sharding are unchanged."""
    shardings = _derive(variables, adapters, config, None, metadata=False)

    def put(leaf, sharding):
        if sharding is None:
            return leaf
        if isinstance(leaf, jax.core.Tracer):
            return jax.sharding.reshard(leaf, sharding.spec) if _explicit(sharding) else leaf
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map(put, adapters, shardings, is_leaf=lambda x: x is None)


def _derive(variables, adapters, config, mesh, *, metadata: bool):
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be the nested dict lora.init returns ({{path: {{'lora_a', 'lora_b'}}}} and "
                        f"leaves trained in full), got {type(adapters).__name__}; the call is "
                        f"adapter_shardings(variables, adapters)")
    bases = _base_leaves(variables)
    pairs, full = flatten_adapters(adapters)
    out: dict[str, NamedSharding | None] = {}
    for path, pair in pairs.items():
        base = _lookup(bases, path, "a lora pair")
        if base is None:
            raise ValueError(f"{path}: the variables hold None where the adapters hold a lora pair; pass the base "
                             f"variables (or lora.init's frozen tree), which hold the weight there")
        w, source = base
        a, b = pair["lora_a"], pair["lora_b"]
        fused = config.fused_for(path) if config is not None else None
        try:
            lay = read_layout(path, w.shape, a.shape, b.shape, fused)
        except ValueError as e:
            if config is None:
                raise ValueError(f"{e}. If {path} is a fused projection, pass config= (the LoraConfig with "
                                 f"`fused`)") from None
            raise
        sharding = _sharding(path, w, source, mesh, metadata)
        m = pair.get(MAGNITUDE)  # DoRA: W's rank, size 1 on the normed axes
        if sharding is None:
            out[f"{path}/lora_a"] = out[f"{path}/lora_b"] = None
            if m is not None:
                out[f"{path}/{MAGNITUDE}"] = None
            continue
        spec = _padded(path, sharding.spec, len(w.shape))
        prefix = [spec[i] for i in range(lay.n_prefix)]
        out[f"{path}/lora_a"] = _factor(sharding, prefix + [spec[i] for i in lay.a_idx] + [None], a.shape)
        out[f"{path}/lora_b"] = _factor(sharding, prefix + [None] + [spec[i] for i in lay.b_idx], b.shape)
        if m is not None:
            out[f"{path}/{MAGNITUDE}"] = _factor(sharding, [s if n == w.shape[i] else None
                                                          for i, (s, n) in enumerate(zip(spec, m.shape))], m.shape)
    for path, leaf in full.items():
        base = _lookup(bases, path, "an array trained in full")
        if base is None:  # lora.init's frozen tree: the slot is None, the adapter leaf is the base leaf itself
            out[path] = _sharding(path, leaf, None, mesh, metadata)
            continue
        w, source = base
        if tuple(w.shape) != tuple(leaf.shape):
            raise ValueError(f"{path}: the adapters hold an array of shape {tuple(leaf.shape)} where the variables "
                             f"hold {tuple(w.shape)}; the adapters were made for another model: re-run lora.init")
        out[path] = _sharding(path, w, source, mesh, metadata)
    return jax.tree_util.tree_map_with_path(lambda p, _: out[path_str(p)], adapters)


def _lookup(bases, path, what):
    if path not in bases:
        near = sorted(p for p in bases if p.rsplit("/", 1)[-1] == path.rsplit("/", 1)[-1])[:5]
        raise ValueError(f"{path}: the adapters hold {what} there, but the variables have no leaf at that path"
                         + (f" (leaves with that name: {near})" if near else "")
                         + "; pass the variables the adapters were made for (adapter_shardings(variables, "
                           "adapters), in that order)")
    return bases[path]


def _base_leaves(variables) -> dict:
    """`{path: (value, metadata source) or None}` for every leaf of the base tree, None for its None holes; boxes
    (linen AxisMetadata, NNX Variables) are leaves, unwrapped here, their path without `.value`."""
    from flax import nnx
    from flax.core import meta

    if isinstance(variables, nnx.Module):
        raise TypeError(f"the variables are an nnx.Module ({type(variables).__name__}): pass its state, "
                        f"nnx.state(model)")

    def is_leaf(x):
        return x is None or is_quantized(x) or isinstance(x, (meta.AxisMetadata, nnx.Variable))

    out = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(variables, is_leaf=is_leaf)[0]:
        if leaf is None:
            out[path_str(p)] = None
        elif isinstance(leaf, (meta.AxisMetadata, nnx.Variable)):  # its value at the path named_leaves gives it
            for inner, value in jax.tree_util.tree_flatten_with_path(leaf)[0]:
                out[path_str(p + inner)] = (value, leaf)
        else:
            out[path_str(p)] = (leaf, None)
    return {p: v for p, v in out.items() if v is None or hasattr(v[0], "shape")}


def _explicit(sharding) -> bool:
    return sharding.mesh.are_all_axes_explicit


def _own(value):
    """The NamedSharding a value carries itself, or None (one device, no sharding, a tracer of an Auto mesh)."""
    if isinstance(value, jax.core.Tracer):
        s = jax.typeof(value).sharding
        return s if isinstance(s, NamedSharding) and _explicit(s) else None
    s = getattr(value, "sharding", None)
    return s if isinstance(s, NamedSharding) else None


def _sharding(path, value, source, mesh, metadata: bool):
    """The base leaf's NamedSharding: its own, else (with `metadata`) the Flax metadata's on the mesh, else None."""
    own = _own(value)
    if own is not None or not metadata or source is None:
        return own
    spec, box_mesh, what = _metadata_spec(path, source)
    if spec is None:
        return None
    mesh = mesh if mesh is not None else box_mesh
    if mesh is None:
        raise ValueError(f"{path}: the weight is not placed on devices and its sharding is {what}, which names no "
                         f"mesh: pass the mesh, adapter_shardings(variables, adapters, mesh=mesh)")
    unknown = sorted({n for e in spec for n in entry_axes(e)} - set(mesh.axis_names))
    if unknown:
        raise ValueError(f"{path}: its sharding {what} -> {spec} uses {unknown}, which are not axes of the mesh "
                         f"{tuple(mesh.axis_names)}: logical axis names need rules mapping them to mesh axes "
                         f"(`with nn.logical_axis_rules(rules):` around the call, or the box's rules)")
    return NamedSharding(mesh, spec)


def _metadata_spec(path, source):
    """`(PartitionSpec or None, mesh or None, description)` from a linen box or an NNX Variable."""
    from flax import linen as nn
    from flax import nnx
    from flax.core import meta
    from flax.nnx import spmd

    if isinstance(source, nnx.Variable):
        md = source.get_metadata()
        if not md.get("out_sharding"):
            return None, None, ""
        what = f"the NNX metadata out_sharding={md['out_sharding']}"
        return spmd.get_var_pspec(source), md.get("mesh"), what
    if isinstance(source, nn.LogicallyPartitioned):
        what = f"nn.LogicallyPartitioned{tuple(source.names)}"
        rules = source.rules or nn.get_logical_axis_rules()
        if not rules and any(n is not None for n in source.names):
            raise ValueError(f"{path}: its sharding is {what}, logical axis names, and no rules map them to mesh "
                             f"axes: call it inside `with nn.logical_axis_rules(rules):` (rules like "
                             f"[('embed', 'fsdp'), ('mlp', 'model')])")
        return nn.logical_to_mesh_axes(source.names, rules), source.mesh, what
    if isinstance(source, meta.Partitioned):
        return PartitionSpec(*source.names), source.mesh, f"nn.Partitioned{tuple(source.names)}"
    return None, None, ""


def entry_axes(entry) -> tuple[str, ...]:
    """The mesh axis names in one PartitionSpec entry (None, a name, or a tuple of names)."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def entry_parts(entry, mesh) -> int:
    """How many pieces one PartitionSpec entry splits its axis into on `mesh` (a Mesh or AbstractMesh)."""
    return math.prod(mesh.shape[name] for name in entry_axes(entry))


def _padded(path, spec, ndim: int) -> list:
    if len(spec) > ndim:
        raise ValueError(f"{path}: the weight has {ndim} axes but its PartitionSpec {spec} has {len(spec)} entries; "
                         f"fix the weight's sharding (one entry per axis)")
    return list(spec) + [None] * (ndim - len(spec))


def _factor(sharding: NamedSharding, entries: list, shape) -> NamedSharding:
    """W's sharding with `entries` as spec, each entry whose mesh axes do not divide its axis dropped."""
    keep = [entry if n % entry_parts(entry, sharding.mesh) == 0 else None for entry, n in zip(entries, shape)]
    return NamedSharding(sharding.mesh, PartitionSpec(*keep), memory_kind=sharding.memory_kind)

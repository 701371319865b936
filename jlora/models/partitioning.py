"""Partitioning rules for jlora's GPT-2, BERT and Llama: each parameter's logical axes, and rules that map logical axes
to mesh axes, giving one `jax.sharding.NamedSharding` per parameter.

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    shardings = partitioning.shardings(template, mesh, "fsdp_tp", architecture="llama")  # a tree like `template`
    module, variables = jlora.models.from_pretrained(path, mesh=mesh, rules="fsdp_tp")  # what from_pretrained uses

Logical axes (`LOGICAL_AXES`, per architecture, a regex over the parameter path -> one name or None per dim):
"embed" (the model width d), "vocab", "heads" (attention q and output, heads * head_dim), "kv_heads" (Llama's k and
v), "qkv" (GPT-2's fused c_attn, 3 d), "mlp" (the feed-forward width). None: never split (norms, positions,
row-parallel biases, classifier outputs).

`rules` is one of:
  - a preset name: "fsdp" (`FSDP`: the embed axis of every weight over mesh axis "data", ZeRO-3 style), "tp"
    (`TP`: Megatron column- and row-parallel kernels and the vocabulary over mesh axis "model") or "fsdp_tp" (both,
    for a 2-D ("data", "model") mesh);
  - None: chosen from the mesh's axis names: "data" -> "fsdp", "model" -> "tp", both -> "fsdp_tp";
  - a dict {logical axis: mesh axis name, a tuple of names, or None}, e.g. `{**partitioning.TP, "vocab": None}`;
  - a sequence of (regex over the path, `PartitionSpec`) pairs, first `re.search` match wins, every parameter must
    match one (end with `(r".*", PartitionSpec())` to replicate the rest).
A dim a mesh axis does not divide is a ValueError naming the parameter, its shape and the mesh, with the fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jlora.paths import named_leaves
from jlora.sharding import entry_axes, entry_parts

_DENSE_OUT = r"/(?:c_attn|c_fc|query|key|value|q_proj|k_proj|v_proj|gate_proj|up_proj)/"
LOGICAL_AXES: dict[str, tuple[tuple[str, tuple[str | None, ...]], ...]] = {
    "gpt2": (
        (r"/wte/embedding$", ("vocab", "embed")),
        (r"/wpe/embedding$", (None, "embed")),
        (r"/c_attn/kernel$", ("embed", "qkv")),
        (r"/c_attn/bias$", ("qkv",)),
        (r"/c_fc/kernel$", ("embed", "mlp")),
        (r"/c_fc/bias$", ("mlp",)),
        (r"/attn/c_proj/kernel$", ("heads", "embed")),
        (r"/mlp/c_proj/kernel$", ("mlp", "embed")),
        (r"/lm_head/kernel$", ("embed", "vocab")),
        (r"/(?:c_proj|ln_1|ln_2|ln_f)/(?:bias|scale)$", (None,)),
    ),
    "bert": (  # and RoBERTa: the same names under `roberta`
        (r"/word_embeddings/embedding$", ("vocab", "embed")),
        (r"/(?:position|token_type)_embeddings/embedding$", (None, "embed")),
        (r"/self/(?:query|key|value)/kernel$", ("embed", "heads")),
        (r"/self/(?:query|key|value)/bias$", ("heads",)),
        (r"/attention/output/dense/kernel$", ("heads", "embed")),
        (r"/intermediate/dense/kernel$", ("embed", "mlp")),
        (r"/intermediate/dense/bias$", ("mlp",)),
        (r"/output/dense/kernel$", ("mlp", "embed")),
        (r"/(?:pooler/dense|classifier|classifier/dense|classifier/out_proj)/kernel$", ("embed", None)),
        (r"/(?:bias|scale)$", (None,)),
    ),
    "llama": (
        (r"/embed_tokens/embedding$", ("vocab", "embed")),
        (r"/q_proj/kernel$", ("embed", "heads")),
        (r"/(?:k_proj|v_proj)/kernel$", ("embed", "kv_heads")),
        (r"/o_proj/kernel$", ("heads", "embed")),
        (r"/(?:gate_proj|up_proj)/kernel$", ("embed", "mlp")),
        (r"/down_proj/kernel$", ("mlp", "embed")),
        (r"/lm_head/kernel$", ("embed", "vocab")),
        (r"/scale$", (None,)),
    ),
}
AXES = ("embed", "vocab", "heads", "kv_heads", "qkv", "mlp")
FSDP = {"embed": "data"}
TP = {"vocab": "model", "heads": "model", "kv_heads": "model", "qkv": "model", "mlp": "model"}
FSDP_TP = {**FSDP, **TP}
PRESETS = {"fsdp": FSDP, "tp": TP, "fsdp_tp": FSDP_TP}


def preset_for(mesh) -> str:
    """The preset `rules=None` picks for `mesh`: "fsdp_tp" with axes "data" and "model", else "fsdp" / "tp"."""
    names = set(mesh.axis_names)
    if {"data", "model"} <= names:
        return "fsdp_tp"
    if names & {"data", "model"}:
        return "fsdp" if "data" in names else "tp"
    raise ValueError(f"rules=None picks the partitioning from the mesh's axis names, and the mesh has {mesh.axis_names}"
                     f" but neither 'data' (FSDP) nor 'model' (tensor parallel): name the axes so "
                     f"(jax.make_mesh((8,), ('data',))), or pass rules= one of {sorted(PRESETS)}, a dict "
                     f"{{logical axis: mesh axis}} (logical axes {AXES}) or [(regex, PartitionSpec), ...]")


def _mesh_str(mesh) -> str:
    return "mesh(" + ", ".join(f"{k!r}: {v}" for k, v in mesh.shape.items()) + ")"


def _check_mesh_axes(used, mesh, fix: str) -> None:
    missing = sorted({a for entry in used for a in entry_axes(entry) if a not in mesh.axis_names})
    if missing:
        raise ValueError(f"the rules put parameters on the mesh axes {missing}, which the {_mesh_str(mesh)} "
                         f"(axes {mesh.axis_names}) lacks: name the mesh's axes so, or {fix}")


def _logical_specs(template, rules: Mapping, architecture: str | None) -> list:
    if architecture not in LOGICAL_AXES:
        raise ValueError(f"architecture {architecture!r} has no logical axes; jlora knows {sorted(LOGICAL_AXES)}; "
                         f"pass rules=[(regex, PartitionSpec), ...] instead")
    unknown = sorted(k for k in rules if k not in AXES)
    if unknown:
        raise ValueError(f"rules name the logical axes {unknown}, which jlora's models do not have; the logical axes "
                         f"are {AXES} (see jlora.models.partitioning.LOGICAL_AXES)")
    out = []
    for path, leaf in named_leaves(template):
        logical = next((axes for regex, axes in LOGICAL_AXES[architecture] if re.search(regex, path)), None)
        if logical is None or len(logical) != len(leaf.shape):
            raise ValueError(f"{path} {tuple(leaf.shape)} has no logical axes for {architecture!r} in "
                             f"jlora.models.partitioning.LOGICAL_AXES; pass rules=[(regex, PartitionSpec), ...]")
        entries = [rules.get(name) if name else None for name in logical]
        out.append((path, leaf, PartitionSpec(*entries), logical))
    return out


def _regex_specs(template, rules: Sequence) -> list:
    pairs = []
    for pair in rules:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str)
                or not isinstance(pair[1], (PartitionSpec, tuple))):
            raise TypeError(f"rules must be (regex, PartitionSpec) pairs, got {pair!r}")
        pairs.append((re.compile(pair[0]), pair[1] if isinstance(pair[1], PartitionSpec) else PartitionSpec(*pair[1])))
    out = []
    for path, leaf in named_leaves(template):
        spec = next((s for regex, s in pairs if regex.search(path)), None)
        if spec is None:
            raise ValueError(f"no rule matches {path} {tuple(leaf.shape)}; every parameter needs one: append "
                             f"(r'.*', PartitionSpec()) to replicate the rest")
        if len(spec) > len(leaf.shape):
            raise ValueError(f"the rule for {path} gives {spec} ({len(spec)} entries) to a parameter of shape "
                             f"{tuple(leaf.shape)}; give at most {len(leaf.shape)} entries")
        out.append((path, leaf, spec, None))
    return out


def partition_specs(template, mesh, rules=None, *, architecture: str | None = None) -> list[tuple[str, PartitionSpec]]:
    """[(path, PartitionSpec)] of every leaf of `template` (arrays or ShapeDtypeStructs, e.g. `jax.eval_shape(
    module.init, ...)`) under `rules` (see the module docstring; `architecture` "gpt2", "bert" or "llama" for the
    preset and dict forms) on `mesh` (a `jax.sharding.Mesh` or `AbstractMesh`).

    Raises:
        ValueError: an unknown preset or logical axis, a mesh axis the mesh lacks, a mesh axis used twice in one
            parameter, a parameter no regex rule matches or whose rule has more entries than it has dims, or a dim
            its mesh axes do not divide (naming the parameter, its shape and the mesh, with the fix).
        TypeError: rules of another type.
    """
    if rules is None:
        rules = preset_for(mesh)
    label = repr(rules) if isinstance(rules, (str, Mapping)) else "[(regex, PartitionSpec), ...]"
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"rules={rules!r} is no preset; the presets are {sorted(PRESETS)}, or pass a dict "
                             f"{{logical axis: mesh axis}} or [(regex, PartitionSpec), ...]")
        rules = PRESETS[rules]
    if isinstance(rules, Mapping):
        alias = mesh.axis_names[0] if len(mesh.axis_names) == 1 else mesh.axis_names
        fix = {k: alias if set(entry_axes(v)) - set(mesh.axis_names) else v for k, v in rules.items()}
        _check_mesh_axes(rules.values(), mesh, f"pass rules={fix}")
        specs = _logical_specs(template, rules, architecture)
    elif isinstance(rules, Sequence):
        specs = _regex_specs(template, rules)
        _check_mesh_axes([e for _, _, spec, _ in specs for e in spec], mesh, "use the mesh's axis names in the rules")
    else:
        raise TypeError(f"rules must be a preset name {sorted(PRESETS)}, a dict {{logical axis: mesh axis}}, a list "
                        f"of (regex, PartitionSpec) pairs or None, got {type(rules).__name__}")
    for path, leaf, spec, logical in specs:
        _check(path, tuple(leaf.shape), spec, logical, mesh, label)
    return [(path, spec) for path, _, spec, _ in specs]


def _check(path, shape, spec, logical, mesh, label) -> None:
    axes = [a for entry in spec for a in entry_axes(entry)]
    twice = sorted({a for a in axes if axes.count(a) > 1})
    if twice:
        raise ValueError(f"rules {label} put mesh axis {twice[0]!r} twice on {path} {shape} ({spec}); a mesh axis "
                         f"can split one dim of a parameter: map its logical axes {logical} to distinct mesh axes")
    for dim, (size, entry) in enumerate(zip(shape, spec)):
        parts = entry_parts(entry, mesh)
        if size % parts:
            name = logical[dim] if logical else None
            base = f"jlora.models.partitioning.{label.strip(chr(39)).upper()}" if label.strip("'") in PRESETS else label
            fix = (f"pass rules={{**{base}, {name!r}: None}} to keep it whole" if name
                   else "give it a rule that keeps that dim whole (None)")
            raise ValueError(f"{path} has shape {shape}, and its dim {dim} ({size}, logical axis {name!r}) is not "
                             f"divisible by the mesh axes {entry_axes(entry)} of the {_mesh_str(mesh)}, "
                             f"{parts} devices, under rules {label}: {fix}, pad that dim to a multiple of {parts}, "
                             f"or use a mesh whose axis size divides {size}")


def shardings(template, mesh, rules=None, *, architecture: str | None = None):
    """A tree shaped like `template` of `NamedSharding(mesh, spec)` (see `partition_specs`), e.g. for
    `jax.jit(module.init, out_shardings=...)` or `jax.device_put`."""
    specs = dict(partition_specs(template, mesh, rules, architecture=architecture))
    treedef = jax.tree_util.tree_structure(template)
    paths = [path for path, _ in named_leaves(template)]
    return jax.tree_util.tree_unflatten(treedef, [NamedSharding(mesh, specs[p]) for p in paths])

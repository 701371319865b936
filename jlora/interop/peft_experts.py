"""Mixture-of-experts adapters <-> PEFT's `target_parameters` (its `ParamWrapper`, PEFT 0.21).

A 3-D expert tensor W (E, d1, d2) (transformers' `experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I))
carries one jlora pair per expert, lora_a (E, d1, r) and lora_b (E, r, d2) (the expert axis a stacked prefix:
jlora.ragged, jlora.experts), W[e]'s update `scale * lora_a[e] @ lora_b[e]`.

PEFT's ParamWrapper gives each expert rank r as well (it does not divide r by the number of experts): lora_A is a
Linear(d2, E * r), lora_B a Linear(E * r, d1), scale alpha / r, and W[e]'s update is `scale * B_e @ A_e` with
`A_e = lora_A.weight.reshape(E, r, d2)[e]` and `B_e = lora_B.weight.reshape(d1, r, E)[:, :, e]` (expert-major rows
of A, expert-minor columns of B). So, exactly:

    lora_A.weight (E*r, d2) = lora_b.reshape(E * r, d2)
    lora_B.weight (d1, E*r) = lora_a.transpose(1, 2, 0).reshape(d1, r * E)

`target_parameters` lists the full parameter names (`model.layers.0.mlp.experts.gate_up_proj`); rank_pattern /
alpha_pattern entries are keyed by them too. The keys are those of the module holding the parameter: PEFT wraps a
module once per targeted parameter, in the order the module registers them (the first innermost), so with both
experts tensors targeted `gate_up_proj`'s factors are `<module>.base_layer.lora_A.weight` and `down_proj`'s
`<module>.lora_A.weight`. jlora orders a module's parameters as transformers registers them (`ORDER`); a module with
two or more targeted parameters not all in `ORDER` is a ValueError (the nesting, and so the keys, would be a guess).
Modules PEFT treats as `is_transposed` (GPT-OSS's experts (E, in, out)) map differently and are not covered.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")  # transformers' registration order in experts modules
PREFIX = "base_model.model."


def torch_name(path: str) -> str:
    """`params/model/layers/0/mlp/experts/gate_up_proj` -> `model.layers.0.mlp.experts.gate_up_proj`."""
    return ".".join(path.split("/")[1:])


def is_expert_pair(path: str, pair: dict) -> bool:
    """A pair on a 3-D parameter that is not a flax kernel / embedding: lora_a (E, d1, r), lora_b (E, r, d2)."""
    a, b = pair["lora_a"], pair["lora_b"]
    return path.rsplit("/", 1)[-1] not in ("kernel", "embedding") and a.ndim == 3 and b.ndim == 3


def _depths(names: list[str], where: str) -> dict[str, int]:
    """{parameter name: number of `.base_layer` in its keys} for the targeted parameters of one module."""
    if len(names) == 1:
        return {names[0]: 0}
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise ValueError(f"{where}: the parameters {sorted(names)} of one module are all targeted, and PEFT nests "
                         f"their wrappers in the order the torch module registers them, which jlora knows only for "
                         f"{ORDER} (not {unknown}): target one parameter of this module, or rename it")
    ordered = sorted(names, key=ORDER.index)
    return {n: len(ordered) - 1 - i for i, n in enumerate(ordered)}


def _by_module(names) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in names:
        module, _, param = name.rpartition(".")
        out.setdefault(module, []).append(param)
    return out


def export(experts: dict, config, tensors: dict, rank_pattern: dict, alpha_pattern: dict) -> list[str]:
    """Adds the PEFT tensors of `experts` ({path: pair}) to `tensors` and their rank / alpha overrides to the
    patterns; returns `target_parameters` (sorted full names). A ValueError for a pair PEFT cannot hold."""
    names = {torch_name(p): p for p in experts}
    for module, params in _by_module(names).items():
        for param, depth in _depths(params, f"{module}").items():
            path = names[f"{module}.{param}"]
            a, b = jnp.asarray(experts[path]["lora_a"]), jnp.asarray(experts[path]["lora_b"])
            if set(experts[path]) != {"lora_a", "lora_b"}:
                raise ValueError(f"{path}: {sorted(set(experts[path]) - {'lora_a', 'lora_b'})} on an expert tensor "
                                 f"has no PEFT equivalent (PEFT's target_parameters refuses DoRA)")
            r, e = config.rank_for(path), a.shape[0]
            if a.shape[2] != r or b.shape[:2] != (e, r) or (config.fused_for(path) is not None):
                raise ValueError(f"{path}: lora_a {a.shape} / lora_b {b.shape} is not a per-expert pair (E, d1, r) / "
                                 f"(E, r, d2) of rank {r}: PEFT's target_parameters has no equivalent")
            key = PREFIX + module + ".base_layer" * depth
            tensors[key + ".lora_A.weight"] = b.reshape(e * r, b.shape[2])
            tensors[key + ".lora_B.weight"] = jnp.transpose(a, (1, 2, 0)).reshape(a.shape[1], r * e)
            if r != config.rank:
                rank_pattern[f"{module}.{param}"] = r
            if config.alpha_for(path) != config.alpha:
                alpha_pattern[f"{module}.{param}"] = config.alpha_for(path)
    return sorted(names)


_KEY = re.compile(r"(.+?)((?:\.base_layer)*)\.(lora_A|lora_B)\.weight")


def targeted(cfg: dict, leaves) -> dict[str, tuple[str, object]]:
    """{full parameter name: (path, leaf)} of the 3-D non-kernel parameters `cfg["target_parameters"]` names, as
    PEFT matches them (the name, or a '.'-suffix of it); a ValueError for a matched parameter of another shape."""
    wanted = cfg.get("target_parameters") or []
    out = {}
    for path, w in leaves:
        name = torch_name(path)
        if not any(name == t or name.endswith("." + t) for t in wanted):
            continue
        if path.rsplit("/", 1)[-1] in ("kernel", "embedding", "bias") or w is None or len(w.shape) != 3:
            raise ValueError(f"target_parameters {wanted} names {name} ({path}, shape "
                             f"{None if w is None else tuple(w.shape)}): jlora reads PEFT target_parameters of 3-D "
                             f"expert tensors (E, out, in) only; adapt a Linear with target_modules instead")
        out[name] = (path, w)
    if wanted and not out:
        raise ValueError(f"target_parameters {wanted} match no parameter of the variables (PEFT refuses this "
                         f"too): load the adapter with the model it was trained on")
    return out


def take(cfg: dict, tensors: dict, leaves, *, source, peft_pattern) -> tuple[dict, dict, dict, set]:
    """Reads the expert factors out of `tensors` (a PEFT file's {key: array}): returns `(tensors left, {path: pair},
    {path: (rank, alpha)}, missing)`, `missing` the full names of targeted parameters without tensors. ValueErrors
    name the key for a rank that contradicts r / rank_pattern or a shape that does not fit the parameter."""
    params = targeted(cfg, leaves)
    depth_of = {}
    for module, names in _by_module(params).items():
        for param, depth in _depths(names, f"{source}: {module}").items():
            depth_of[(module, depth)] = f"{module}.{param}"
    found: dict[str, dict] = {}
    rest = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key.removeprefix(PREFIX))
        name = depth_of.get((m[1], m[2].count(".base_layer"))) if m else None
        if name is None:
            rest[key] = t
        else:
            found.setdefault(name, {})[m[3]] = (key, t)
    pairs, meta = {}, {}
    for name, parts in sorted(found.items()):
        path, w = params[name]
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{PREFIX}{name}: {source} holds only {sorted(parts)} for this target parameter; it "
                             f"needs lora_A and lora_B")
        (ka, ta), (kb, tb) = parts["lora_A"], parts["lora_B"]
        e, d1, d2 = w.shape
        r = peft_pattern(cfg.get("rank_pattern"), name, cfg["r"])
        if tuple(ta.shape) != (e * r, d2) or tuple(tb.shape) != (d1, e * r):
            raise ValueError(f"{ka} {tuple(ta.shape)} / {kb} {tuple(tb.shape)} do not fit {path} {tuple(w.shape)} "
                             f"with rank {r} per expert (r / rank_pattern): PEFT's ParamWrapper needs lora_A "
                             f"({e * r}, {d2}) and lora_B ({d1}, {e * r})")
        pairs[path] = {"lora_a": jnp.transpose(tb.reshape(d1, r, e), (2, 0, 1)), "lora_b": ta.reshape(e, r, d2)}
        meta[path] = (r, peft_pattern(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))
    return rest, pairs, meta, set(params) - set(found)

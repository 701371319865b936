"""An NNX module as a function of its state, in NNX's functional style (`nnx.split` / `nnx.merge`).

`lora_transform(model, config)` splits the module once into its static `GraphDef` and its `State`. Each call merges
the graphdef with the variables it is given (the whole state as a pure dict, LoRA applied to the targeted weights),
runs the module, and returns `(y, written)`: the output and the variables the call wrote (the RNG counts that
`nnx.Dropout` advances, BatchNorm's running statistics, any other Variable it assigned). `LoraTransform.apply` puts
`written` back into the frozen tree it returns, so `y, frozen = lora.apply(frozen, adapters, x)` is what
`y, (graphdef, state) = graphdef.apply(state)(x)` is without LoRA. Only written variables leave the function, so the
targeted weights never become outputs (which would materialise `W + delta`). Train/eval are static attributes of the
graphdef: `view` makes a new function from a copy of the module with those attributes set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from jlora.paths import named_leaves, path_str


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") and hasattr(x, "dtype") else x


@dataclasses.dataclass(frozen=True, eq=False)
class NnxFunction:
    """`f(variables, *args, **kwargs) -> (y, written)` for one NNX module; holds no arrays.

    `graphdef` is the module's structure and static attributes (train/eval mode); `abstract` its state as
    `ShapeDtypeStruct`s, which gives the variables' paths and `Variable` types for error messages and `view`.
    """

    graphdef: Any
    abstract: Any

    @classmethod
    def of(cls, module: nnx.Module) -> NnxFunction:
        graphdef, state = nnx.split(module)
        return cls(graphdef, jax.tree.map(_abstract, state))

    def kinds(self) -> dict[str, str]:
        """`{path: Variable type name}` for every variable of the module."""
        return {"/".join(str(k) for k in p): type(v).__name__ for p, v in nnx.to_flat_state(self.abstract)}

    def view(self, only=..., raise_if_not_found: bool = True, **attributes) -> NnxFunction:
        """This function with `attributes` set on the (filtered) submodules, as `nnx.view(model, **attributes)`
        or `Module.set_attributes` do it: train/eval mode without rebuilding anything from the arrays."""
        module = nnx.merge(self.graphdef, self.abstract)
        try:
            module.set_attributes(*(() if only is ... else (only,)), raise_if_not_found=raise_if_not_found,
                                  **attributes)
        except ValueError as e:
            raise ValueError(f"{e} in the NNX module wrapped by this LoraTransform; its submodules' static "
                             f"attributes (such as deterministic, use_running_average) are the ones to set") from None
        return dataclasses.replace(self, graphdef=nnx.split(module)[0])

    def check(self, variables) -> None:
        """Raises a ValueError naming the module's variables that `variables` lacks, or the ones it has extra."""
        kinds, have = self.kinds(), {p for p, _ in named_leaves(variables)}
        missing = [p for p in kinds if p not in have]
        if missing:
            listed = ", ".join(f"{p} ({kinds[p]})" for p in missing[:20])
            raise ValueError(f"the variables lack the NNX module's {listed}; pass the module's whole state, "
                             f"nnx.state(model), not a filtered one such as nnx.state(model, nnx.Param)")
        extra = sorted(have - set(kinds))
        if extra:
            raise ValueError(f"the variables hold {extra[:20]}, which the NNX module has no variable at: were they "
                             f"taken from another module? The module's variables are {sorted(kinds)[:40]}")

    def __call__(self, variables, *args, **kwargs):
        self.check(variables)
        module = nnx.merge(self.graphdef, variables)
        y = module(*args, **kwargs)
        before = dict(named_leaves(variables))
        after = named_leaves(nnx.to_pure_dict(nnx.state(module)))
        created = [p for p, _ in after if p not in before]
        if created:
            raise ValueError(f"the NNX module's call created the variables {created[:20]}; jlora threads the state "
                             f"the module had at lora_transform, so state created during the call would be lost. "
                             f"Create it in __init__ (its value then threads through lora.apply), or return it "
                             f"from __call__")
        return y, {p: v for p, v in after if v is not before[p]}


def thread(frozen, written: dict[str, Any], kinds: dict[str, str]):
    """`frozen` with the variables the call wrote replaced: same tree structure, so it can be a jit or scan carry.

    Raises a ValueError for a written variable whose frozen slot is None (it trains in full and lives in the
    adapters), since its new value would be lost.
    """
    present = {p for p, _ in named_leaves(frozen)}
    lost = sorted(p for p in written if p not in present)
    if lost:
        listed = ", ".join(f"{p} ({kinds.get(p, '?')})" for p in lost[:20])
        raise ValueError(f"the NNX module's call updated {listed}, which train in full (modules_to_save, or a bias "
                         f"per config.bias) and so live in the adapters, where the update would be lost; keep "
                         f"such state out of modules_to_save by naming only the Param leaves there "
                         f"(e.g. 'bn/scale', 'bn/bias' rather than 'bn')")
    return jax.tree_util.tree_map_with_path(lambda p, x: written.get(path_str(p), x), frozen)

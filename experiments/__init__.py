"""Studies and recipes built on jlora, each a module run as `python -m experiments.NAME`.

    python -m experiments.demo    # what `make demo` runs: LoRA on MiniLM for tweet sentiment, checkpoint, merge
    python -m experiments.nlu     # the paper's GLUE recipe on the tweets: LoRA vs full vs head vs PEFT, 3 seeds
    python -m experiments.alpha_over_r  # does alpha/r keep the best LR put across ranks? MiniLM + SmolLM2
    python -m experiments.nlg --task shakespeare  # the paper's NLG recipe (E2E with --task e2e), SmolLM2 run

Each module has a frozen `Config` dataclass (defaults commented with their arithmetic), the exact command in its
docstring, and command-line flags generated from the Config's fields by `parse_config`; nothing runs at import.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
import optax

__all__ = ["count_params", "dir_bytes", "parse_config", "plot_curves", "stopwatch", "write_results"]


def _field_type(tp) -> dict:
    """argparse keywords for a Config field annotation: str, int, float, `X | None`, `tuple[X, ...]`, `Literal[...]`
    (its values become the choices)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _field_type(tp)
    if origin is tuple:
        return dict(type=typing.get_args(tp)[0], nargs="+")
    if origin is typing.Literal:
        return dict(type=type(typing.get_args(tp)[0]), choices=typing.get_args(tp))
    return dict(type=tp)


def parse_config(cls, argv: Sequence[str] | None = None, *, quick: Mapping | None = None, description: str = ""):
    """`cls(...)` from command-line flags: one `--name` per field of the frozen dataclass `cls` (tuples take several
    values, bools take `--name` / `--no-name`), plus `--quick`, which applies the overrides in `quick` before the
    flags given. Fields not given keep their defaults."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=f"a fast smoke run: {dict(quick)}")
    for field in dataclasses.fields(cls):
        kwargs = _field_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if kwargs["type"] is bool:
            kwargs = dict(action=argparse.BooleanOptionalAction)
        parser.add_argument(f"--{field.name}", help=f"default {default}", **kwargs)
    given = vars(parser.parse_args(argv))
    overrides = dict(quick) if given.pop("quick", False) else {}
    overrides |= {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    return cls(**overrides)


def count_params(tree) -> int:
    """The number of scalars in the arrays of `tree` (None leaves count nothing)."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def stopwatch() -> Callable[[], tuple[float, float]]:
    """Starts a clock; calling the result gives (wall seconds, this process's CPU seconds over all its threads) since.
    On a shared machine the CPU seconds are the steadier measure of the work done."""
    wall, cpu = time.perf_counter(), time.process_time()
    return lambda: (time.perf_counter() - wall, time.process_time() - cpu)


def warmup_then_decay(lr: float, *, warmup: int, total: int) -> optax.Schedule:
    """Linear 0 -> lr over `warmup` steps, then lr -> 0 at step `total` (transformers' get_linear_schedule_with_warmup,
    which the paper's scripts use); step 0's rate is 0, or lr when warmup is 0."""
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.linear_schedule(lr, 0.0, max(total - warmup, 1))], [warmup])


def dir_bytes(path) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def write_results(out_dir, name: str, result: dict, report: str, plot: Callable | None = None) -> None:
    """`out_dir`/name.json (the result, with the config that produced it), name.md (`report`, also printed) and,
    with `plot(result, path)`, name.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(report)
    if plot is not None:
        plot(result, out / f"{name}.png")
    print(f"\n{report}\nwrote {out / name}.json, .md" + (", .png" if plot is not None else ""))


def plot_curves(path, curves: Mapping[str, Sequence[float]], *, smooth: int = 1, **labels) -> None:
    """A PNG of one line per `{label: values}`, each a `smooth`-point moving average; `labels` go to `Axes.set`
    (xlabel=, ylabel=, title=). Uses matplotlib's Figure directly: no pyplot, no backend, no global state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    for label, values in curves.items():
        ax.plot(np.convolve(np.asarray(values, float), np.ones(smooth) / smooth, mode="valid"), label=label)
    ax.set(**labels)
    ax.legend()
    fig.savefig(path, dpi=100)

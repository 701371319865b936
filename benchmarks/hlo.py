"""Deterministic figures read from a compiled XLA executable: the collectives in its HLO and its buffer sizes.

    compiled = jax.jit(step, in_shardings=..., out_shardings=...).lower(*args).compile()
    ops = hlo.collectives(compiled)       # [Collective(kind="all-reduce", shapes=((11, 7),), dtypes=("f32",), ...)]
    hlo.collective_bytes(ops)             # {"all-reduce": 5_432, ..., "total": ...}: bytes per call of the step
    hlo.memory(compiled)                  # {"argument_bytes": ..., "output_bytes": ..., "temp_bytes": ..., ...}

`compiled.as_text()` of an SPMD program is the per-device program, so every shape and byte count here is per device.
A collective is all-reduce, all-gather, reduce-scatter, all-to-all or collective-permute (ragged-all-to-all and
collective-broadcast too); the asynchronous pair `X-start` / `X-done` is one collective of kind X (its operands
those of the start, its results those of the done). A collective inside a `while` body (a `scan` over layers) runs
once per iteration: `count` is the product of the known trip counts of the loops around it (1 and `exact=False`
where XLA does not know a trip count); every branch of a `conditional` is counted as if it ran (an upper bound).
Nothing here runs at import.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute",
         "collective-broadcast")

# bytes per element of each HLO element type (sub-byte types rounded up to one byte each)
DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
               "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3": 1, "f8e3m4": 1, "f4e2m1fn": 1, "f8e8m0fnu": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16, "token": 0}

_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<rest>.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\(.*->.*\{\s*$")
_OPCODE = re.compile(r"^\s*(?P<op>[a-z][\w\-]*)\(")
_CALLEE = re.compile(r"\b(body|calls|to_apply|branch_computations|true_computation|false_computation)="
                     r"\{?(%?[^\s,}]+(?:,\s*%[^\s,}]+)*)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an HLO shape: element type name (`f32`, `bf16`, ...) and dimensions."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES.get(self.dtype, 0)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the per-device program.

    `kind`: one of `KINDS` (an async start/done pair under its plain name); `name`: the HLO instruction (the start's
    for a pair); `computation`: the HLO computation holding it; `operands` / `results`: the arrays it reads and
    writes (a tuple-shaped all-reduce of several gradients lists them all; the async bookkeeping scalars are
    dropped); `count`: how many times it runs per call (loop trip counts); `exact`: False where a loop around it has
    no known trip count (counted once)."""

    kind: str
    name: str
    computation: str
    operands: tuple[Array, ...]
    results: tuple[Array, ...]
    count: int = 1
    exact: bool = True

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The result shapes (for an all-gather the gathered, for a reduce-scatter the scattered shape)."""
        return tuple(a.shape for a in self.results)

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(a.dtype for a in self.results)

    @property
    def bytes(self) -> int:
        """Bytes moved per execution: the larger of operands and results (the full buffer: what an all-reduce
        reduces, an all-gather gathers, a reduce-scatter scatters)."""
        return max(sum(a.nbytes for a in self.operands), sum(a.nbytes for a in self.results))

    @property
    def total_bytes(self) -> int:
        """`bytes * count`: bytes moved by this op per call of the program."""
        return self.bytes * self.count

    def touches(self, shape: Iterable[int]) -> bool:
        """True if any operand or result has exactly this shape."""
        shape = tuple(shape)
        return any(a.shape == shape for a in self.operands + self.results)


def parse_arrays(text: str) -> tuple[Array, ...]:
    """The arrays of an HLO shape string, in order: `f32[11,7]{1,0}` -> (Array('f32', (11, 7)),); a tuple
    `(f32[3]{0}, bf16[2,2]{1,0})` -> both; unknown element types are kept with 0 bytes per element."""
    text = re.sub(r"/\*.*?\*/", "", text)
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in DTYPE_BYTES:
            continue
        dims = [d.strip().lstrip("<=") for d in dims.split(",") if d.strip()]
        out.append(Array(dtype, tuple(int(d) for d in dims)))
    return tuple(out)


def _split_shape(rest: str) -> tuple[str, str]:
    """`rest` of an instruction line -> (its shape text, what follows)."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[: i + 1], rest[i + 1:]
    return rest, ""


def _operand_names(tail: str) -> list[str]:
    """The names inside the opcode's parentheses of `op(%a, %b), attrs...`."""
    start = tail.index("(")
    depth = 0
    for i in range(start, len(tail)):
        depth += {"(": 1, ")": -1}.get(tail[i], 0)
        if depth == 0:
            return re.findall(r"%([^\s,()]+)", tail[start:i])
    return re.findall(r"%([^\s,()]+)", tail[start:])


@dataclasses.dataclass
class _Instr:
    name: str
    computation: str
    op: str
    results: tuple[Array, ...]
    operands: list[str]
    attrs: str


def _instructions(text: str) -> tuple[list[_Instr], str | None]:
    """Every instruction of the module text, and the name of the ENTRY computation."""
    out, computation, entry = [], None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and " = " not in line.split("->")[0]:
            computation = header.group("name")
            if line.startswith("ENTRY"):
                entry = computation
            continue
        m = _INSTRUCTION.match(line)
        if computation is None or m is None:
            continue
        shape, tail = _split_shape(re.sub(r"/\*.*?\*/", "", m.group("rest")))
        op = _OPCODE.match(tail)
        if op is None:
            continue
        out.append(_Instr(m.group("name"), computation, op.group("op"), parse_arrays(shape), _operand_names(tail),
                          tail[op.end():]))
    return out, entry


def _multipliers(instrs: list[_Instr], entry: str | None) -> dict[str, tuple[int, bool]]:
    """computation -> (times it runs per call of ENTRY, whether every trip count on the way is known)."""
    calls: dict[str, list[tuple[str, int, bool]]] = {}
    for ins in instrs:
        for key, names in _CALLEE.findall(ins.attrs):
            trip = _TRIP.search(ins.attrs) if ins.op == "while" and key == "body" else None
            unknown = ins.op == "while" and key == "body" and trip is None
            for callee in re.findall(r"%?([^\s,%]+)", names):
                calls.setdefault(callee, []).append((ins.computation, int(trip.group(1)) if trip else 1, not unknown))
    memo: dict[str, tuple[int, bool]] = {}

    def visit(name: str) -> tuple[int, bool]:
        if name not in memo:
            if name == entry or name not in calls:
                memo[name] = (1, True)
            else:
                memo[name] = (0, True)  # guards a cycle (none in valid HLO)
                total, exact = 0, True
                for caller, trip, known in calls[name]:
                    n, ok = visit(caller)
                    total, exact = total + n * trip, exact and ok and known
                memo[name] = (max(total, 1), exact)
        return memo[name]

    return {ins.computation: visit(ins.computation) for ins in instrs}


def _as_text(program: Any) -> str:
    """The HLO text of a compiled executable, or `program` itself if it is HLO text. A lowered (not yet compiled)
    program is a TypeError: its text is StableHLO, before XLA's SPMD partitioner has inserted any collective."""
    if isinstance(program, str):
        if "HloModule" not in program:
            raise ValueError("expected the HLO text of a compiled executable (it starts with 'HloModule'); "
                             "pass jax.jit(f).lower(...).compile() or its .as_text()")
        return program
    if hasattr(program, "as_text") and hasattr(program, "memory_analysis"):
        return program.as_text()
    raise TypeError(f"expected a compiled executable (jax.jit(f).lower(...).compile()) or its HLO text, got "
                    f"{type(program).__name__}; a Lowered program has no collectives yet: call .compile() first")


def collectives(program: Any) -> list[Collective]:
    """The collectives of `program` (a `jax.stages.Compiled` or its `.as_text()`), in program order.

    An async `X-start` / `X-done` pair is reported once, as kind X, with the start's operands and the done's
    results; `count` multiplies in the trip counts of the `while` loops around the op."""
    instrs, entry = _instructions(_as_text(program))
    shapes = {ins.name: ins.results for ins in instrs}
    done = {ins.operands[0]: ins for ins in instrs if ins.op.endswith("-done") and ins.operands}
    mult = _multipliers(instrs, entry)
    out = []
    for ins in instrs:
        kind = ins.op.removesuffix("-start")
        if kind not in KINDS or ins.op.endswith("-done"):
            continue
        operands = tuple(a for name in ins.operands for a in shapes.get(name, ()))
        results = ins.results
        if ins.op.endswith("-start"):
            results = done[ins.name].results if ins.name in done else results[len(operands):] or results
        count, exact = mult.get(ins.computation, (1, True))
        out.append(Collective(kind, ins.name, ins.computation, operands, results, count, exact))
    return out


def collective_bytes(ops: Iterable[Collective]) -> dict[str, int]:
    """`{kind: bytes moved per call, ..., "total": sum}` over `ops` (each op's `total_bytes`); kinds absent are 0."""
    out = dict.fromkeys(KINDS, 0)
    for op in ops:
        out[op.kind] += op.total_bytes
    out["total"] = sum(out[k] for k in KINDS)
    return out


def summary(ops: Iterable[Collective]) -> list[dict[str, Any]]:
    """One JSON-able row per collective: kind, shapes, dtypes, bytes per execution, count, total bytes."""
    return [{"kind": op.kind, "shapes": [list(s) for s in op.shapes], "dtypes": list(op.dtypes), "bytes": op.bytes,
             "count": op.count, "total_bytes": op.total_bytes, "exact": op.exact} for op in ops]


def memory(compiled: Any) -> dict[str, int]:
    """XLA's buffer sizes of a compiled executable, per device: `argument_bytes`, `output_bytes`, `temp_bytes`,
    `alias_bytes` (outputs that reuse donated arguments, counted in both argument and output), `generated_code_bytes`,
    and `total_bytes` = argument + output + temp (as `benchmarks.common.xla_cost`). A TypeError for anything not
    compiled, a ValueError where the backend gives no analysis."""
    if not hasattr(compiled, "memory_analysis"):
        raise TypeError(f"memory() needs a compiled executable (jax.jit(f).lower(...).compile()), got "
                        f"{type(compiled).__name__}")
    mem = compiled.memory_analysis()
    if mem is None:
        raise ValueError("this backend gives no memory_analysis for the executable")
    out = {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
           "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
           "generated_code_bytes": int(mem.generated_code_size_in_bytes)}
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    return out

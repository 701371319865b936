"""The targets summary: reads the benchmarks' JSON results and writes results/targets.md, one row per target with
the ratio measured in one run and whether it is met.

    python -m benchmarks.report            # after train_step, inference (and flops); writes results/targets.{json,md}
    python -m benchmarks.report --quick    # from the *_quick results; writes results/targets_quick.{json,md}

Ratios are read at the first batch size of each benchmark (8 on the CPU), within one run: train steps from
train_step.json (medians of interleaved rounds), forward passes from inference.json, peak memory from the child
processes' VmHWM in train_step.json (XLA's memory_analysis ratio beside it), compile time as the median of
trace + lower + XLA compile. A file that is missing makes its rows "not measured"; the XLA FLOP floor comes from
the same train_step run (cost_analysis of the compiled steps). Issue 14's many-adapter targets (sweep wall time,
mixed-batch tokens/s) are read from multi_adapter.json as that benchmark judged them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import common, multi_adapter_report


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Where the results are and what the targets are."""

    out_dir: str = "results"  # read from and written to
    suffix: str = ""  # "_quick" for the quick results
    jlora_all_over_full: float = 0.75  # jlora step, all dense kernels adapted, / full fine-tuning
    jlora_qv_over_full: float = 0.65  # jlora step, q,v adapted, / full fine-tuning
    jlora_over_merge: float = 0.90  # jlora / merge-then-apply, all dense kernels
    jlora_over_peft: float = 1.0  # jlora step / PEFT's on the same model shape and CPU
    merged_tolerance: float = 0.03  # |merged / base - 1|
    factored_over_base: float = 1.05  # factored inference / base
    memory_over_full: float = 0.70  # peak memory of a jlora step / full fine-tuning
    compile_over_full: float = 1.5  # compile time (trace + lower + compile) / full fine-tuning
    name: str = "targets"

    def for_gpu(self) -> Config:
        return self


QUICK = Config(suffix="_quick", name="targets_quick")


def load(config: Config, name: str) -> dict[str, Any] | None:
    gpu = "_gpu" if common.on_gpu() else ""
    path = Path(config.out_dir) / f"{name}{config.suffix}{gpu}.json"
    return json.loads(path.read_text()) if path.exists() else None


def first_batch(result: dict[str, Any]) -> dict[str, Any]:
    """train_step: the main dtype's first batch size."""
    passes = result["passes"][result["config"]["dtype"]]["batches"]
    return passes[str(result["config"]["batches"][0])]


def row(target: str, value: float | None, threshold: float, *, how: str, source: str, note: str = "",
        met: bool | None = None) -> dict[str, Any]:
    status = "not measured" if value is None else "met" if (value <= threshold if met is None else met) else "missed"
    return {"target": target, "measured": value, "threshold": threshold, "status": status, "how": how,
            "source": source, "note": note}


def train_rows(config: Config, ts: dict[str, Any] | None) -> list[dict[str, Any]]:
    src = f"train_step{config.suffix}.json"
    if ts is None:
        con, batch = {}, "?"
    else:
        b = first_batch(ts)
        con, batch = b["contenders"], b["batch"]

    def med(name):
        return con[name]["time"]["median_s"] if name in con else None

    def load(*names):
        try:
            figures = "/".join(common.cores(con[n]["time"]["other_cores_median"]) for n in names)
            return f"other load {figures} cores"
        except KeyError:
            return ""

    def mins(a, b):
        try:
            return f"ratio of mins {con[a]['time']['min_s'] / con[b]['time']['min_s']:.3f}"
        except KeyError:
            return ""

    def div(a, b):
        return None if a is None or b is None else a / b

    def xla_ratio(name, key, base="full"):
        try:
            return con[name]["xla"][key] / con[base]["xla"][key]
        except (KeyError, TypeError, ZeroDivisionError):
            return None

    rows = [
        row("jlora step, all dense kernels <= 0.75 x full fine-tuning", div(med("jlora[all]"), med("full")),
            config.jlora_all_over_full, how=f"median step time ratio, batch {batch}", source=src,
            note=f"XLA FLOPs ratio (floor) {_fmt(xla_ratio('jlora[all]', 'flops'))}; {mins('jlora[all]', 'full')}; "
                 f"{load('jlora[all]', 'full')}"),
        row("jlora step, q,v <= 0.65 x full fine-tuning", div(med("jlora[qv]"), med("full")),
            config.jlora_qv_over_full, how=f"median step time ratio, batch {batch}", source=src,
            note=f"XLA FLOPs ratio {_fmt(xla_ratio('jlora[qv]', 'flops'))}; {mins('jlora[qv]', 'full')}; "
                 f"{load('jlora[qv]', 'full')}"),
        row("jlora <= 0.90 x merge-then-apply, all dense kernels", div(med("jlora[all]"), med("merge[all]")),
            config.jlora_over_merge, how=f"median step time ratio, batch {batch}", source=src,
            note=f"XLA FLOPs ratio {_fmt(xla_ratio('jlora[all]', 'flops', 'merge[all]'))}; "
                 f"{mins('jlora[all]', 'merge[all]')}; {load('jlora[all]', 'merge[all]')}"),
    ]
    for kind in common.LORA_KINDS:
        extra = " (PEFT adapts all of c_attn: q, k, v)" if kind == "qv" else ""
        rows.append(row(f"jlora step <= PEFT's, {kind}{extra}", div(med(f"jlora[{kind}]"), med(f"peft[{kind}]")),
                        config.jlora_over_peft, how=f"median step time ratio, batch {batch}, same CPU and run",
                        source=src, note=f"{mins(f'jlora[{kind}]', f'peft[{kind}]')}; "
                                         f"{load(f'jlora[{kind}]', f'peft[{kind}]')}"))
    for kind in ("all", "qv"):
        xla = xla_ratio(f"jlora[{kind}]", "total_bytes")
        rows.append(row(f"peak memory of a jlora step ({kind}) <= 0.7 x full fine-tuning",
                        div(_mem(con, f"jlora[{kind}]"), _mem(con, "full")), config.memory_over_full,
                        how=f"peak RSS (VmHWM) of a child process, batch {batch}", source=src,
                        note=f"XLA memory_analysis (arg+out+temp) ratio {_fmt(xla)}"))
    for kind in ("all", "qv"):
        trace = div(_compile(con, f"jlora[{kind}]", "trace_s"), _compile(con, "full", "trace_s"))
        rows.append(row(f"compile time, jlora ({kind}) <= 1.5 x full fine-tuning",
                        div(_compile(con, f"jlora[{kind}]"), _compile(con, "full")), config.compile_over_full,
                        how="median trace + lower + XLA compile of a fresh jit", source=src,
                        note=f"trace alone {_fmt(trace)} x full"))
    return rows


def inference_rows(config: Config, inf: dict[str, Any] | None) -> list[dict[str, Any]]:
    src = f"inference{config.suffix}.json"
    con, batch = {}, "?"
    if inf is not None:
        b = inf["forward"][str(inf["config"]["forward_batches"][0])]
        con, batch = b["contenders"], b["batch"]

    def r(name):
        return con[name]["ratio_to_base"] if name in con else None

    merged = r("merged")
    tol = config.merged_tolerance
    rows = [row("merged inference within 3% of the base model", merged, 1 + tol,
                how=f"forward median time ratio, batch {batch}; met when within {1 - tol:g}..{1 + tol:g}",
                source=src, met=None if merged is None else abs(merged - 1) <= tol)]
    for kind in ("all", "qv"):
        rows.append(row(f"factored inference ({kind}) <= 1.05 x base", r(f"factored[{kind}]"),
                        config.factored_over_base, how=f"forward median time ratio, batch {batch}", source=src))
    return rows


def multi_rows(config: Config, ma: dict[str, Any] | None) -> list[dict[str, Any]]:
    """issue 14's binding targets from multi_adapter.json (`benchmarks.multi_adapter_report.TARGETS`)."""
    src, measured = f"multi_adapter{config.suffix}.json", {t["target"]: t for t in (ma or {}).get("targets", [])}
    rows = []
    for what, _, limit, at_most, binding in multi_adapter_report.TARGETS:
        t = measured.get(what)
        if binding:
            rows.append(row(f"{what} {'<=' if at_most else '>='} {limit:g}", t and t["value"], limit, source=src,
                            how="median wall time ratio" if at_most else "median tokens/s ratio, same batch and run",
                            met=None if t is None else t["met"]))
    return rows


def _mem(con, name):
    try:
        return con[name]["memory"]["peak_rss_bytes"]
    except (KeyError, TypeError):
        return None


def _compile(con, name, key="total_s"):
    try:
        return con[name]["compile"]["median"][key]
    except (KeyError, TypeError):
        return None


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def measure(config: Config) -> dict[str, Any]:
    ts, inf, ma = load(config, "train_step"), load(config, "inference"), load(config, "multi_adapter")
    rows = train_rows(config, ts) + inference_rows(config, inf) + multi_rows(config, ma)
    sources = {n: (r["created_utc"], r["machine"]["loadavg"]) if r else None
               for n, r in (("train_step", ts), ("inference", inf), ("multi_adapter", ma))}
    return {"rows": rows, "sources": sources, "quick": bool(config.suffix),
            "met": sum(r["status"] == "met" for r in rows), "missed": sum(r["status"] == "missed" for r in rows),
            "not_measured": sum(r["status"] == "not measured" for r in rows)}


def table(result: dict[str, Any]) -> str:
    lines = ["# Targets (ratios measured within one run of each benchmark)", "",
             f"{result['met']} met, {result['missed']} missed, {result['not_measured']} not measured.", ""]
    if result["quick"]:
        lines += ["Quick mode: tiny shapes that only check the code runs; these ratios say nothing about the "
                  "targets (run `make bench`).", ""]
    rows = [[r["target"], _fmt(r["measured"]), f"{r['threshold']:g}", f"**{r['status']}**", r["how"],
             r["note"], r["source"]] for r in result["rows"]]
    lines.append(common.md_table(["target", "measured ratio", "threshold", "status", "how", "also", "from"], rows,
                                 align="lrrllll"))
    for name, src in result["sources"].items():
        if src:
            lines.append(f"- {name}: run at {src[0]} (UTC), load average at the end {src[1]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    return common.run(common.choose(args, Config(), QUICK), measure, table)


if __name__ == "__main__":
    sys.exit(main())

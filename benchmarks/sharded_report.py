"""The targets' ratios and the Markdown report of `benchmarks.sharded`: per-device memory, collective bytes, the
targets and the largest collectives of each compiled step, from the result `benchmarks.sharded.measure` builds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from benchmarks import common, hlo

if TYPE_CHECKING:
    from benchmarks.sharded import Config

STEPS = ("jlora", "full")


def ratios(result: dict[str, Any], fsdp: str, limits: dict[str, tuple[str, float]]) -> dict[str, Any]:
    """Each ratio of `limits` (`benchmarks.sharded.TARGETS`) whose layouts were measured, with the layout `fsdp` in
    the FSDP ones: {name: {"what", "value", "limit", "numerator", "denominator", "passed"}}."""
    lay = result["layouts"]
    pairs = {}
    for name, layout in (("dp_collectives", "dp"), ("fsdp_collectives", fsdp)):
        if layout in lay:
            pairs[name] = (lay[layout]["jlora"]["collective_bytes"]["total"],
                           lay[layout]["full"]["collective_bytes"]["total"])
    if fsdp in lay and "unsharded" in lay:
        pairs["fsdp_memory"] = (lay[fsdp]["jlora"]["memory"]["arg_out_temp_bytes"],
                                lay["unsharded"]["jlora"]["memory"]["arg_out_temp_bytes"])
    out = {}
    for name, (num, den) in pairs.items():
        what, limit = limits[name]
        what = what.replace("FSDP", fsdp) if fsdp != "fsdp" else what
        value = num / den if den else None
        out[name] = {"what": what, "value": value, "limit": limit, "numerator": num, "denominator": den,
                     "passed": value is not None and value <= limit}
    if "fsdp_memory" in out:  # the same ratio on argument + temp alone (the wording), for the record
        num, den = (lay[k]["jlora"]["memory"]["arg_temp_bytes"] for k in (fsdp, "unsharded"))
        out["fsdp_memory"]["arg_temp_value"] = num / den if den else None
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def table(config: Config, result: dict[str, Any]) -> str:
    c, lay = config, result["layouts"]
    lines = [f"# Sharded train step: {common.gpt2_label(c)}, AdamW, {c.devices} devices ({result['backend']}): "
             "per-device memory and collective bytes, LoRA vs full fine-tuning", "",
             f"`jlora.models.gpt2.GPT2LMHeadModel`: n_layer={c.n_layer}, n_embd={c.n_embd}, n_head={c.n_head}, "
             f"vocab_size={c.vocab_size:,}, n_positions={c.n_positions}; batch {c.batch}, seq {c.seq}, computing in "
             f"{c.dtype}. LoRA `{c.lora}` ({common.LORA_TITLES.get(c.lora, c.lora)}), r={c.rank}, alpha={c.alpha:g}: "
             f"{result['adapter_params']:,} adapter parameters, {100 * result['adapter_params'] / result['params']:.2f}"
             f" % of {result['params']:,}. Steps: `jlora` (grad w.r.t. the adapters through `lora.apply`) and "
             "`full` (every parameter), `common.train_steps`, trained tree and AdamW state donated. Layouts: "
             f"dp = batch over ('data': {c.devices}), weights replicated; fsdp = batch and every weight's embed "
             f"axis over ('data': {c.devices}) (preset 'fsdp'; XLA's partitioner chooses how to compute each "
             "product); fsdp_gather = the same, each weight constrained to replicated where the step reads it "
             f"(all-gathered at use, ZeRO-3; for comparison, no target); tp = ('model': {c.devices}), preset 'tp' "
             "with the vocabulary kept whole, batch replicated. Adapters placed by `jlora.adapter_shardings`, AdamW "
             "moments like their parameters. Every figure is per device and read from the compiled program "
             "(nothing executes): XLA's `memory_analysis()` and the collectives of the HLO (`benchmarks.hlo`), in "
             "MB (10^6 bytes).", ""]
    rows = []
    for layout, x in lay.items():
        for step in STEPS:
            m, base = x[step]["memory"], lay.get("unsharded", {}).get(step, {}).get("memory", {})
            rows.append([layout, step, _mb(m["argument_bytes"]), _mb(m["output_bytes"]), _mb(m["temp_bytes"]),
                         _mb(m["alias_bytes"]), _mb(m["arg_out_temp_bytes"]),
                         common.ratio(m["arg_out_temp_bytes"], base.get("arg_out_temp_bytes")),
                         common.ratio(m["arg_out_temp_bytes"], x["full"]["memory"]["arg_out_temp_bytes"]),
                         common.flops(x[step]["flops"])])
    lines += ["## Per-device memory (memory_analysis, MB)", "",
              common.md_table(["layout", "step", "argument", "output", "temp", "aliased (donated)",
                               "arg+out+temp", "/ unsharded same step", "/ full same layout", "XLA FLOPs"], rows,
                              align="llrrrrrrrr")]
    kinds = [k for k in hlo.KINDS if any(x[s]["collective_bytes"][k] for x in lay.values() for s in STEPS)]
    rows = []
    for layout, x in lay.items():
        for step in STEPS:
            b = x[step]["collective_bytes"]
            rows.append([layout, step, *(_mb(b[k]) for k in kinds), _mb(b["total"]), x[step]["collective_ops"],
                         common.ratio(b["total"], x["full"]["collective_bytes"]["total"], 4)])
    lines += ["## Bytes moved by collectives per step (per device, MB)", "",
              common.md_table(["layout", "step", *kinds, "total", "ops", "/ full"], rows)]
    rows = [[t["what"], f"{t['value']:.4f}" if t["value"] is not None else "n/a", f"<= {t['limit']}",
             f"{common.size(t['numerator'])} / {common.size(t['denominator'])}", "pass" if t["passed"] else "FAIL"]
            for t in result["targets"].values()]
    lines += ["## Targets", "", common.md_table(["target", "measured", "limit", "bytes", "result"], rows,
                                                align="lrrrl")]
    memory = result["targets"].get("fsdp_memory", {})
    if memory.get("arg_temp_value") is not None:
        lines += [f"The memory ratio on argument + temp alone (without the outputs): "
                  f"{memory['arg_temp_value']:.4f}.", ""]
    if result.get("fsdp_gather"):
        rows = [[t["what"], f"{t['value']:.4f}" if t["value"] is not None else "n/a", f"(<= {t['limit']})",
                 f"{common.size(t['numerator'])} / {common.size(t['denominator'])}"]
                for t in result["fsdp_gather"].values()]
        lines += ["The FSDP ratios with each weight all-gathered at use (fsdp_gather; for comparison, not a target):",
                  "", common.md_table(["ratio", "measured", "(the fsdp limit)", "bytes"], rows, align="lrrr")]
    rows = []
    for layout, x in lay.items():
        for step in STEPS:
            for r in x[step]["largest_collectives"][:3]:
                shapes = ", ".join(f"{d}{s}" for d, s in zip(r["dtypes"], r["shapes"]))
                rows.append([layout, step, r["kind"], shapes[:80] + ("..." if len(shapes) > 80 else ""),
                             r["count"], _mb(r["total_bytes"])])
    lines += ["## The largest collectives of each step", "",
              common.md_table(["layout", "step", "kind", "result shapes", "count", "MB"], rows, align="lllrrr")]
    notes = ["- arg+out+temp is `common.xla_cost`'s total: it counts a donated buffer twice (as argument and as the "
             "output aliasing it); minus the `aliased` column it bounds what the step holds at its peak. The .json "
             "has both, and argument + temp.",
             "- A collective's bytes are the larger of its operands and results (the full buffer an all-reduce "
             "reduces, an all-gather gathers), per device, per execution; an all-reduce's wire traffic in a ring is "
             "about twice that."]
    missed = result["targets"].get("fsdp_memory", {})
    if missed and not missed["passed"] and lay["fsdp"]["jlora"]["largest_collectives"]:
        top = lay["fsdp"]["jlora"]["largest_collectives"][0]
        shape = ", ".join(f"{d}{s}" for d, s in zip(top["dtypes"], top["shapes"]))
        gathered = result.get("fsdp_gather", {}).get("fsdp_memory", {}).get("value")
        notes.append(f"- fsdp: the LoRA step's largest collective: {top['kind']} of {shape} "
                     f"({_mb(top['total_bytes'])} MB). Where a product contracts over an axis split on the mesh axis "
                     "that also splits the batch (every weight's embed axis under the 'fsdp' preset), XLA's "
                     "partitioner keeps the weight split and moves activations instead: it gathers the whole batch's "
                     "activations and all-reduces whole-batch partial products, so each device holds whole-batch "
                     "activations (temp above)."
                     + (f" Gathering each weight where it is read (fsdp_gather) gives {gathered:.4f}." if gathered
                        is not None else ""))
    if not all(x[s]["all_exact"] for x in lay.values() for s in STEPS):
        notes.append("- Some collective sits in a loop of unknown trip count and was counted once.")
    return "\n".join(lines + notes) + "\n"

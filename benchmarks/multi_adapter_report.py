"""benchmarks.multi_adapter's target checks (issue 14, requirement 6) and its Markdown tables; nothing runs at
import."""

from __future__ import annotations

from typing import Any

from benchmarks import common

# (name, where in the result, limit, at most (True) or at least, binding): the targets
TARGETS = (
    ("sweep: stacked total wall time / sequential", ("sweep", "stacked_over_sequential"), 0.6, True, True),
    ("serving prefill: mixed tokens/s / single adapter's", ("serving", "ratios", "prefill_single"), 0.85, False, True),
    ("serving decode: mixed tokens/s / single adapter's", ("serving", "ratios", "decode_single"), 0.85, False, True),
    ("serving prefill: mixed tokens/s / loop over adapters'", ("serving", "ratios", "prefill_loop"), 3.0, False, True),
    ("serving decode: mixed tokens/s / loop over adapters'", ("serving", "ratios", "decode_loop"), 3.0, False, True),
    ("serving prefill + decode: mixed / single (shown)", ("serving", "ratios", "total_single"), 0.85, False, False),
    ("serving prefill + decode: mixed / loop (shown)", ("serving", "ratios", "total_loop"), 3.0, False, False),
)


def _get(result: dict[str, Any], keys: tuple[str, ...]):
    for k in keys:
        result = result[k]
    return result


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: the measured ratio, the limit, met or not."""
    rows = []
    for what, keys, limit, at_most, binding in TARGETS:
        value = float(_get(result, keys))
        rows.append({"target": what, "field": ".".join(keys), "limit": limit, "at_most": at_most, "value": value,
                     "met": value <= limit if at_most else value >= limit, "binding": binding})
    return rows


def _us(x: float) -> str:
    return f"{x * 1e6:.1f}"


def sweep_table(config, sw: dict[str, Any]) -> list[str]:
    c = config
    lines = [f"## Sweep: K = {sw['k']} adapters trained for {sw['steps']} steps, one program vs one run each", "",
             f"{sw['weights']}; BertForSequenceClassification, encoder and head frozen, LoRA on "
             f"{', '.join(c.sweep_targets)}, ranks {', '.join(map(str, c.sweep_ranks))} (alpha {c.sweep_alpha:g}), "
             f"Adam at learning rates {', '.join(f'{x:g}' for x in c.sweep_lrs)}; batch {c.sweep_batch} x "
             f"{c.sweep_seq} tokens, the same {sw['steps']} batches for every adapter. Total wall time from nothing: "
             f"lora.init of the K adapters, tracing and compiling, every step. `sequential` = K runs each with its "
             f"own `jax.jit` step (K compilations); `stacked` = `jlora.multi.stack` + `stacked_optimizer(optax.adam, "
             f"learning_rate=[...])` + `multi.train_step` (one compilation). {c.sweep_rounds} interleaved round(s), "
             f"median; every run compiles afresh.", ""]
    rows = []
    for name, x in sw["contenders"].items():
        t = x["time"]
        part = {k: sum(p[k] for p in x["parts"]) / len(x["parts"]) for k in x["parts"][0]}
        rows.append([name, common.secs(t["median_s"]), f"{common.secs(t['min_s'])}–{common.secs(t['max_s'])}",
                     f"{part['init_s']:.2f}", f"{part['first_steps_s']:.2f}", f"{part['rest_s']:.2f}",
                     f"{sw['per_step_s'][name]:.3f}", common.cores(t["other_cores_median"])])
    lines.append(common.md_table(["contender", "total (s)", "min–max (s)", "init (s)", "first step(s), compiling (s)",
                                  "other steps (s)", "per step of all K (s)", "other load (cores)"], rows))
    fixed, ext = sw["fixed_s"], sw["extrapolated_ratio"]
    at = ", ".join(f"{ext[n]:.3f} at {n} steps" for n in ext if n != "inf")
    lines += [f"**stacked / sequential total: {sw['stacked_over_sequential']:.3f}** (target <= 0.6) at {sw['steps']} "
              f"steps. Fixed cost (init + first, compiling steps): {fixed['stacked']:.1f} s stacked vs "
              f"{fixed['sequential']:.1f} s sequential; then per step of all K: stacked / sequential "
              f"{ext['inf']:.3f}, the ratio a very long sweep tends to. From these parts (extrapolated, not "
              f"measured): {at}. Stacked equals sequential: max |loss difference| {sw['max_abs_diff_losses']:.2e}, "
              f"max |adapter difference| after {sw['steps']} steps {sw['max_abs_diff_adapters']:.2e}.", ""]
    return lines


def serving_table(config, sv: dict[str, Any]) -> list[str]:
    c = config
    lines = [f"## Serving: {sv['batch']} prompts, each its own adapter, greedy {c.new_tokens} tokens", "",
             f"{common.gpt2_label(c)}, random weights; LoRA r={c.serve_rank}, alpha {c.serve_alpha:g} on every dense "
             f"kernel (c_attn, attn/mlp c_proj, c_fc), lora_b non-zero, a different adapter per prompt; prompts of "
             f"{c.prompt_len} tokens. Prefill = one call over the prompts (cache filled); decode = {c.new_tokens} "
             f"tokens ({c.new_tokens - 1} cached forward steps in one jitted loop). `mixed`: the batch in one call, "
             f"row i through adapter i (`multi.routed_apply`, adapter_ids = 0..{sv['batch'] - 1}); `single`: the "
             f"same batch through adapter 0 alone; `loop`: adapter by adapter, its prompt alone (batch 1); `base`: "
             f"no adapters. {c.warmup} warm-up + {c.serve_repeats} timed interleaved rounds, median.", ""]
    rows = []
    for name, x in sv["contenders"].items():
        p, d = x["prefill"], x["decode"]
        rows.append([name, f"{p['median_s'] * 1e3:.1f}", f"{p['tokens_per_s']:,.0f}", f"{d['median_s'] * 1e3:.1f}",
                     f"{d['tokens_per_s']:,.1f}", f"{x['total_tokens_per_s']:,.1f}",
                     f"{common.cores(p['other_cores_median'])} / {common.cores(d['other_cores_median'])}"])
    lines.append(common.md_table(["contender", "prefill (ms)", "prefill tokens/s", "decode (ms)", "decode tokens/s",
                                  "generated tokens/s (prefill + decode)", "other load (cores) prefill / decode"],
                                 rows))
    r = sv["ratios"]
    rows = [[f"mixed / {a}", f"{r[f'prefill_{a}']:.3f}", f"{r[f'decode_{a}']:.3f}", f"{r[f'total_{a}']:.3f}"]
            for a in ("single", "loop", "base")]
    lines += ["Tokens/s ratios (targets: mixed >= 0.85 x single, >= 3 x loop):", "",
              common.md_table(["", "prefill", "decode", "prefill + decode"], rows)]
    ch = sv["checks"]
    lines += [f"Checks: mixed-batch prefill logits vs each adapter alone, max |diff| "
              f"{ch['prefill_max_abs_diff_mixed_vs_alone']:.2e} (logits up to {ch['logit_scale']:.3g}); generated "
              f"tokens equal each adapter alone: {ch['tokens_equal_mixed_vs_alone']}; prefill + decode equals "
              f"`generate`: {ch['tokens_equal_decode_vs_generate']}; the rows' adapters differ from adapter 0 "
              f"(max |logit diff| {ch['rows_differ_mixed_vs_single']:.3g}).", ""]
    return lines


def kernel_table(config, kr: dict[str, Any]) -> list[str]:
    lines = ["## Routing method: the LoRA branch gathered per example (jlora.routing) vs `jax.lax.ragged_dot`", "",
             f"One adapted GPT-2 kernel, {config.serve_adapters} adapters of rank {config.serve_rank}, a batch of "
             f"{config.serve_adapters} examples each through its own adapter. gather: A[ids], B[ids] and two batched "
             f"products (what jlora.routing runs); ragged: rows pre-sorted by adapter (sorting outside the timing), "
             f"two `ragged_dot`s with the group sizes; single: one adapter for all rows (the floor); base: x @ W. "
             f"Microseconds per kernel per layer (a scan over {config.n_layer} layers, {config.kernel_calls} calls "
             f"per timed run, median of {config.kernel_repeats}).", ""]
    rows = []
    for case, per in kr.items():
        for name, x in per.items():
            ok = x.get("ragged_error") is None
            rows.append([case, name, x["rows"], f"{x['d_in']}x{x['d_out']}", _us(x["gather"]["kernel_s"]),
                         _us(x["ragged"]["kernel_s"]) if ok else "failed", _us(x["single"]["kernel_s"]),
                         _us(x["base"]["kernel_s"]), f"{x['ragged_over_gather']:.2f}" if ok else "n/a",
                         f"**{x['faster']}**", f"{x['max_abs_diff']:.1e}" if ok else "n/a"])
    lines.append(common.md_table(["case", "kernel", "rows", "W", "gather (µs)", "ragged_dot (µs)", "single (µs)",
                                  "base x @ W (µs)", "ragged / gather", "faster", "max |diff|"], rows,
                                 align="llrrrrrrrll"))
    errors = sorted({x["ragged_error"] for per in kr.values() for x in per.values() if x.get("ragged_error")})
    lines += [f"- ragged_dot failed to compile here: {e}" for e in errors]
    return lines + [""]


def table(config, result: dict[str, Any]) -> str:
    lines = [f"# Many adapters: a sweep in one program, a mixed batch, the routing kernels ({result['backend']})", "",
             f"Load average at the start {result['loadavg_start']}, after the sweep "
             f"{result['loadavg_after_sweep']}, at the end {result['loadavg_end']} (shared cores: other processes "
             f"slow every contender; ratios are within one run, `other load` = CPU cores other processes kept busy "
             f"during the timed runs).", ""]
    if config.name.endswith("_quick"):
        lines += ["Quick mode: tiny shapes that only check the code runs; the ratios say nothing about the targets.",
                  ""]
    lines += sweep_table(config, result["sweep"]) + serving_table(config, result["serving"])
    lines += kernel_table(config, result["kernels"])
    rows = [[t["target"], f"{'<=' if t['at_most'] else '>='} {t['limit']:g}", f"{t['value']:.3f}",
             "met" if t["met"] else "MISSED"] for t in result["targets"]]
    lines += ["## Targets (issue 14)", "", common.md_table(["target", "limit", "measured", ""], rows)]
    return "\n".join(lines) + "\n"

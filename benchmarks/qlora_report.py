"""benchmarks.qlora's target checks (issue 13) and its Markdown tables; nothing runs at import."""

from __future__ import annotations

from typing import Any

from benchmarks import common

# (field of a contender's result, limit, what): the targets, binding on nf4, shown for gguf too
TARGETS = (("frozen_ratio", 0.16, "frozen tree bytes / float32's"),
           ("step_peak_ratio", 0.45, "step peak (XLA memory_analysis) / float32 LoRA's"),
           ("time_ratio", 1.6, "median step time / float32 LoRA's"))
# what XLA's buffer assignment of the nf4 step shows (XLA_FLAGS=--xla_dump_to=DIR, *memory-usage-report.txt), for
# both models here (GPT-2 at seq 32 and 128, SmolLM2 at 128): said under the targets when the largest weight is an
# embedding
BUFFERS = ("Where nf4's extra temp goes (XLA's buffer assignment of the step, `XLA_FLAGS=--xla_dump_to=DIR`, "
           "`*memory-usage-report.txt`): one float32 copy of the tied token embedding (GPT-2 f32[50257,768], 147 MiB; "
           "SmolLM2 f32[49152,576], 108 MiB), dequantized again for the LM head's backward (dlogits @ E) while the "
           "logits' gradient f32[batch*seq, vocab] and every activation saved for the backward are alive; the layer "
           "kernels' dequantized copies share one buffer, one at a time. In jlora, the LM head's consumer could "
           "dequantize and multiply in vocab chunks and the embedding lookup gather rows of blocks before "
           "dequantizing; "
           "below the activation floor only rematerialization (QLoRA trains with gradient checkpointing) or a "
           "chunked cross-entropy can go.")
TITLES = {"smollm2": "SmolLM2-135M", "gpt2": "GPT-2 small shape (random weights)"}


def _why(field: str, name: str, model: dict[str, Any]) -> str:
    """Why a target is missed, from the figures themselves."""
    x, f32 = model["contenders"][name], model["contenders"]["float32"]
    if field == "step_peak_ratio":
        return (f"float32 LoRA's temp bytes (activations kept for the backward pass, the logits and their gradient) "
                f"are {model['activation_floor']:.2f} of its step peak: no compression of the frozen base can go "
                f"below that; {name}'s temp is {common.size(x['extra_temp_bytes'])} above float32's, the buffers of "
                f"the weights dequantized at their consumers (one at a time; the largest, {x['largest_weight']}, is "
                f"{common.size(x['largest_weight_f32_bytes'])} as float32)")
    if field == "frozen_ratio":
        return (f"{name}: {x['frozen_bytes'] / f32['frozen_bytes'] * 32:.2f} bits per float32 weight on average "
                f"(block scales/minimums, an 8-bit embedding, float32 norms and biases)")
    return (f"each quantized weight is dequantized twice a step (forward, and again in the backward pass: "
            f"jlora.deferred.consume), on {common.size(x['largest_weight_f32_bytes'])}-sized weights at most, "
            f"work the float32 step does not do")


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, quantized contender, target): the figure, the limit, met or not, and why where not."""
    rows = []
    for which, model in result["models"].items():
        for name in [n for n in ("nf4", "gguf") if n in model["contenders"]]:
            x = model["contenders"][name]
            for field, limit, what in TARGETS:
                met = x[field] <= limit
                rows.append({"model": which, "contender": name, "target": what, "field": field, "limit": limit,
                             "value": x[field], "met": met, "binding": name == "nf4",
                             "why": None if met else _why(field, name, model)})
    return rows


def _rss(x: dict[str, Any]) -> int | None:
    return x.get("memory", {}).get("peak_rss_bytes")


def _rise(x: dict[str, Any]) -> int | None:
    """How far RSS rose above its post-set-up level while the steps ran (compare with XLA's temp bytes)."""
    m = x.get("memory", {})
    return None if "peak_rss_bytes" not in m else m["peak_rss_bytes"] - m["rss_after_setup_bytes"]


def table(config, result: dict[str, Any]) -> str:
    c = config
    lines = [f"# QLoRA train step: float32 vs bfloat16 LoRA vs NF4 QLoRA vs GGUF-native ({result['backend']})", "",
             f"One jitted AdamW step on the adapters (LoRA r={c.rank}, alpha={c.alpha:g}, q and v), batch {c.batch} x "
             f"{c.seq} tokens, float32 logits; adapters and optimizer state donated. nf4: `jlora.quantize(..., "
             f"qtype='nf4', block_size={c.block_size}, double_quant=True)` of every kernel and embedding; gguf: "
             f"llama.cpp blocks (SmolLM2: the file's Q4_1 + Q8_0 embedding; GPT-2: encoded by the gguf package, "
             f"kernels q4_1, embeddings q8_0). Step peak = XLA memory_analysis argument + output + temp - alias. "
             f"Peak RSS: a child process per contender, VmHWM reset after loading and compiling, over "
             f"{c.memory_steps} steps (includes the Python/JAX runtime, the executable and the frozen tree; "
             f"`RSS rise` = that peak - the RSS after set-up). Times: contenders interleaved in one process, "
             f"{c.warmup} warm-up + {c.repeats} timed rounds, median; `other load` = CPU cores other "
             f"processes kept busy meanwhile. Load average at start {result['loadavg_start']}.", ""]
    for which, model in result["models"].items():
        con, f32 = model["contenders"], model["contenders"]["float32"]
        lines += [f"## {TITLES.get(which, which)}", ""]
        rows = []
        for name, x in con.items():
            xla = x["xla"]
            rows.append([name, common.size(x["frozen_bytes"]), f"{x['frozen_ratio']:.3f}",
                         common.size(xla["argument_bytes"]), common.size(xla["temp_bytes"]),
                         common.size(x["step_peak_bytes"]), f"{x['step_peak_ratio']:.3f}", common.size(_rss(x)),
                         common.ratio(_rss(x), _rss(f32)), common.size(_rise(x)), common.secs(x["time"]["median_s"]),
                         f"{x['time_ratio']:.3f}", f"{x['time_ratio_of_min']:.3f}",
                         common.cores(x["time"]["other_cores_median"])])
        lines.append(common.md_table(["contender", "frozen tree", "/ f32", "XLA argument", "XLA temp", "step peak",
                                      "/ f32", "peak RSS (steps)", "/ f32", "RSS rise", "median step (s)", "/ f32",
                                      "min / f32 min", "other load (cores)"], rows))
        lines.append(f"Activation floor (float32 LoRA's temp / its step peak): {model['activation_floor']:.3f}; "
                     f"load average at the end {model['loadavg_end']}.")
        if model["sweep"]:
            rows = []
            for seq, row in model["sweep"].items():
                fp = row["float32"]["step_peak_bytes"]
                rows.append([seq, common.size(fp), common.size(row.get("nf4", {}).get("step_peak_bytes")),
                             common.ratio(row.get("nf4", {}).get("step_peak_bytes"), fp),
                             f"{row['float32']['temp_bytes'] / fp:.3f}"])
            rows.append([f"{c.seq} (above)", common.size(f32["step_peak_bytes"]),
                         common.size(con.get("nf4", {}).get("step_peak_bytes")),
                         common.ratio(con.get("nf4", {}).get("step_peak_bytes"), f32["step_peak_bytes"]),
                         f"{model['activation_floor']:.3f}"])
            lines += ["", f"Step peak by sequence length (batch {c.batch}; compile only):", "",
                      common.md_table(["seq", "float32 step peak", "nf4 step peak", "nf4 / f32", "activation floor"],
                                      rows)]
        lines.append("")
    rows = [[TITLES.get(t["model"], t["model"]), t["contender"] + ("" if t["binding"] else " (shown)"), t["target"],
             f"<= {t['limit']}", f"{t['value']:.3f}", "met" if t["met"] else "MISSED"] for t in result["targets"]]
    lines += ["## Targets (issue 13; binding on nf4)", "",
              common.md_table(["model", "contender", "target", "limit", "measured", ""], rows)]
    lines += [f"- {TITLES.get(t['model'], t['model'])}, {t['contender']}, {t['target']}: {t['why']}"
              for t in result["targets"] if not t["met"]]
    if any("embed" in m["contenders"].get("nf4", {}).get("largest_weight", "") for m in result["models"].values()):
        lines.append(f"- {BUFFERS}")
    return "\n".join(lines) + "\n"

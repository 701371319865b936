"""experiments.quantized: the held-out perplexity's standard error and the paired comparison on hand-checked numbers,
`--quantize` on the Shakespeare smoke run (a tiny random Llama, NF4 base), and the bad flags."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import nlg, quantized
from jlora.qarray import QuantizedArray


def test_held_out_perplexity_and_its_standard_error_by_hand():
    r = quantized.held_out([10.0, 20.0], [5, 5])  # NLL per token 3; window means 2 and 4
    assert r["perplexity"] == pytest.approx(math.exp(3)) and r["nll_per_token"] == pytest.approx(3)
    # sqrt(((10 - 15)^2 + (20 - 15)^2) / (2 * 1)) / 5 = 1: se(mean NLL) = 1, se(ppl) = ppl * 1
    assert r["nll_se"] == pytest.approx(1.0) and r["perplexity_se"] == pytest.approx(math.exp(3))
    assert r["window_nll"] == [10.0, 20.0] and r["window_tokens"] == [5, 5]
    assert quantized.held_out([6.0], [3])["perplexity_se"] is None  # one window: no spread to estimate


def test_paired_ratio_its_error_and_bootstrap_by_hand():
    a, b = quantized.held_out([10.0, 20.0, 9.0], [5, 5, 3]), quantized.held_out([5.0, 15.0, 6.0], [5, 5, 3])
    p = quantized.paired(a, b)
    assert p["ratio"] == pytest.approx(math.exp(1.0)) and p["ratio"] == pytest.approx(a["perplexity"] / b["perplexity"])
    assert p["ratio_se"] == pytest.approx(0.0, abs=1e-12)  # every window differs by exactly 1 nat per token
    assert p["bootstrap_ci95"] == pytest.approx([math.exp(1.0)] * 2)
    c = quantized.held_out([12.0, 20.0, 9.0], [5, 5, 3])  # window 1 now 1.4 nats per token worse, the others 1
    q = quantized.paired(c, b)
    assert q["ratio"] == pytest.approx(math.exp(15 / 13)) and q["ratio_se"] > 0
    assert q["bootstrap_ci95"][0] < q["ratio"] < q["bootstrap_ci95"][1]
    with pytest.raises(ValueError, match="same held-out windows"):
        quantized.paired(a, quantized.held_out([1.0, 2.0, 3.0], [5, 5, 4]))


def test_quantize_frozen_uses_qloras_setting_and_leaves_the_rest():
    frozen = {"params": {"dense": {"kernel": jax.random.normal(jax.random.key(0), (11, 64)),
                                   "bias": jnp.ones((64,))}}}
    config = nlg.Config(task="shakespeare", quantize="nf4")
    q = quantized.quantize_frozen(config, frozen)["params"]["dense"]
    assert isinstance(q["kernel"], QuantizedArray) and q["kernel"].qtype == "nf4" and q["kernel"].double_quant
    assert q["kernel"].block_size == 64 and q["bias"] is frozen["params"]["dense"]["bias"]
    for other in ("", "gguf"):
        assert quantized.quantize_frozen(dataclasses.replace(config, quantize=other), frozen) is frozen
    d = quantized.describe({"params": {"dense": q}})
    assert d["params"] == 11 * 64 + 64 and d["leaves"] == {"float32": 1, "nf4": 1}
    assert d["frozen_bytes"] == 11 * 64 // 2 + 11 + 4 + 4 + 64 * 4  # codes, int8 scales, group scale, offset, bias
    assert quantized.load_options(dataclasses.replace(config, quantize="gguf")) == {"quantized": True}


@pytest.mark.parametrize("argv, match", [
    (["--quantize", "nf5"], "'nf5' is not one of"),
    (["--quantize", "gguf", "--quick"], "needs --task shakespeare with a GGUF"),
    (["--task", "e2e", "--quick", "--quantize", "nf4"], "--task shakespeare only"),
])
def test_bad_quantize_flags_are_refused_before_any_work(argv, match):
    argv = argv if "--task" in argv else ["--task", "shakespeare", *argv]
    with pytest.raises(ValueError, match=match):
        nlg.main(argv)


def test_shakespeare_quick_over_an_nf4_base_and_the_comparison(tmp_path):
    assert nlg.main(["--task", "shakespeare", "--quick", "--quantize", "nf4", "--out_dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "nlg_shakespeare_nf4_quick.json").read_text())
    assert result["config"]["quantize"] == "nf4" and result["base"]["leaves"].get("nf4", 0) >= 15
    assert result["base"]["ratio_to_float32"] < 0.2
    assert result["total"] == result["base"]["params"] + result["trainable"]
    after = result["after"]
    assert math.isfinite(after["perplexity"]) and after["perplexity_se"] > 0 and len(after["window_nll"]) == 2
    assert after["perplexity"] == pytest.approx(math.exp(sum(after["window_nll"]) / sum(after["window_tokens"])))
    assert "no nlg_shakespeare_quick.json" in result["vs_float32"]["note"]  # no float run in tmp_path yet
    # a float32-base run of the same config, 0.1 nat per token better on every window: the ratio is exp(0.1)
    ref = json.loads(json.dumps(result))
    ref["config"]["quantize"] = ""
    for when in ("before", "after"):
        ref[when].update(quantized.held_out(np.array(result[when]["window_nll"]) - 0.1 * np.array(
            result[when]["window_tokens"]), result[when]["window_tokens"]))
    (tmp_path / "nlg_shakespeare_quick.json").write_text(json.dumps(ref))
    config = nlg.Config(**{**result["config"], "lm_prompts": tuple(result["config"]["lm_prompts"])})
    vs = quantized.compared(result, config)["vs_float32"]
    assert vs["after"]["ratio"] == pytest.approx(math.exp(0.1)) and vs["target_met"] is (math.exp(0.1) <= 1.03)
    assert "vs the float32-base run" in quantized.report({**result, "vs_float32": vs})
    # the table of the runs, from their JSONs
    (tmp_path / "nlg_shakespeare_nf4_quick.json").write_text(json.dumps({**result, "vs_float32": vs}))
    rows = quantized.table(tmp_path, names=("nlg_shakespeare_quick", "nlg_shakespeare_nf4_quick"))["rows"]
    assert [r["base"] for r in rows] == ["float32", "nf4"] and rows[1]["ratio"] == pytest.approx(math.exp(0.1))
    with pytest.raises(SystemExit, match="no nlg_shakespeare"):
        quantized.main(["--out_dir", str(tmp_path / "empty")])
    ref["config"]["lm_lr"] = 1.0  # another config: not compared
    (tmp_path / "nlg_shakespeare_quick.json").write_text(json.dumps(ref))
    assert "differs in ['lm_lr']" in quantized.compared(result, config)["vs_float32"]["note"]

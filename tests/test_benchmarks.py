"""The benchmarks run in --quick mode and write well-formed results (no timing is checked: timings are reported,
never asserted). Each benchmark's `main` runs in-process into a temporary results directory.

The PyTorch PEFT contender is tested apart (marked `reference`), as is the SmolLM2 generation (marked `assets`);
the main runs skip them (`--no-peft`, `--no-smollm2`). About a minute on 2 CPU cores.
"""

import json

import pytest

from benchmarks import checkpoint, common, digest, dora, flops, gemma_layout, inference, report, train_step

MACHINE_KEYS = {"cpu_model", "cpu_cores", "ram_bytes", "cpu_flags", "backend", "loadavg"}
VERSION_KEYS = {"python", "jax", "jaxlib", "flax", "optax", "torch", "peft"}


def _read(directory, name):
    """The JSON result (checked for the common keys) and the Markdown of benchmark `name`."""
    result = json.loads((directory / f"{name}.json").read_text())
    assert {"benchmark", "created_utc", "machine", "versions", "config"} <= set(result)
    assert set(result["machine"]) >= MACHINE_KEYS, result["machine"]
    assert set(result["versions"]) >= VERSION_KEYS, result["versions"]
    assert result["machine"]["cpu_cores"] >= 1 and result["machine"]["ram_bytes"] > 0
    markdown = (directory / f"{name}.md").read_text()
    assert markdown.startswith("# ") and "|---" in markdown, markdown[:500]
    return result, markdown


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def train_step_result(out):
    assert train_step.main(["--quick", "--no-peft", "--out-dir", str(out)]) == 0
    return _read(out, "train_step_quick")


@pytest.fixture(scope="module")
def inference_result(out):
    assert inference.main(["--quick", "--no-smollm2", "--out-dir", str(out)]) == 0
    return _read(out, "inference_quick")


def test_flops_quick(out):
    assert flops.main(["--quick", "--out-dir", str(out)]) == 0
    result, _ = _read(out, "flops_quick")
    assert set(result["flops"]) == {"full", "jlora", "merge"}
    assert all(v > 0 for v in result["flops"].values())


def test_train_step_quick(train_step_result):
    result, markdown = train_step_result
    assert result["config"]["name"] == "train_step_quick" and result["peft_skipped"]
    assert {"float32_s", "bfloat16_s", "bfloat16_faster", "cpu_flags"} <= set(result["bf16_check"])
    batch = result["passes"]["float32"]["batches"]["4"]
    contenders = batch["contenders"]
    assert set(contenders) == {"full", "jlora[qv]", "merge[qv]", "jlora[all]", "merge[all]"}
    for name, c in contenders.items():
        assert c["time"]["n"] == result["config"]["repeats"][0] and c["time"]["median_s"] > 0, name
        assert {"ratio_to_full", "tokens_per_s", "trainable_params", "losses"} <= set(c), name
        assert {"flops", "argument_bytes", "output_bytes", "temp_bytes", "total_bytes"} <= set(c["xla"]), name
        assert {"trace_s", "lower_s", "compile_s", "total_s"} == set(c["compile"]["median"]), name
    for name in ("full", "jlora[all]"):  # QUICK.memory_names
        memory = contenders[name]["memory"]
        assert memory["peak_rss_bytes"] >= memory["rss_after_setup_bytes"] > 0, memory
    assert contenders["full"]["ratio_to_full"] == 1.0
    assert contenders["jlora[qv]"]["trainable_params"] < contenders["full"]["trainable_params"]
    assert "jlora[all]" in markdown


@pytest.mark.reference
def test_train_step_peft_contender():
    run = train_step.PeftRun(train_step.QUICK, "qv", 2, "float32")
    run()
    run()
    assert len(run.losses) == 2 and all(loss > 0 for loss in run.losses)
    assert run.trainable == 2 * (64 * 8 + 8 * 192)  # all of c_attn, rank 8, 2 layers
    memory = train_step.memory_child(train_step.QUICK, "peft[all]", 2, "float32")
    assert memory["peak_rss_bytes"] > 0 and len(memory["losses"]) == train_step.QUICK.memory_steps


def test_inference_quick(inference_result):
    result, _ = inference_result
    forward = result["forward"]
    assert set(forward) == {"4", "1"}
    for batch in forward.values():
        assert set(batch["contenders"]) == set(inference.CONTENDERS)
        assert batch["max_abs_diff_merged_vs_factored_all"] < 1e-3
    gen = result["generation"]["gpt2"]
    assert set(gen["contenders"]) == set(inference.CONTENDERS)
    assert all(c["new_tokens_per_s"] > 0 for c in gen["contenders"].values())
    assert "smollm2" not in result["generation"]


@pytest.mark.assets
def test_inference_smollm2_part():
    gen = inference.smollm2_part(inference.QUICK)
    assert set(gen["contenders"]) == {"base", "merged", "factored[all]"}  # QUICK.smollm2_kinds
    assert gen["merged_equals_factored_all"] in (True, False)
    assert "first 2 of 30 layers" in gen["model"] and gen["params"] > 20_000_000  # the embedding alone: 28M


def test_checkpoint_quick(out):
    assert checkpoint.main(["--quick", "--out-dir", str(out)]) == 0
    result, _ = _read(out, "checkpoint_quick")
    rows = result["rows"]
    assert [r["what"].split(":")[0] for r in rows] == ["full model (orbax StandardSave)", "adapters qv", "adapters all"]
    for r in rows:
        assert r["disk_bytes"] > 0 and r["save"]["median_s"] > 0 and r["restore"]["median_s"] > 0, r
    assert rows[1]["disk_bytes"] < rows[2]["disk_bytes"] < rows[0]["disk_bytes"]
    assert rows[-1]["restored_equal_saved"]


def test_digest_quick(out):
    assert digest.main(["--quick", "--out-dir", str(out)]) == 0
    result, markdown = _read(out, "digest_quick")
    rows = {r["set"]: r for r in result["rows"]}
    assert rows["q_proj, v_proj"]["weights"] == 4 and rows["all dense kernels"]["weights"] == 8
    for r in rows.values():
        assert r["digest"]["median_s"] > 0 and r["full_sha256"]["median_s"] > 0
        assert r["bytes"] == r["weights"] * 64 * 96 * 4
    assert "| weights digested |" in markdown


def test_gemma_layout_quick(out):
    """Every Gemma kernel's update has rank exactly r from its contracted axes, and lora_a spans exactly them."""
    assert gemma_layout.main(["--quick", "--out-dir", str(out)]) == 0
    result, markdown = _read(out, "gemma_layout_quick")
    cfg = gemma_layout.QUICK
    rows = {row["kernel"]: row for row in result["rows"]}
    assert set(rows) == set(gemma_layout.KERNELS)
    assert all(row["rank"] == cfg.rank for row in rows.values()), rows
    assert rows["q_einsum"]["lora_a"] == [cfg.D, cfg.rank] and rows["q_einsum"]["lora_b"] == [cfg.rank, cfg.N, cfg.H]
    assert rows["q_einsum"]["params"] == cfg.rank * (cfg.D + cfg.N * cfg.H)
    assert rows["q_einsum"]["params_before"] == cfg.rank * (cfg.N * cfg.D + cfg.H)
    assert result["block_params"] < result["block_params_before"] and "`BTD,NDH->BTNH`" in markdown


def test_dora_quick(out):
    """DoRA's step adds a few per-weight operations and almost no FLOPs to LoRA's (every dense kernel adapted)."""
    assert dora.main(["--quick", "--out-dir", str(out)]) == 0
    result, markdown = _read(out, "dora_quick")
    lo, do = result["lora"], result["dora"]
    assert 1.0 < result["flops_ratio"] < 1.10 and do["trainable_parameters"] > lo["trainable_parameters"]
    assert do["hlo_ops"]["dot"] > lo["hlo_ops"]["dot"] and do["hlo_ops"]["fusion"] > lo["hlo_ops"]["fusion"]
    assert result["step_ratio"] > 0 and "compiled ops: fusions / dots / other" in markdown


def test_report_quick(out, train_step_result, inference_result):
    assert report.main(["--quick", "--out-dir", str(out)]) == 0
    result, markdown = _read(out, "targets_quick")
    statuses = {r["target"]: r["status"] for r in result["rows"]}
    assert len(statuses) == 17 and set(statuses.values()) <= {"met", "missed", "not measured"}
    # PEFT (x2) and the q,v peak RSS are skipped; multi_adapter (5 targets) runs in tests/test_bench_multi_adapter.py
    assert sum(s == "not measured" for s in statuses.values()) == 8
    assert "| target |" in markdown


def test_gpu_variants_are_sane():
    """The GPU settings (bfloat16, bigger batches) build valid configs; no GPU is needed to check that."""
    for module in (train_step, inference, checkpoint, digest, flops, report):
        assert module.Config().for_gpu() is not None
    gpu = train_step.Config().for_gpu()
    assert gpu.dtype == "bfloat16" and gpu.batches == (32, 8) and len(gpu.repeats) == len(gpu.batches)
    assert inference.Config().for_gpu().dtype == "bfloat16"
    assert common.stem(train_step.QUICK) in ("train_step_quick", "train_step_quick_gpu")

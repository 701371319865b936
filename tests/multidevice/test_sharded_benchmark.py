"""`python -m benchmarks.sharded --quick` in this 8-device process: well-formed results, sane deterministic figures
(XLA's memory_analysis and the collectives of the compiled HLO), and its config / device-count errors."""

import dataclasses
import json
import os

import pytest

from benchmarks import common, sharded


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    assert sharded.main(["--quick", "--out-dir", str(out)]) == 0
    return json.loads((out / "sharded_quick.json").read_text()), (out / "sharded_quick.md").read_text()


def test_sharded_quick(quick):
    result, md = quick
    layouts = result["layouts"]
    assert list(layouts) == list(sharded.LAYOUTS)
    assert layouts["unsharded"]["mesh"] == {"data": 1} and layouts["tp"]["mesh"] == {"model": 8}
    for layout, x in layouts.items():
        for step in sharded.STEPS:
            mem, coll = x[step]["memory"], x[step]["collective_bytes"]
            assert all(isinstance(v, int) and v >= 0 for v in mem.values()), (layout, step, mem)
            assert mem["argument_bytes"] > 0 and mem["temp_bytes"] > 0
            assert mem["arg_out_temp_bytes"] == mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"]
            assert coll["total"] == sum(coll[k] for k in sharded.hlo.KINDS)
            assert (coll["total"] == 0) == (layout == "unsharded"), (layout, step, coll)
    adapter_bytes = 4 * result["adapter_params"]  # float32 adapters
    dp = layouts["dp"]
    # data parallel, weights replicated: the LoRA step all-reduces the adapter gradients (and the loss), nothing else
    assert adapter_bytes <= dp["jlora"]["collective_bytes"]["total"] <= adapter_bytes + 64
    assert dp["full"]["collective_bytes"]["total"] >= 4 * result["params"]  # every gradient all-reduced
    assert dp["jlora"]["collective_bytes"]["total"] < dp["full"]["collective_bytes"]["total"]
    # FSDP: the weights (the largest arguments) split 8 ways
    assert layouts["fsdp"]["full"]["memory"]["argument_bytes"] < layouts["unsharded"]["full"]["memory"][
        "argument_bytes"] / 4
    assert layouts["fsdp"]["jlora"]["memory"]["argument_bytes"] < layouts["unsharded"]["jlora"]["memory"][
        "argument_bytes"]
    # fsdp_gather: each weight all-gathered where it is read (forward, and at most once more for the backward)
    gathered = layouts["fsdp_gather"]["jlora"]["collective_bytes"]["all-gather"]
    assert 4 * result["params"] <= gathered <= 2 * 4 * result["params"]
    assert set(result["targets"]) == set(sharded.TARGETS)
    assert set(result["fsdp_gather"]) == {"fsdp_collectives", "fsdp_memory"}
    for name, t in result["targets"].items():
        assert t["value"] == pytest.approx(t["numerator"] / t["denominator"])
        assert t["passed"] == (t["value"] <= sharded.TARGETS[name][1])
    assert result["config"]["name"] == "sharded_quick" and result["devices"] == 8
    assert "## Targets" in md and "| dp | jlora |" in md


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of Config.devices"):
        dataclasses.replace(sharded.QUICK, batch=12)
    with pytest.raises(ValueError, match="not among"):
        dataclasses.replace(sharded.QUICK, layouts=("zero3",))


def test_too_few_devices():
    with pytest.raises(RuntimeError, match="needs 16 devices, JAX has 8"):
        sharded.measure(dataclasses.replace(sharded.QUICK, devices=16, batch=16))


def test_child_process_gets_eight_devices(monkeypatch):
    """With fewer devices on the CPU, the measurement runs in a child with XLA_FLAGS asking for 8 (any other count
    replaced, the other flags kept); this process's environment is restored."""
    seen = {}

    def fake_child(module, args, *, timeout, env):
        seen.update(module=module, args=args, flags=env["XLA_FLAGS"], platforms=env["JAX_PLATFORMS"])
        return {"from": "child"}

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(sharded.jax, "device_count", lambda: 2)
    monkeypatch.setattr(common, "run_child", fake_child)
    assert sharded.measure_anywhere(sharded.QUICK) == {"from": "child"}
    assert seen["module"] == "benchmarks.sharded" and seen["args"][0] == "--child"
    assert common.config_from_json(sharded.Config, seen["args"][1]) == sharded.QUICK
    assert seen["flags"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"
    assert seen["platforms"] == "cpu"
    assert os.environ["XLA_FLAGS"].endswith("count=2") and "JAX_PLATFORMS" not in os.environ


def test_accelerator_with_too_few_devices(monkeypatch):
    monkeypatch.setattr(sharded.jax, "device_count", lambda: 1)
    monkeypatch.setattr(sharded.jax, "default_backend", lambda: "gpu")
    with pytest.raises(RuntimeError, match="JAX_PLATFORMS=cpu"):
        sharded.measure_anywhere(sharded.QUICK)


def test_gpu_variant_runs_here():
    """The accelerator settings (bfloat16 compute, a bigger batch) compile on the CPU mesh too; the adapters stay
    float32, so data parallelism still all-reduces exactly the adapter gradients in float32 (and the loss)."""
    assert sharded.Config().for_gpu().dtype == "bfloat16" and sharded.Config().for_gpu().batch == 128
    config = dataclasses.replace(sharded.QUICK.for_gpu(), layouts=("dp",))
    assert config.dtype == "bfloat16" and config.batch == 16
    result = sharded.measure(config)
    dp = result["layouts"]["dp"]["jlora"]
    assert 4 * result["adapter_params"] <= dp["collective_bytes"]["total"] <= 4 * result["adapter_params"] + 64
    assert dp["largest_collectives"][0]["dtypes"][0] == "f32"
    assert set(result["targets"]) == {"dp_collectives"} and result["fsdp_gather"] == {}

"""benchmarks.multi_adapter in --quick mode (tiny random BERT and GPT-2): the report's structure, and that what it
times are correct programs (the stacked sweep equals the sequential runs, the mixed batch equals each adapter alone,
the ragged_dot branch equals the gathered one). Never asserts a time."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import multi_adapter, multi_adapter_kernels, multi_adapter_report, report


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert multi_adapter.main(["--quick", "--out-dir", str(out)]) == 0
    name = multi_adapter.common.stem(multi_adapter.QUICK)
    return out, json.loads((out / f"{name}.json").read_text()), (out / f"{name}.md").read_text()


def test_sweep_stacked_equals_sequential(quick):
    _, result, markdown = quick
    sw = result["sweep"]
    assert sw["k"] == len(multi_adapter.QUICK.sweep_ranks) and sw["steps"] == multi_adapter.QUICK.sweep_steps
    assert set(sw["contenders"]) == {"sequential", "stacked"}
    for x in sw["contenders"].values():
        assert x["time"]["n"] == len(x["parts"]) == multi_adapter.QUICK.sweep_rounds
        part = x["parts"][0]
        assert part["init_s"] > 0 and part["first_steps_s"] > 0 and part["rest_s"] >= 0
        assert x["time"]["median_s"] >= part["init_s"] + part["first_steps_s"]
    assert sw["max_abs_diff_losses"] < 1e-5 and sw["max_abs_diff_adapters"] < 1e-4
    assert np.all(np.isfinite(sw["final_losses"])) and len(sw["final_losses"]) == sw["k"]
    assert sw["stacked_over_sequential"] == pytest.approx(
        sw["contenders"]["stacked"]["time"]["median_s"] / sw["contenders"]["sequential"]["time"]["median_s"])
    assert "## Sweep" in markdown and "| sequential |" in markdown


def test_mixed_batch_equals_each_adapter_alone(quick):
    _, result, markdown = quick
    sv = result["serving"]
    ch = sv["checks"]
    assert ch["prefill_max_abs_diff_mixed_vs_alone"] <= 1e-5 * max(ch["logit_scale"], 1.0)
    assert ch["tokens_equal_mixed_vs_alone"] and ch["tokens_equal_decode_vs_generate"]
    assert ch["rows_differ_mixed_vs_single"] > 1e-3  # the rows really ran other adapters
    assert set(sv["contenders"]) == {"mixed", "single", "loop", "base"}
    q = multi_adapter.QUICK
    for x in sv["contenders"].values():
        assert x["prefill"]["tokens"] == q.serve_adapters * q.prompt_len
        assert x["decode"]["tokens"] == q.serve_adapters * q.new_tokens
        assert x["prefill"]["tokens_per_s"] > 0 and x["decode"]["tokens_per_s"] > 0
    con = sv["contenders"]
    assert sv["ratios"]["decode_loop"] == pytest.approx(con["mixed"]["decode"]["tokens_per_s"]
                                                        / con["loop"]["decode"]["tokens_per_s"])
    assert "## Serving" in markdown and "| mixed / loop |" in markdown


def test_kernels_and_targets(quick):
    out, result, markdown = quick
    assert set(result["kernels"]) == {"prefill", "decode"}
    for case in result["kernels"].values():
        for x in case.values():
            assert x["max_abs_diff"] < 1e-5 and x["faster"] in ("gather", "ragged")
            assert set(multi_adapter_kernels.METHODS) <= set(x)
    q = multi_adapter.QUICK
    assert result["kernels"]["prefill"]["c_attn"]["rows"] == q.serve_adapters * q.prompt_len
    assert result["kernels"]["decode"]["c_attn"]["rows"] == q.serve_adapters
    rows = result["targets"]
    assert [r["target"] for r in rows] == [t[0] for t in multi_adapter_report.TARGETS]
    assert all(r["met"] == (r["value"] <= r["limit"] if r["at_most"] else r["value"] >= r["limit"]) for r in rows)
    assert "## Targets (issue 14)" in markdown and "Quick mode" in markdown
    # benchmarks.report reads the result into the targets table
    assert report.main(["--quick", "--out-dir", str(out)]) == 0
    table = json.loads((out / f"{multi_adapter.common.stem(report.QUICK)}.json").read_text())
    mine = [r for r in table["rows"] if r["source"].startswith("multi_adapter")]
    assert len(mine) == sum(t[4] for t in multi_adapter_report.TARGETS)
    assert all(r["status"] in ("met", "missed") for r in mine)


def test_ragged_branch_equals_gather_with_uneven_groups():
    """Repeated and absent adapters, several rows per example, distinct dims: the group sizes count rows."""
    ids = jnp.array([2, 0, 2, 3, 0], jnp.int32)  # adapter 1 unused
    x = jax.random.normal(jax.random.key(0), (5, 3, 11))
    a = jax.random.normal(jax.random.key(1), (4, 11, 7))
    b = jax.random.normal(jax.random.key(2), (4, 7, 19))
    want = np.stack([np.asarray(x[i] @ a[k] @ b[k]) for i, k in enumerate(np.asarray(ids))])
    np.testing.assert_allclose(multi_adapter_kernels.gather_branch(x, a, b, ids), want, rtol=1e-5, atol=1e-5)
    sorted_x, sizes, inverse = multi_adapter_kernels.sort_rows(x, ids, 4)
    assert sizes.tolist() == [6, 0, 6, 3]
    got = jax.jit(multi_adapter_kernels.ragged_branch)(sorted_x, a, b, sizes)[inverse]
    np.testing.assert_allclose(got.reshape(5, 3, 19), want, rtol=1e-5, atol=1e-5)


def test_config_checks_and_gpu_variant():
    with pytest.raises(ValueError, match="one entry per adapter"):
        multi_adapter.Config(sweep_ranks=(1, 2), sweep_lrs=(1e-3,))
    with pytest.raises(ValueError, match="must be >= 1"):
        multi_adapter.Config(sweep_rounds=0)
    gpu = multi_adapter.Config().for_gpu()
    assert gpu.sweep_rounds == 1 and gpu.sweep_ranks == multi_adapter.Config().sweep_ranks


def test_a_backend_without_ragged_dot_is_reported_not_fatal(monkeypatch):
    def unsupported(x, a, b, sizes):
        raise NotImplementedError("no ragged_dot lowering on this backend")

    monkeypatch.setattr(multi_adapter_kernels, "ragged_branch", unsupported)
    kr = multi_adapter_kernels.measure(multi_adapter.QUICK, {"c_attn": (64, 192)})
    for case in kr.values():
        x = case["c_attn"]
        assert "NotImplementedError: no ragged_dot lowering" in x["ragged_error"] and "ragged" not in x
        assert x["faster"] == "gather" and x["gather"]["kernel_s"] > 0 and x["max_abs_diff"] is None
    text = "\n".join(multi_adapter_report.kernel_table(multi_adapter.QUICK, kr))
    assert "| failed |" in text and "ragged_dot failed to compile here: NotImplementedError" in text

"""benchmarks.qlora in --quick mode (a 1-layer random GPT-2): deterministic figures only (the frozen trees' bytes
from the quantization formats, XLA's memory_analysis), never times. About 10 s on 2 CPU cores."""

import json
import math

import jax
import pytest

from benchmarks import qlora


def _expected_bytes(config: qlora.Config) -> dict[str, int]:
    """Frozen-tree bytes from the formats alone, over the float32 model's leaves: nf4 = 4 bits a weight + an int8
    scale per 64-block + a float32 scale per 256 blocks + one float32 offset; GGUF q4_1 = 20 bytes per 32 weights,
    q8_0 = 34 per 32 (embeddings); biases and norms stay float32."""
    model = qlora.common.gpt2(config)
    variables = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 4), "int32"))
    out = {"float32": 0, "nf4": 0, "gguf": 0}
    for path, x in jax.tree_util.tree_flatten_with_path(variables)[0]:
        n, name = x.size, str(path[-1].key)
        out["float32"] += 4 * n
        if x.ndim < 2:
            out["nf4"] += 4 * n
            out["gguf"] += 4 * n
            continue
        blocks = n // config.block_size
        out["nf4"] += n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4
        out["gguf"] += n // 32 * (34 if name == "embedding" else 20)
    return out


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert qlora.main(["--quick", "--out-dir", str(out)]) == 0
    return json.loads((out / "qlora_quick.json").read_text()), (out / "qlora_quick.md").read_text()


def test_frozen_bytes_are_the_formats(quick):
    result, _ = quick
    con = result["models"]["gpt2"]["contenders"]
    assert set(con) == {"float32", "nf4", "gguf"}
    want = _expected_bytes(qlora.QUICK)
    assert {name: x["frozen_bytes"] for name, x in con.items()} == want
    assert con["nf4"]["frozen_ratio"] == pytest.approx(want["nf4"] / want["float32"])
    assert con["nf4"]["frozen_ratio"] < 0.16
    assert con["gguf"]["frozen_ratio"] == pytest.approx(want["gguf"] / want["float32"])


def test_memory_analysis_sees_the_packed_base_and_the_dequantized_buffers(quick):
    result, markdown = quick
    model = result["models"]["gpt2"]
    con, f32 = model["contenders"], model["contenders"]["float32"]
    for name in ("nf4", "gguf"):
        x = con[name]
        # the step's arguments are the frozen tree + adapters + AdamW state + tokens: only the tree differs
        assert x["xla"]["argument_bytes"] - f32["xla"]["argument_bytes"] == x["frozen_bytes"] - f32["frozen_bytes"]
        assert x["trainable_params"] == f32["trainable_params"] > 0
        assert x["xla"]["temp_bytes"] > f32["xla"]["temp_bytes"]  # dequantized weights live as temps
        assert x["step_peak_bytes"] == (x["xla"]["argument_bytes"] + x["xla"]["output_bytes"]
                                        + x["xla"]["temp_bytes"] - x["xla"]["alias_bytes"])
        assert model["activation_floor"] < x["step_peak_ratio"] < 1
        assert x["largest_weight"] == "params/transformer/h/0/mlp/c_fc/kernel"  # 64 x 256 > wte 97 x 64
    checks = {(t["contender"], t["field"]): t for t in result["targets"]}
    assert len(checks) == 6 and checks[("nf4", "frozen_ratio")]["met"]
    missed = [t for t in result["targets"] if not t["met"]]
    assert all(t["why"] for t in missed)
    assert ("nf4", "step_peak_ratio") in {(t["contender"], t["field"]) for t in missed}  # activation floor 0.78
    assert "## Targets" in markdown and "| nf4 |" in markdown


def test_config_refuses_unknown_contenders():
    with pytest.raises(ValueError, match="float32"):
        qlora.Config(contenders=("nf4", "float32"))
    with pytest.raises(ValueError, match="int3"):
        qlora.Config(contenders=("float32", "int3"))

"""QLoRA: `lora.apply` over a quantized frozen tree dequantizes each weight at its consumer (inside jit, inside
`jax.checkpoint`), merges into a quantized base (float or requantized with an error report), and checkpoints
record the base's quantization."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.qarray import QuantizedArray
from tests.helpers import perturb

QTYPES = ["nf4", "int4", "int8", "fp8"]


class MLP(nn.Module):
    """11 -> 32 -> 19 (in, hidden, out pairwise distinct; 11 * 32 and 32 * 19 are multiples of 16)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(19, name="down")(nn.gelu(nn.Dense(32, name="up")(x)))


X = jax.random.normal(jax.random.key(0), (5, 11))
CONFIG = jlora.LoraConfig(rank=7, alpha=14, targets=("up",))


def _setup(qtype="nf4", *, double_quant=False, config=CONFIG, model=None, x=X):
    model = model or MLP()
    variables = model.init(jax.random.key(1), x)
    lora = jlora.lora_transform(model.apply, config)
    frozen, adapters = lora.init(variables, x, key=jax.random.key(2))
    adapters = perturb(adapters)  # lora_b non-zero
    return model, lora, jlora.quantize(frozen, qtype=qtype, block_size=16, double_quant=double_quant), adapters


@pytest.mark.parametrize("qtype", QTYPES)
def test_apply_on_a_quantized_base_equals_the_dequantized_merged_model(qtype):
    model, lora, frozen_q, adapters = _setup(qtype, double_quant=qtype == "nf4")
    # both dense kernels quantized: "up" is targeted, "down" only dequantized at its use
    assert isinstance(frozen_q["params"]["down"]["kernel"], QuantizedArray)
    assert isinstance(frozen_q["params"]["up"]["kernel"], QuantizedArray)
    reference = model.apply(jlora.merge(jlora.dequantize(frozen_q), adapters, CONFIG), X)
    np.testing.assert_allclose(lora.apply(frozen_q, adapters, X), reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lora.apply)(frozen_q, adapters, X), reference, rtol=1e-5, atol=1e-5)
    # and the quantization is real: the float base it came from gives other outputs
    unquantized = model.apply(jlora.merge(lora.init(model.init(jax.random.key(1), X), X, key=jax.random.key(2))[0],
                                          adapters, CONFIG), X)
    assert not np.allclose(unquantized, reference, rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_the_adapters_as_on_the_dequantized_base():
    _model, lora, frozen_q, adapters = _setup("nf4")
    frozen_f = jlora.dequantize(frozen_q)

    def loss(a, frozen):
        return jnp.mean(jnp.square(lora.apply(frozen, a, X)))

    g_q = jax.jit(jax.grad(loss))(adapters, frozen_q)
    g_f = jax.jit(jax.grad(loss))(adapters, frozen_f)
    chex.assert_trees_all_close(g_q, g_f, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g_q["params"]["up"]["kernel"]["lora_a"]).max()) > 0


def test_the_step_traces_once_as_data_changes():
    _, lora, frozen_q, adapters = _setup("int4")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(adapters, frozen, x):
        loss, g = jax.value_and_grad(lambda a: jnp.mean(lora.apply(frozen, a, x) ** 2))(adapters)
        return jax.tree.map(lambda p, d: p - 0.1 * d, adapters, g), loss

    for seed in range(3):
        x = jax.random.normal(jax.random.key(10 + seed), X.shape)
        adapters, _ = step(adapters, frozen_q, x)
    # another quantized base of the same qtype and shapes: still no retrace
    other = jlora.quantize(jlora.dequantize(frozen_q), qtype="int4", block_size=16)
    step(adapters, other, X)


class Deep(nn.Module):
    width: int = 256
    layers: int = 6

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = jnp.tanh(nn.Dense(self.width, name=f"l{i}")(x))
        return x


def test_a_differentiated_step_keeps_codes_not_float_weights_alive():
    """XLA's temp buffers of the train step: dequantizing up front would keep every float weight (6 x 256 KiB) for
    the backward pass; dequantized at each consumer inside jax.checkpoint, it holds about one at a time."""
    model, x = Deep(), jnp.ones((2, 256))
    variables = model.init(jax.random.key(0), x)
    config = jlora.LoraConfig(rank=4, alpha=8, targets=("l0",))
    lora = jlora.lora_transform(model.apply, config)
    frozen, adapters = lora.init(variables, x, key=jax.random.key(1))
    frozen_q = jlora.quantize(frozen, qtype="nf4", block_size=64)

    def step(a, frozen):
        return jax.grad(lambda a: jnp.sum(lora.apply(frozen, a, x)))(a)

    def temp(frozen, fn=step):
        return jax.jit(fn).lower(adapters, frozen).compile().memory_analysis().temp_size_in_bytes

    float_weights = sum(w.size * 4 for w in jax.tree.leaves(frozen) if w.ndim == 2)

    def upfront(a, frozen):  # the naive QLoRA: the whole tree dequantized before the model runs
        return step(a, jlora.dequantize(frozen))

    assert temp(frozen_q, upfront) >= 0.9 * float_weights  # the measurement sees the difference
    assert temp(frozen_q) <= 0.45 * float_weights


class ScanModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = layer(name="layers")(x, None)
        return nn.Dense(19, name="head")(x)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return jnp.tanh(nn.Dense(16, name="dense")(c)), None


def test_a_scan_over_stacked_quantized_weights_slices_the_blocks_per_layer():
    x = jax.random.normal(jax.random.key(3), (4, 16))
    config = jlora.LoraConfig(rank=7, alpha=14, targets=("dense",))
    model, lora, frozen_q, adapters = _setup("nf4", double_quant=True, config=config, model=ScanModel(), x=x)
    assert frozen_q["params"]["layers"]["dense"]["kernel"].shape == (3, 16, 16)
    reference = model.apply(jlora.merge(jlora.dequantize(frozen_q), adapters, config), x)
    np.testing.assert_allclose(jax.jit(lora.apply)(frozen_q, adapters, x), reference, rtol=1e-5, atol=1e-5)
    text = jax.make_jaxpr(lambda f, a: lora.apply(f, a, x))(frozen_q, adapters).pretty_print()
    # the scan carries the packed uint8 codes per layer (3 x 128 bytes), not a float (3, 16, 16) weight
    assert "u8[3,128]" in text


def test_init_on_a_quantized_base_and_consumers():
    model = MLP()
    variables = jlora.quantize(model.init(jax.random.key(1), X), qtype="int8", block_size=16)
    lora = jlora.lora_transform(model.apply, CONFIG)
    frozen, adapters = lora.init(variables, X, key=jax.random.key(2))
    assert isinstance(frozen["params"]["up"]["kernel"], QuantizedArray)
    assert adapters["params"]["up"]["kernel"]["lora_a"].shape == (11, 7)
    assert adapters["params"]["up"]["kernel"]["lora_a"].dtype == jnp.float32
    assert lora.consumers(variables, X) == {"params/up/kernel": ["dot"]}


def test_a_quantized_embedding_lookup():
    class Tok(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(20, name="out")(nn.Embed(24, 12, name="embed")(ids))

    ids = jnp.array([[1, 5, 23], [0, 7, 7]])
    config = jlora.LoraConfig(rank=7, alpha=14, targets=("embed", "out"))
    model, lora, frozen_q, adapters = _setup("int8", config=config, model=Tok(), x=ids)
    reference = model.apply(jlora.merge(jlora.dequantize(frozen_q), adapters, config), ids)
    np.testing.assert_allclose(jax.jit(lora.apply)(frozen_q, adapters, ids), reference, rtol=1e-5, atol=1e-5)


def test_merge_into_a_quantized_base_gives_a_float_tree_in_the_asked_dtype():
    model, lora, frozen_q, adapters = _setup("nf4")
    merged = jlora.merge(frozen_q, adapters, CONFIG)
    assert not any(isinstance(x, QuantizedArray) for x in jax.tree.leaves(merged, is_leaf=lambda x:
                                                                         isinstance(x, QuantizedArray)))
    assert merged["params"]["down"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(model.apply(merged, X), lora.apply(frozen_q, adapters, X), rtol=1e-5, atol=1e-5)
    half = jlora.merge(frozen_q, adapters, CONFIG, dtype=jnp.bfloat16)
    assert half["params"]["up"]["kernel"].dtype == jnp.bfloat16
    assert half["params"]["down"]["kernel"].dtype == jnp.bfloat16
    assert half["params"]["up"]["bias"].dtype == jnp.float32  # float leaves keep theirs


@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_merge_requantized_keeps_the_qtype_and_reports_the_added_error(qtype):
    model, _lora, frozen_q, adapters = _setup(qtype, double_quant=qtype == "nf4")
    merged_q, report = jlora.merge_requantized(frozen_q, adapters, CONFIG)
    up, down = merged_q["params"]["up"]["kernel"], merged_q["params"]["down"]["kernel"]
    assert (up.qtype, up.block_size, up.double_quant) == (qtype, 16, qtype == "nf4")
    chex.assert_trees_all_equal(down, frozen_q["params"]["down"]["kernel"])  # not adapted: untouched
    assert list(report) == ["params/up/kernel"]
    # the report against a direct computation
    exact = jlora.merge(frozen_q, adapters, CONFIG)["params"]["up"]["kernel"]
    delta = exact - frozen_q["params"]["up"]["kernel"].dequantize()
    err = up.dequantize() - exact
    rms = float(jnp.sqrt(jnp.mean(err**2)) / jnp.sqrt(jnp.mean(delta**2)))
    np.testing.assert_allclose(report["params/up/kernel"]["rms"], rms, rtol=1e-5)
    np.testing.assert_allclose(report["params/up/kernel"]["max"],
                               float(jnp.abs(err).max() / jnp.abs(delta).max()), rtol=1e-5)
    assert report["params/up/kernel"]["rms"] > 0  # requantizing does lose something
    if qtype == "int8":  # 8 bits keep most of the delta
        assert report["params/up/kernel"]["rms"] < 0.5
    # the requantized model runs as a frozen base (no adapters needed): model.apply on its dequantization
    np.testing.assert_allclose(model.apply(jlora.dequantize(merged_q), X), model.apply(exact_tree(frozen_q, up), X),
                               rtol=1e-5, atol=1e-5)


def exact_tree(frozen_q, up):
    tree = jlora.dequantize(frozen_q)
    tree["params"]["up"]["kernel"] = up.dequantize()
    return tree


def test_checkpoints_record_the_base_quantization():
    _, _, frozen_q, adapters = _setup("nf4")
    spec = jlora.fingerprint(frozen_q, adapters)["params/up/kernel"]
    assert spec["quant"] == {"qtype": "nf4", "block_size": 16, "double_quant": False}
    assert spec["shape"] == [11, 32] and spec["dtype"] == "float32" and spec["digest"].startswith("strided")


def test_loading_onto_a_differently_quantized_base_is_an_error(tmp_path):
    _, _, frozen_q, adapters = _setup("nf4")
    jlora.save_adapters(tmp_path / "ckpt", adapters, CONFIG, variables=frozen_q)
    restored, _ = jlora.load_adapters(tmp_path / "ckpt", variables=frozen_q)
    chex.assert_trees_all_equal(restored, adapters)
    float_base = jlora.dequantize(frozen_q)
    for other, says in [(float_base, "not quantized"),
                        (jlora.quantize(float_base, qtype="int8", block_size=16), "quantized int8, block_size 16"),
                        (jlora.quantize(float_base, qtype="nf4", block_size=32), "quantized nf4, block_size 32")]:
        with pytest.raises(ValueError, match=rf"params/up/kernel: saved base \(11, 32\) float32 \(quantized nf4, "
                                             rf"block_size 16\), variables have \(11, 32\) float32 \({says}\)"):
            jlora.load_adapters(tmp_path / "ckpt", variables=other)
        with pytest.raises(ValueError, match="quantized differently"):
            jlora.load_adapters(tmp_path / "ckpt", variables=other, check_weights=False)


def test_a_quantized_leaf_that_does_not_fit_its_shape_is_refused():
    _, lora, frozen_q, adapters = _setup("nf4")
    q = frozen_q["params"]["up"]["kernel"]
    other = jlora.quantize({"kernel": jnp.ones((12, 32))}, block_size=16)["kernel"]  # codes of a (12, 32) weight
    bad = jax.tree.map(lambda x: x, frozen_q, is_leaf=lambda x: isinstance(x, QuantizedArray))
    bad["params"]["up"]["kernel"] = QuantizedArray(other.values, other.scales, shape=q.shape, qtype="nf4",
                                                   block_size=16)
    msg = r"params/up/kernel: QuantizedArray\(nf4, shape=\(11, 32\), block_size=16\) needs values of shape \(176,\)"
    with pytest.raises(ValueError, match=msg):
        lora.apply(bad, adapters, X)
    with pytest.raises(ValueError, match=msg):
        jax.jit(lora.apply)(bad, adapters, X)
    with pytest.raises(ValueError, match=msg):
        jlora.merge(bad, adapters, CONFIG)
    # a QuantizedArray of another weight's shape where the adapters need (11, 32)
    swapped = jax.tree.map(lambda x: x, frozen_q, is_leaf=lambda x: isinstance(x, QuantizedArray))
    swapped["params"]["up"]["kernel"] = frozen_q["params"]["down"]["kernel"]
    with pytest.raises(ValueError, match="params/up/kernel"):
        lora.apply(swapped, adapters, X)


def test_lora_dropout_and_vmap_over_adapters_on_a_quantized_base():
    config = jlora.LoraConfig(rank=7, alpha=14, targets=("up", "down"), dropout=0.3)
    _, lora, frozen_q, adapters = _setup("int4", config=config)
    frozen_f, key = jlora.dequantize(frozen_q), jax.random.key(9)

    def loss(a, frozen):
        return jnp.sum(lora.apply(frozen, a, X, dropout_key=key) ** 2)

    # the backward pass re-traces each consumer: it must draw the forward pass's dropout masks
    grad = jax.jit(jax.grad(loss))
    chex.assert_trees_all_close(grad(adapters, frozen_q), grad(adapters, frozen_f), rtol=1e-4, atol=1e-4)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), adapters)
    ys = jax.jit(jax.vmap(lambda a: lora.apply(frozen_q, a, X)))(stacked)
    np.testing.assert_allclose(ys[1], lora.apply(frozen_f, jax.tree.map(lambda a: 2 * a, adapters), X),
                               rtol=1e-4, atol=1e-4)


def test_merge_requantized_on_gguf_k_quants_falls_back_to_a_type_gguf_can_write():
    from tests.test_quant_gguf import random_blocks

    q6 = QuantizedArray(jnp.asarray(random_blocks("q6_k", 3, np.random.default_rng(0), scale=1e-4)), None,
                        shape=(256, 3), dtype="float32", qtype="q6_k", block_size=256, perm=(1, 0))
    frozen = {"params": {"dense": {"kernel": q6, "bias": jnp.zeros((3,))}}}
    config = jlora.LoraConfig(rank=2, alpha=4, targets=("dense",))
    adapters = {"params": {"dense": {"kernel": {"lora_a": jnp.full((256, 2), 0.05), "lora_b": jnp.full((2, 3), 0.5)}}}}
    merged_q, report = jlora.merge_requantized(frozen, adapters, config)
    out = merged_q["params"]["dense"]["kernel"]
    assert (out.qtype, out.block_size, out.perm, out.shape) == ("q8_0", 32, (1, 0), (256, 3))
    assert report["params/dense/kernel"]["qtype"] == "q8_0" and report["params/dense/kernel"]["rms"] < 0.1
    exact = jlora.merge(frozen, adapters, config)["params"]["dense"]["kernel"]
    np.testing.assert_allclose(out.dequantize(), exact, atol=float(jnp.abs(exact).max()) / 100)


def test_quantized_true_is_for_gguf_files(tmp_path):
    from jlora.models import from_pretrained

    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match=r"quantized=True keeps a GGUF file's llama.cpp blocks.*jlora.quantize"):
        from_pretrained(tmp_path, quantized=True)

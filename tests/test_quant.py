"""jlora.quantize / dequantize / QuantizedArray: code tables, round-trip error bounds, packing, sizes, pytree use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import quant_codes as qc
from jlora.quant import QuantizedArray

QTYPES = ["nf4", "int4", "int8", "fp8"]


def _weight(shape=(12, 40), seed=0, dtype=jnp.float32):
    w = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    # blocks of very different magnitudes, so a scale bug in one block shows
    return (w * jnp.linspace(0.01, 3.0, w.size).reshape(shape)).astype(dtype)


def _tree(dtype=jnp.float32):
    return {"params": {
        "dense": {"kernel": _weight((11, 16), 1, dtype), "bias": jnp.ones((16,), dtype)},
        "embed": {"embedding": _weight((19, 8), 2, dtype)},
        "norm": {"scale": jnp.ones((8, 2), dtype)},  # 2-D but not a weight name
        "head": {"weight": jnp.ones((7,), dtype)},  # a weight name but 1-D
        "ids": {"kernel": jnp.arange(32, dtype=jnp.int32).reshape(4, 8)},  # not floating
    }}


def test_nf4_table_is_qlora_normal_float():
    # bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True), recomputed from normal quantiles
    offset = 0.9677083
    pos = jax.scipy.stats.norm.ppf(jnp.linspace(offset, 0.5, 9)[:-1])
    neg = -jax.scipy.stats.norm.ppf(jnp.linspace(offset, 0.5, 8)[:-1])
    table = np.sort(np.concatenate([np.asarray(pos), [0.0], np.asarray(neg)]))
    table = table / np.abs(table).max()
    np.testing.assert_allclose(qc.NF4_TABLE, table, rtol=0, atol=2e-6)
    assert qc.NF4_TABLE.dtype == np.float32 and qc.NF4_TABLE[7] == 0.0
    assert qc.NF4_TABLE[0] == -1.0 and qc.NF4_TABLE[15] == 1.0
    # the exact float32 values of the QLoRA paper's Appendix E / bitsandbytes get_4bit_type("nf4")
    assert qc.NF4_TABLE[1] == np.float32(-0.6961928009986877) and qc.NF4_TABLE[14] == np.float32(0.7229568362236023)
    # every code value round-trips exactly
    w = jnp.asarray(qc.NF4_TABLE * 2.5).reshape(2, 8)
    np.testing.assert_array_equal(jlora.dequantize(jlora.quantize({"kernel": w}, block_size=16))["kernel"], w)


def _bound(qtype, w, absmax):
    """Largest |dequantize(quantize(w)) - w| the code spacing allows, elementwise."""
    if qtype == "nf4":
        return absmax * float(np.max(np.diff(qc.NF4_TABLE))) / 2  # half the widest gap, 0.152 * absmax
    if qtype == "int4":
        return absmax / 7 / 2
    if qtype == "int8":
        return absmax / 127 / 2
    # e4m3: 3 mantissa bits -> relative half-ulp 2^-4 for normals; subnormal spacing 2^-9 in scaled units
    return jnp.abs(w) * 2.0**-4 + absmax / 448 * 2.0**-10


@pytest.mark.parametrize("qtype", QTYPES)
def test_round_trip_within_code_spacing(qtype):
    w = _weight()
    q = jlora.quantize({"kernel": w}, qtype=qtype, block_size=32)["kernel"]
    assert isinstance(q, QuantizedArray) and (q.shape, q.dtype, q.qtype, q.block_size) == ((12, 40), "float32",
                                                                                         qtype, 32)
    packed = qtype in ("nf4", "int4")
    assert q.values.shape == ((240,) if packed else (480,))
    assert q.values.dtype == {"nf4": jnp.uint8, "int4": jnp.uint8, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[qtype]
    assert q.scales.shape == (15,) and q.scales.dtype == jnp.float32
    back = q.dequantize()
    assert back.shape == w.shape and back.dtype == w.dtype
    absmax = jnp.repeat(jnp.max(jnp.abs(w.reshape(-1, 32)), axis=1), 32).reshape(w.shape)
    err = jnp.abs(back - w)
    assert bool(jnp.all(err <= _bound(qtype, w, absmax) * (1 + 1e-5) + 1e-7)), float(jnp.max(err))
    assert float(jnp.max(err)) > 0  # really quantized
    # each block's absmax element is reproduced exactly (codes +-1, +-7, +-127, +-448 exist)
    flat_w, flat_b = w.reshape(-1, 32), back.reshape(-1, 32)
    i = jnp.argmax(jnp.abs(flat_w), axis=1)
    np.testing.assert_allclose(flat_b[jnp.arange(15), i], flat_w[jnp.arange(15), i], rtol=1e-6)


def test_int4_codes_are_symmetric_minus7_to_7():
    w = jnp.linspace(-1.0, 1.0, 64).reshape(4, 16)
    q = jlora.quantize({"kernel": w}, qtype="int4", block_size=64)["kernel"]
    codes = np.asarray(qc.load(q.values, "int4"))
    assert codes.min() == -7 and codes.max() == 7 and codes.dtype == np.int8
    np.testing.assert_array_equal(codes, np.round(np.asarray(w).reshape(-1) * 7))


def test_pack4_round_trip_and_nibble_order():
    codes = jax.random.randint(jax.random.key(3), (3, 38), 0, 16).astype(jnp.uint8)
    packed = qc.pack4(codes)
    assert packed.shape == (3, 19) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(qc.unpack4(packed), codes)
    np.testing.assert_array_equal(qc.pack4(jnp.array([1, 2, 15, 0], jnp.uint8)), [0x12, 0xF0])  # first = high


@pytest.mark.parametrize("qtype,double_quant,ratio", [("nf4", False, 0.140625), ("nf4", True, 0.12897),
                                                      ("int4", False, 0.140625), ("int8", False, 0.265625),
                                                      ("fp8", True, 0.25397)])
def test_nbytes_of_a_4096_square_weight_without_allocating(qtype, double_quant, ratio):
    spec = {"layer": {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}}
    out = jax.eval_shape(lambda v: jlora.quantize(v, qtype=qtype, double_quant=double_quant), spec)
    q = out["layer"]["kernel"]
    assert isinstance(q, QuantizedArray) and isinstance(q.values, jax.ShapeDtypeStruct)
    got = q.nbytes / (4096 * 4096 * 4)
    assert got == pytest.approx(ratio, abs=1e-5)
    if qtype == "nf4":
        assert got <= (0.13 if double_quant else 0.16)
    # a tree of ShapeDtypeStructs also quantizes directly, abstractly
    assert jlora.quantize(spec, qtype=qtype, double_quant=double_quant)["layer"]["kernel"].nbytes == q.nbytes


@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_double_quant_scales(qtype):
    w = _weight((30, 80), 4)  # 300 blocks of 8: one full group of 256 and a short one of 44
    plain = jlora.quantize({"kernel": w}, qtype=qtype, block_size=8)["kernel"]
    dq = jlora.quantize({"kernel": w}, qtype=qtype, block_size=8, double_quant=True)["kernel"]
    assert dq.double_quant and not plain.double_quant
    assert dq.scales.dtype == jnp.int8 and dq.scales.shape == (300,)
    assert dq.scale_scales.shape == (2,) and dq.scale_offset.shape == ()
    np.testing.assert_array_equal(dq.values, plain.values)  # codes come from the exact scales
    absmax = plain.scales
    decoded = qc.double_dequantize(dq.scales, dq.scale_scales, dq.scale_offset)
    half_step = jnp.repeat(dq.scale_scales, 256)[:300] / 2
    assert bool(jnp.all(jnp.abs(decoded - absmax) <= half_step * (1 + 1e-5) + 1e-7))
    err_plain = jnp.abs(plain.dequantize() - w).max()
    err_dq = jnp.abs(dq.dequantize() - w).max()
    assert err_dq <= err_plain + float(half_step.max()) * 1.01


def test_dequantize_in_jit_and_dtypes():
    tree = jlora.quantize(_tree(jnp.bfloat16), block_size=8)
    q = tree["params"]["dense"]["kernel"]
    assert q.dtype == "bfloat16"
    eager = q.dequantize()
    assert eager.dtype == jnp.bfloat16
    np.testing.assert_array_equal(jax.jit(lambda t: t.dequantize())(q), eager)
    np.testing.assert_array_equal(jax.jit(jlora.dequantize)(tree)["params"]["dense"]["kernel"], eager)
    f32 = jlora.dequantize(tree, jnp.float32)
    assert f32["params"]["dense"]["kernel"].dtype == jnp.float32
    assert f32["params"]["dense"]["bias"].dtype == jnp.bfloat16  # untouched leaves keep theirs
    # quantize itself is traceable
    q2 = jax.jit(lambda w: jlora.quantize({"kernel": w}, block_size=32))(_weight())["kernel"]
    np.testing.assert_array_equal(q2.values, jlora.quantize({"kernel": _weight()}, block_size=32)["kernel"].values)


def test_default_targets_and_pytree_behaviour():
    tree = _tree()
    qt = jlora.quantize(tree, block_size=8)
    p = qt["params"]
    assert isinstance(p["dense"]["kernel"], QuantizedArray) and isinstance(p["embed"]["embedding"], QuantizedArray)
    for untouched in (p["dense"]["bias"], p["norm"]["scale"], p["head"]["weight"], p["ids"]["kernel"]):
        assert isinstance(untouched, jax.Array)
    mapped = jax.tree.map(lambda x: x, qt)
    assert isinstance(mapped["params"]["dense"]["kernel"], QuantizedArray)
    assert jax.tree.structure(mapped) == jax.tree.structure(qt)
    assert len(jax.tree.leaves(qt)) == len(jax.tree.leaves(tree)) + 2  # values + scales instead of one array
    shapes = jax.eval_shape(jlora.dequantize, qt)
    assert shapes["params"]["embed"]["embedding"].shape == (19, 8)
    back = jlora.dequantize(qt)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    np.testing.assert_array_equal(back["params"]["dense"]["bias"], tree["params"]["dense"]["bias"])
    # quantizing again leaves QuantizedArrays alone
    again = jlora.quantize(qt, qtype="int8", block_size=8)
    assert again["params"]["dense"]["kernel"].qtype == "nf4"


def test_targets_as_names_regex_and_predicate():
    tree = _tree()
    by_name = jlora.quantize(tree, targets=("dense",), block_size=16)["params"]
    assert isinstance(by_name["dense"]["kernel"], QuantizedArray)
    assert isinstance(by_name["embed"]["embedding"], jax.Array)
    by_regex = jlora.quantize(tree, targets="params/embed/.*", block_size=8)["params"]
    assert isinstance(by_regex["embed"]["embedding"], QuantizedArray)
    assert isinstance(by_regex["dense"]["kernel"], jax.Array)
    by_pred = jlora.quantize(tree, targets=lambda path, x: path.endswith("norm/scale"), block_size=16)["params"]
    assert isinstance(by_pred["norm"]["scale"], QuantizedArray)
    assert isinstance(by_pred["dense"]["kernel"], jax.Array)


def test_bad_inputs_name_the_path_and_the_fix():
    tree = _tree()
    with pytest.raises(ValueError, match=r"unknown qtype 'nf3'.*\['nf4', 'int4', 'int8', 'fp8'\]"):
        jlora.quantize(tree, qtype="nf3")
    with pytest.raises(ValueError, match=r"'params/dense/kernel' has shape \(11, 16\) \(176 elements\).*"
                                         r"block_size=64 does not divide.*e\.g\. 44.*leave 'params/dense/kernel' out"):
        jlora.quantize(tree)
    with pytest.raises(ValueError, match=r"'w' has shape \(5, 7\).*no even block size for qtype='nf4'.*int8/fp8"):
        jlora.quantize({"w": jnp.ones((5, 7))}, targets=("w",))
    odd = jlora.quantize({"w": jnp.ones((5, 7))}, targets=("w",), qtype="int8", block_size=7)["w"]
    np.testing.assert_array_equal(odd.dequantize(), jnp.ones((5, 7)))
    with pytest.raises(ValueError, match=r"block_size must be even, got 33; e\.g\. block_size=64"):
        jlora.quantize(tree, block_size=32 + 1)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        jlora.quantize(tree, block_size=0)
    with pytest.raises(TypeError, match=r"'params/ids/kernel'.*not a floating array.*leave 'params/ids/kernel' out"):
        jlora.quantize(tree, targets=("ids",), block_size=8)
    with pytest.raises(ValueError, match=r"targets \['qkv'\] match no leaf.*params/dense/kernel"):
        jlora.quantize(tree, targets=("dense", "qkv"), block_size=8)
    with pytest.raises(TypeError, match="targets must be None"):
        jlora.quantize(tree, targets=3)
    bad = {"kernel": jnp.ones((4, 8)).at[1, 2].set(jnp.nan)}
    with pytest.raises(ValueError, match="'kernel' holds inf or NaN"):
        jlora.quantize(bad, block_size=8)


@pytest.mark.reference
def test_nf4_equals_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch = pytest.importorskip("torch")
    w = np.array(_weight((24, 40), 5))
    w[0, :3] = 0.0
    wt = torch.from_numpy(w.copy())
    packed, state = bnbf.quantize_4bit(wt, blocksize=64, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, state).numpy()
    q = jlora.quantize({"kernel": jnp.asarray(w)}, block_size=64)["kernel"]
    np.testing.assert_array_equal(np.asarray(q.values), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.scales), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(q.dequantize()), ref)
    # double quantization: bitsandbytes' 8-bit scale code is its dynamic map, ours linear int8 -> close, not equal
    packed2, state2 = bnbf.quantize_4bit(wt, blocksize=64, quant_type="nf4", compress_statistics=True)
    ref2 = bnbf.dequantize_4bit(packed2, state2).numpy()
    q2 = jlora.quantize({"kernel": jnp.asarray(w)}, block_size=64, double_quant=True)["kernel"]
    np.testing.assert_allclose(np.asarray(q2.dequantize()), ref2, rtol=0, atol=0.01 * np.abs(w).max())

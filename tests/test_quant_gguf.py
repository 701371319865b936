"""jlora.quant_gguf: llama.cpp's block formats decoded in JAX bitwise as the `gguf` package does (random blocks and
blocks `gguf.quants.quantize` made, eager and jit), encoded by gguf; and `from_pretrained(x.gguf, quantized=True)`
keeping each tensor as the file's blocks (tiny GGUF files written here; SmolLM2-135M Q4_1 with the assets)."""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import quant_gguf
from jlora.models import from_pretrained, llama
from jlora.models.gguf import hf_name
from jlora.models.hf import default_key
from jlora.paths import named_leaves
from jlora.qarray import QuantizedArray, is_quantized

T = gguf.GGMLQuantizationType
# byte offsets of each format's float16 fields (scales d, mins m), set to finite values in random blocks
F16_FIELDS = {"q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0], "q2_k": [80, 82],
              "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208], "iq4_nl": [0]}
# distinct dims; rows of 256 so the K-quants (256-element blocks) fit: hidden 256, intermediate 512, 4 heads of 64,
# 2 kv heads, vocab 101
CONFIG = dict(vocab_size=101, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0, max_position_embeddings=64)
FLOATS = {"f32": np.float32, "f16": np.float16, "f64": np.float64}
IDS = np.random.default_rng(0).integers(0, 101, (2, 7)).astype(np.int32)
MIXED = {"token_embd": "q8_0", "attn_q": "q4_0", "attn_k": "q4_1", "attn_v": "q5_0", "attn_output": "q5_1",
         "ffn_gate": "q4_k", "ffn_up": "q6_k", "ffn_down": "q2_k", "output": "f16", "ffn_norm": "bf16",
         "blk.1.ffn_down": "q3_k", "blk.1.ffn_gate": "q5_k", "blk.1.ffn_up": "iq4_nl"}


def random_blocks(qtype, n, rng, scale=0.01):
    """uint8 (n, bytes per block): random bytes, the float16 scale fields finite (|x| ~ scale)."""
    nbytes = gguf.GGML_QUANT_SIZES[T[qtype.upper()]][1]
    blocks = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        blocks[:, at:at + 2] = (rng.normal(0, scale, n).astype(np.float16).view(np.uint8).reshape(n, 2))
    return blocks


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's `permute` (rows to the interleaved RoPE order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny(path, types=None, *, seed=0, tied=True, arch="llama", config=CONFIG):
    """A tiny llama GGUF: random weights (std 0.05) in the given types {kind or "blk.N.kind": type} (default q8_0
    for matrices, f32 for norms): encodable ones quantized by gguf from the (q/k-permuted) float weights, the others
    random blocks; byte-level BPE metadata as llama.cpp writes it."""
    from tokenizers.pre_tokenizers import ByteLevel

    types, c, rng = types or {}, config, np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    for add, key in [(writer.add_block_count, "num_hidden_layers"), (writer.add_context_length,
                     "max_position_embeddings"), (writer.add_embedding_length, "hidden_size"),
                     (writer.add_feed_forward_length, "intermediate_size"), (writer.add_head_count,
                     "num_attention_heads"), (writer.add_head_count_kv, "num_key_value_heads"),
                     (writer.add_rope_freq_base, "rope_theta"), (writer.add_layer_norm_rms_eps, "rms_norm_eps")]:
        add(c[key])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    symbols = list(dict.fromkeys(list("Ġthe cat") + sorted(set(ByteLevel.alphabet()) - set("Ġthe cat"))))
    writer.add_token_list(symbols[:99] + ["th", "<|endoftext|>"])
    writer.add_token_types([1] * 100 + [3])
    writer.add_token_merges(["t h"])
    writer.add_chat_template("{{ messages }}")
    h, f, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    shapes = {"attn_q": (h, h), "attn_k": (c["num_key_value_heads"] * hd, h), "attn_v": (c["num_key_value_heads"]
              * hd, h), "attn_output": (h, h), "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f),
              "attn_norm": (h,), "ffn_norm": (h,)}
    names = [("token_embd", (c["vocab_size"], h)), ("output_norm", (h,))] + ([] if tied else [
        ("output", (c["vocab_size"], h))]) + [(f"blk.{i}.{k}", s) for i in range(c["num_hidden_layers"])
                                             for k, s in shapes.items()]
    for name, shape in names:
        kind = name.split(".")[-1]
        qtype = types.get(name, types.get(kind, "q8_0" if len(shape) == 2 else "f32"))
        w = (1 + 0.3 * rng.normal(size=shape) if len(shape) == 1 else 0.05 * rng.normal(size=shape)).astype(np.float32)
        if kind in ("attn_q", "attn_k"):
            w = llama_cpp_permute(w, c["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"])
        if qtype in FLOATS:
            writer.add_tensor(f"{name}.weight", w.astype(FLOATS[qtype]))
        elif qtype in quant_gguf.ENCODABLE or qtype == "bf16":
            writer.add_tensor(f"{name}.weight", gguf.quants.quantize(w, T[qtype.upper()]), raw_dtype=T[qtype.upper()])
        else:
            size, _ = gguf.GGML_QUANT_SIZES[T[qtype.upper()]]
            blocks = random_blocks(qtype, w.size // size, rng, scale=0.002).reshape(shape[0], -1)
            writer.add_tensor(f"{name}.weight", blocks, raw_dtype=T[qtype.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- the decoders ----------------------------------------------------------------------------------------------

def test_format_table_matches_gguf():
    for qtype, (enum, size, nbytes) in quant_gguf.FORMATS.items():
        assert quant_gguf.ggml_type(qtype) == T[qtype.upper()] == enum
        assert gguf.GGML_QUANT_SIZES[T(enum)] == (size, nbytes) == (quant_gguf.block_size(qtype),
                                                                   quant_gguf.block_bytes(qtype))
        assert quant_gguf.qtype_of(T(enum)) == qtype
    assert quant_gguf.qtype_of(T.F32) is None and quant_gguf.qtype_of(T.IQ4_NL) is None
    assert set(quant_gguf.FALLBACK.values()) <= set(quant_gguf.ENCODABLE)


def _bitwise_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


decode_jit = jax.jit(quant_gguf.decode, static_argnums=1)


@pytest.mark.parametrize("qtype", sorted(quant_gguf.FORMATS))
def test_decode_equals_gguf_dequantize_bitwise_on_random_blocks(qtype):
    blocks = random_blocks(qtype, 97, np.random.default_rng(1), scale=3.0)
    want = gguf.quants.dequantize(blocks, T[qtype.upper()])
    assert want.shape == (97, quant_gguf.block_size(qtype)) and np.isfinite(want).all() and np.abs(want).max() > 0
    _bitwise_equal(quant_gguf.decode(blocks, qtype), want)
    _bitwise_equal(decode_jit(jnp.asarray(blocks), qtype), want)


@pytest.mark.parametrize("qtype", quant_gguf.ENCODABLE)
def test_encode_is_gguf_quantize_and_decode_inverts_it_bitwise(qtype):
    x = np.random.default_rng(2).normal(0, 0.7, (53, 32)).astype(np.float32)
    blocks = quant_gguf.encode(x, qtype)
    np.testing.assert_array_equal(blocks, gguf.quants.quantize(x, T[qtype.upper()]))
    assert blocks.dtype == np.uint8 and blocks.shape == (53, quant_gguf.block_bytes(qtype))
    want = gguf.quants.dequantize(blocks, T[qtype.upper()])
    _bitwise_equal(quant_gguf.decode(blocks, qtype), want)
    _bitwise_equal(decode_jit(jnp.asarray(blocks), qtype), want)
    assert 0 < np.abs(want - x).max() < 0.15 * np.abs(x).max()  # a real (lossy) quantization


def test_quantized_array_of_gguf_blocks_dequantizes_with_perm_in_jit():
    x = np.random.default_rng(3).normal(size=(19, 64)).astype(np.float32)  # stored (out=19, in=64)
    q = QuantizedArray(jnp.asarray(quant_gguf.encode(x.reshape(-1, 32), "q4_1")), None, shape=(64, 19),
                       qtype="q4_1", block_size=32, perm=(1, 0))
    q.check("kernel")
    want = gguf.quants.dequantize(gguf.quants.quantize(x, T.Q4_1), T.Q4_1).T
    _bitwise_equal(q.dequantize(), want)
    _bitwise_equal(jax.jit(lambda q: q.dequantize())(q), want)


def test_decode_and_encode_bad_inputs():
    blocks = np.zeros((3, 18), np.uint8)
    with pytest.raises(ValueError, match="unknown GGUF qtype 'q4_2'.*q4_0"):
        quant_gguf.decode(blocks, "q4_2")
    with pytest.raises(ValueError, match=r"takes uint8 blocks \(n_blocks, 20\), got uint8 \(3, 18\)"):
        quant_gguf.decode(blocks, "q4_1")
    with pytest.raises(ValueError, match="cannot quantize 'q4_k'.*write 'q4_1' instead"):
        quant_gguf.encode(np.zeros((2, 256), np.float32), "q4_k")
    with pytest.raises(ValueError, match=r"takes float blocks \(n_blocks, 32\), got \(2, 64\)"):
        quant_gguf.encode(np.zeros((2, 64), np.float32), "q8_0")
    with pytest.raises(ValueError, match="unknown GGUF qtype 'nf4'"):
        quant_gguf.block_bytes("nf4")


# --- from_pretrained(quantized=True) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """Every decoded type once, an F16 head, a BF16 norm and an IQ4_NL tensor (not decoded by jlora)."""
    return write_tiny(tmp_path_factory.mktemp("gguf") / "mixed.gguf", MIXED, tied=False)


def _types(path):
    return {hf_name(t.name): t.tensor_type for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantized_load_keeps_blocks_and_dequantizes_to_the_float_load_exactly(mixed_gguf, dtype):
    _, vq = from_pretrained(mixed_gguf, quantized=True, dtype=dtype)
    _, vf = from_pretrained(mixed_gguf, dtype=dtype)
    types, floats = _types(mixed_gguf), dict(named_leaves(vf))
    dequantized = dict(named_leaves(jax.jit(jlora.dequantize)(vq)))  # one compile (eager decode: tests above)
    seen = set()
    for path, leaf in named_leaves(vq):
        stored, want = types[default_key(path)], np.asarray(floats[path])
        qtype = quant_gguf.qtype_of(stored)
        if qtype is None:  # F32 / F16 / BF16 norms and head, IQ4_NL: float arrays as before
            assert not is_quantized(leaf) and leaf.dtype == dtype
            np.testing.assert_array_equal(np.asarray(leaf), want)
            continue
        seen.add(qtype)
        assert isinstance(leaf, QuantizedArray) and leaf.qtype == qtype and leaf.scales is None
        assert leaf.values.dtype == jnp.uint8 and leaf.values.shape == (want.size // quant_gguf.block_size(qtype),
                                                                       quant_gguf.block_bytes(qtype))
        assert leaf.shape == want.shape and leaf.dtype == jnp.dtype(dtype).name
        assert leaf.perm == ((1, 0) if path.endswith("/kernel") else None)
        leaf.check(path)
        # bitwise (q/k rows un-permuted as rows of blocks: a missing or wrong permutation fails here)
        assert dequantized[path].dtype == dtype
        np.testing.assert_array_equal(np.asarray(dequantized[path]).view(np.uint8), want.view(np.uint8), path)
    assert seen == set(quant_gguf.FORMATS)


def test_quantized_tree_is_about_the_size_of_the_blocks(tmp_path):
    path = write_tiny(tmp_path / "q4.gguf", {"token_embd": "q4_1"}, tied=True)
    _, vq = from_pretrained(path, quantized=True)
    _, vf = from_pretrained(path)
    nbytes = sum(leaf.nbytes for _, leaf in named_leaves(vq))
    floats = sum(leaf.nbytes for _, leaf in named_leaves(vf))
    tensor_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    assert nbytes == tensor_bytes and nbytes < 0.27 * floats  # q8_0: 34 bytes per 32 weights (0.266 of float32)


def test_quantized_load_errors(mixed_gguf, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"quantized=True keeps a GGUF file's blocks.*jlora.quantize"):
        llama.from_pretrained(tmp_path, quantized=True)
    with pytest.raises(ValueError, match="cannot be placed on a mesh yet; load without mesh="):
        from_pretrained(mixed_gguf, quantized=True, mesh=jax.make_mesh((1,), ("data",)))


@pytest.mark.assets
def test_smollm2_q4_1_loads_quantized_at_the_file_size_and_dequantizes_exactly(smollm2_gguf):
    _, vq = from_pretrained(smollm2_gguf, quantized=True)
    _, vf = from_pretrained(smollm2_gguf)
    floats = dict(named_leaves(vf))
    nbytes, quantized = 0, 0
    for path, leaf in named_leaves(vq):
        nbytes += leaf.nbytes
        if is_quantized(leaf):
            quantized += 1
            np.testing.assert_array_equal(np.asarray(leaf.dequantize()), np.asarray(floats[path]), err_msg=path)
    size, float_bytes = os.path.getsize(smollm2_gguf), sum(x.nbytes for x in floats.values())
    print(f"SmolLM2 Q4_1: quantized tree {nbytes / 1e6:.1f} MB, file {size / 1e6:.1f} MB, float32 "
          f"{float_bytes / 1e6:.1f} MB")
    assert quantized == 211  # 210 q4_1 kernels and the q8_0 embedding
    assert 0.95 * size < nbytes <= size and nbytes < 0.2 * float_bytes

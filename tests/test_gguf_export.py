"""jlora.models.gguf.write_gguf: Llama variables (quantized leaves kept as raw blocks, float leaves quantized to the
source file's types) written as GGUF with the source's metadata and tokenizer, reloaded by jlora; fallbacks
reported; atomic; bad inputs."""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_quant_gguf import CONFIG, IDS, llama_cpp_permute, write_tiny

import jlora
from jlora import quant_gguf
from jlora.models import from_pretrained
from jlora.models.gguf import read_tokenizer, write_gguf
from jlora.paths import named_leaves
from jlora.qarray import is_quantized

T = gguf.GGMLQuantizationType
ENCODED = {"attn_q": "q4_0", "attn_k": "q4_1", "attn_v": "q5_0", "attn_output": "q5_1", "ffn_norm": "bf16",
           "output": "f16"}
def _fields(path):
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def _tensors(path):
    return {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def _set(tree, path, value):
    *parents, last = path.split("/")
    node = tree
    for p in parents:
        node = node[p]
    node[last] = value


def _get(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return tree


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("export") / "src.gguf", ENCODED, tied=False, seed=4)


def test_an_unchanged_quantized_tree_writes_the_same_file_contents(source, tmp_path):
    _, vq = from_pretrained(source, quantized=True)
    out = tmp_path / "same.gguf"
    report = write_gguf(out, vq, like=source)
    assert _tensors(out) == _tensors(source)  # names, order, types and bytes (q/k rows permuted back)
    assert list(_tensors(out)) == list(_tensors(source))
    assert _fields(out) == _fields(source)  # architecture, tokenizer, chat template, file type
    assert report["blk.0.attn_q.weight"] == ("q4_0", "raw blocks")
    assert report["token_embd.weight"] == ("q8_0", "raw blocks")
    assert report["output.weight"] == ("f16", "float") and report["blk.1.ffn_norm.weight"] == ("bf16", "float")
    assert report["blk.1.attn_norm.weight"] == ("f32", "float")
    assert read_tokenizer(out).encode("the cat").ids == read_tokenizer(source).encode("the cat").ids
    assert sorted(os.listdir(tmp_path)) == ["same.gguf"]  # no temporary file left
    # a bfloat16 load: the blocks are the same bytes whatever the logical dtype (the float norms are rounded)
    _, vb = from_pretrained(source, quantized=True, dtype=jnp.bfloat16)
    write_gguf(tmp_path / "bf16.gguf", vb, like=source)
    blocks = {k: v for k, v in _tensors(source).items() if v[0] in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)}
    assert len(blocks) == 15 and blocks.items() <= _tensors(tmp_path / "bf16.gguf").items()


def test_a_merged_weight_exports_and_reloads_as_the_perturbed_model(source, tmp_path):
    module, vq = from_pretrained(source, quantized=True)
    _, original = from_pretrained(source)
    rng = np.random.default_rng(5)
    merged = jax.tree.map(lambda x: x, vq, is_leaf=is_quantized)
    changed = {"params/model/layers/0/self_attn/q_proj/kernel": "blk.0.attn_q.weight",  # q4_0, rows permuted
               "params/model/layers/1/self_attn/k_proj/kernel": "blk.1.attn_k.weight",  # q4_1, rows permuted
               "params/model/layers/1/mlp/down_proj/kernel": "blk.1.ffn_down.weight"}  # q8_0
    for path in changed:  # as a merge into a float weight does: W + delta, float32
        w = _get(vq, path).dequantize()
        _set(merged, path, w + jnp.asarray(0.05 * rng.normal(size=w.shape), jnp.float32))
    out = tmp_path / "merged.gguf"
    report = write_gguf(out, merged, like=source)
    for name in changed.values():
        assert report[name] == (quant_gguf.qtype_of(_tensors(source)[name][0]), "quantized")
    assert report["blk.0.attn_k.weight"] == ("q4_1", "raw blocks")
    _, reloaded = from_pretrained(out)
    want, perturbed = dict(named_leaves(original)), dict(named_leaves(merged))
    heads = {"q_proj": CONFIG["num_attention_heads"], "k_proj": CONFIG["num_key_value_heads"]}
    for path, leaf in named_leaves(reloaded):
        if path not in changed:  # raw blocks (or floats): exactly as before
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[path]), err_msg=path)
            continue
        # the oracle: gguf's own quantize of the float weight in llama.cpp's row order, dequantized, un-permuted
        ggml = _tensors(source)[changed[path]][0]
        w = np.asarray(perturbed[path]).T
        n_head = next((n for k, n in heads.items() if k in path), None)
        stored = llama_cpp_permute(w, n_head) if n_head else w
        expect = gguf.quants.dequantize(gguf.quants.quantize(stored, ggml), ggml)
        if n_head:
            expect = expect.reshape(n_head, -1, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(np.asarray(leaf), expect.T, err_msg=path)
        assert 0 < np.abs(np.asarray(leaf) - np.asarray(perturbed[path])).max() < 0.1  # quantization error only
    apply = jax.jit(module.apply)
    got, target, before = (np.asarray(apply(v, IDS)) for v in (reloaded, jlora.dequantize(merged), original))
    moved = np.abs(target - before).max()
    print(f"export: |reloaded - merged| {np.abs(got - target).max():.2e}, |merged - base| {moved:.2e}")
    assert np.abs(got - target).max() < 0.2 * moved  # the merge survives, up to quantization error


def test_qtype_overrides_and_fallbacks_are_reported(tmp_path):
    src = write_tiny(tmp_path / "k.gguf", {"ffn_gate": "q4_k", "blk.1.ffn_up": "iq4_nl"}, seed=6)
    _, vq = from_pretrained(src, quantized=True)
    _, vf = from_pretrained(src)
    # quantized leaves of the file's types: raw blocks, K-quants included
    report = write_gguf(tmp_path / "raw.gguf", vq, like=src)
    assert report["blk.0.ffn_gate.weight"] == ("q4_k", "raw blocks")
    assert report["blk.1.ffn_up.weight"] == ("q8_0", "fallback: jlora does not decode IQ4_NL")  # loaded as float
    assert _tensors(tmp_path / "raw.gguf")["blk.0.ffn_gate.weight"] == _tensors(src)["blk.0.ffn_gate.weight"]
    # float leaves: the file's type where gguf can quantize it, else the nearest type it can
    report = write_gguf(tmp_path / "float.gguf", vf, like=src)
    assert report["blk.0.ffn_gate.weight"] == ("q4_1", "fallback: the gguf package cannot quantize q4_k")
    assert report["blk.0.ffn_up.weight"] == ("q8_0", "quantized")
    # qtype for every block tensor: raw blocks already of that type stay raw, the others are requantized
    report = write_gguf(tmp_path / "q5.gguf", vq, like=src, qtype="q8_0")
    assert report["blk.0.ffn_gate.weight"] == ("q8_0", "quantized")
    assert report["blk.0.attn_q.weight"] == ("q8_0", "raw blocks")
    assert report["output_norm.weight"] == ("f32", "float")
    report = write_gguf(tmp_path / "q6.gguf", vq, like=src, qtype="q6_k")
    assert report["blk.0.attn_q.weight"] == ("q8_0", "fallback: the gguf package cannot quantize q6_k")
    assert _fields(tmp_path / "q5.gguf")["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0  # as the source
    write_gguf(tmp_path / "q4.gguf", vq, like=src, qtype="q4_0")
    assert _fields(tmp_path / "q4.gguf")["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0  # follows
    _, back = from_pretrained(tmp_path / "q5.gguf")
    for (path, a), b in zip(named_leaves(back), jax.tree.leaves(vf)):  # q8_0 rounding: at most absmax / 254
        err = np.abs(np.asarray(a) - np.asarray(b)).max()
        requantized = "gate" in path or "layers/1/mlp/up_proj" in path  # q4_k and iq4_nl; the q8_0 ones raw
        assert err <= np.abs(np.asarray(b)).max() / 250 and (err > 0) == requantized, path
    # a source type that is no block format and no F32/F16/BF16 (here F64): written F32, reported
    f64 = write_tiny(tmp_path / "f64.gguf", {"output_norm": "f64", "ffn_gate": "q4_k", "blk.1.ffn_up": "iq4_nl"},
                     seed=6)
    assert write_gguf(tmp_path / "x.gguf", vq, like=f64)["output_norm.weight"] == (
        "f32", "fallback: F64 written as F32")


def test_a_failed_write_leaves_the_old_file(source, tmp_path, monkeypatch):
    _, vq = from_pretrained(source, quantized=True)
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the previous export")

    def crash(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="No space left"):
        write_gguf(out, vq, like=source)
    assert out.read_bytes() == b"the previous export" and sorted(os.listdir(tmp_path)) == ["model.gguf"]


def test_bad_inputs(source, tmp_path):
    _, vq = from_pretrained(source, quantized=True)
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match=r"unknown qtype 'q4_2'; choose one of \[.*'q4_0'"):
        write_gguf(out, vq, like=source, qtype="q4_2")
    with pytest.raises(FileNotFoundError, match="no such GGUF file like="):
        write_gguf(out, vq, like=tmp_path / "missing.gguf")
    (tmp_path / "notes.gguf").write_text("not a gguf file")
    with pytest.raises(ValueError, match="notes.gguf is not a readable GGUF file"):
        write_gguf(out, vq, like=tmp_path / "notes.gguf")
    with pytest.raises(ValueError, match="gpt.gguf is a GGUF file of architecture 'gpt2'; only 'llama'"):
        write_gguf(out, vq, like=write_tiny(tmp_path / "gpt.gguf", arch="gpt2"))
    fewer = jax.tree.map(lambda x: x, vq, is_leaf=is_quantized)
    del fewer["params"]["model"]["layers"]["1"]["mlp"]["up_proj"]
    with pytest.raises(ValueError, match=r"src.gguf: missing \['model.layers.1.mlp.up_proj.weight'\]; pass the"):
        write_gguf(out, fewer, like=source)
    with pytest.raises(ValueError, match=r"missing \['model.embed_tokens.weight'.*pass the \{'params': \.\.\.\} tree"):
        write_gguf(out, vq["params"], like=source)
    with pytest.raises(ValueError, match="not those of the model in .*src.gguf: missing"):
        write_gguf(out, jnp.zeros(3), like=source)
    tied = write_tiny(tmp_path / "tied.gguf", ENCODED, tied=True, seed=4)
    with pytest.raises(ValueError, match=r"not in the file: \['params/lm_head/kernel'\]"):
        write_gguf(out, vq, like=tied)
    _, other = from_pretrained(write_tiny(tmp_path / "wide.gguf", config={**CONFIG, "vocab_size": 103}, tied=False))
    with pytest.raises(ValueError, match=r"params/model/embed_tokens/embedding has shape \(103, 256\), the file's "
                                         r"tensor needs \(101, 256\)"):
        write_gguf(out, other, like=source)
    assert not out.exists()  # nothing written by a failed call


@pytest.mark.assets
def test_smollm2_quantized_export_is_the_same_file(smollm2_gguf, tmp_path):
    _, vq = from_pretrained(smollm2_gguf, quantized=True)
    out = tmp_path / "smollm2.gguf"
    report = write_gguf(out, vq, like=smollm2_gguf)
    assert sorted(set(report.values())) == [("f32", "float"), ("q4_1", "raw blocks"), ("q8_0", "raw blocks")]
    assert out.read_bytes() == smollm2_gguf.read_bytes()  # metadata, tokenizer, blocks: byte for byte

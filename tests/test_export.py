"""jlora.models.save_pretrained: GPT-2, Llama (also straight from a quantized GGUF) and BERT / RoBERTa trees written
as Hugging Face directories that jlora loads back bit for bit and transformers runs to the same logits; bfloat16,
sharding with an index, quantized leaves, the atomic replace, and the bad inputs."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from test_quant_gguf import write_tiny

import jlora
from jlora.models import bert, from_pretrained, gpt2, llama, save_pretrained
from jlora.models import export as export_module
from jlora.paths import named_leaves
from jlora.qarray import is_quantized

# distinct dims: vocab 101, hidden 48, 4 or 6 heads, intermediate 80, 2 layers, batch 2 x seq 7
GPT2 = gpt2.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
LLAMA = llama.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
                          max_position_embeddings=64)
BERT = bert.BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                       max_position_embeddings=64, num_labels=3)
ROBERTA = dataclasses.replace(BERT, model_type="roberta", type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
GGUF = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0, max_position_embeddings=64)
TYPES = {"attn_q": "q4_0", "attn_k": "q4_1", "ffn_up": "q5_0", "ffn_down": "iq4_nl", "attn_norm": "bf16"}
IDS = np.random.default_rng(0).integers(2, 101, (2, 7)).astype(np.int32)
MODELS = {
    "gpt2": gpt2.GPT2LMHeadModel(GPT2),
    "gpt2-untied": gpt2.GPT2LMHeadModel(dataclasses.replace(GPT2, tie_word_embeddings=False)),
    "llama": llama.Llama(LLAMA),
    "llama-tied": llama.Llama(dataclasses.replace(LLAMA, tie_word_embeddings=True)),
    "bert": bert.BertModel(BERT),
    "bert-no-pooler": bert.BertModel(BERT, add_pooling_layer=False),
    "bert-classifier": bert.BertForSequenceClassification(BERT),
    "roberta-classifier": bert.BertForSequenceClassification(ROBERTA),
}


def tiny(name):
    """(module, random variables: weights and biases ~ N(0, 0.1), norm scales ~ 1 + N(0, 0.1)), made in numpy from
    the shapes `module.init` gives (no compilation: fast)."""
    module, rng = MODELS[name], np.random.default_rng(0)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(IDS))
    return module, jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(
        (p[-1].key == "scale") + 0.1 * rng.normal(size=s.shape), s.dtype), shapes)


def noisy(adapters, seed=3):
    """`helpers.perturb` in numpy (no compilation per shape): every leaf + N(0, 0.3), so lora_b is non-zero."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.normal(size=x.shape), x.dtype), adapters)


def leaves(tree):
    return {p: np.asarray(x) for p, x in named_leaves(tree)}


def assert_same(got, want):
    """Same paths, dtypes and bits."""
    got, want = leaves(got), leaves(want)
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def stored(directory):
    """{tensor name: (safetensors dtype, shape)} over all the files of `directory`."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118
                view = f.get_slice(key)
                out[key] = (view.get_dtype(), tuple(view.get_shape()))
    return out


def stored_in(file):
    """{tensor name: numpy array} of one safetensors file."""
    with safe_open(file, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def file_sizes(directory):
    """{safetensors file: bytes of its tensors}."""
    return {f.name: sum(x.nbytes for x in stored_in(f).values()) for f in directory.glob("*.safetensors")}


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_identical(name, tmp_path):
    module, variables = tiny(name)
    assert save_pretrained(tmp_path / "out", variables, config=module.config) == tmp_path / "out"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing left beside it
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    loaded_module, loaded = from_pretrained(tmp_path / "out")
    assert type(loaded_module) is type(module) and loaded_module.config == module.config
    assert_same(loaded, variables)
    names, kind = stored(tmp_path / "out"), name.split("-")[0]
    prefix = {"bert-classifier": "bert.", "roberta-classifier": "roberta."}.get(name, "")
    want = {"gpt2": ("transformer.h.0.mlp.c_fc.weight", (48, 192)),  # GPT-2's Conv1D keeps (in, out)
            "llama": ("model.layers.0.mlp.down_proj.weight", (48, 80)),  # torch Linear (out, in)
            "bert": ("encoder.layer.1.intermediate.dense.weight", (80, 48))}[kind.replace("roberta", "bert")]
    assert names[prefix + want[0]] == ("F32", want[1])
    if kind in ("gpt2", "llama"):  # a tied head is written once, as the embedding (as transformers does)
        tied = module.config.tie_word_embeddings
        assert ("lm_head.weight" in names) is not tied
        assert json.loads((tmp_path / "out/config.json").read_text())["tie_word_embeddings"] is tied


def test_a_merged_lora_tree_exports_with_its_update(tmp_path):
    module, variables = tiny("gpt2")
    lora = jlora.lora_transform(module.apply, jlora.LoraConfig(rank=7, alpha=14, targets=("c_attn", "c_fc")))
    frozen, adapters = lora.init(variables, jnp.asarray(IDS), key=jax.random.key(2))
    adapters = noisy(adapters)
    assert float(jnp.abs(adapters["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]["lora_b"]).max()) > 0
    merged = jax.jit(lambda f, a: jlora.merge(f, a, lora.config))(frozen, adapters)
    save_pretrained(tmp_path / "merged", merged, config=module.config)
    _, loaded = from_pretrained(tmp_path / "merged")
    assert_same(loaded, merged)
    path = "params/transformer/h/1/mlp/c_fc/kernel"  # the update is in it
    assert np.abs(leaves(loaded)[path] - leaves(variables)[path]).max() > 1e-3


def test_bfloat16_and_quantized_leaves(tmp_path):
    _, variables = tiny("llama")
    save_pretrained(tmp_path / "bf16", variables, config=LLAMA, dtype=jnp.bfloat16)
    assert {dtype for dtype, _ in stored(tmp_path / "bf16").values()} == {"BF16"}
    assert json.loads((tmp_path / "bf16/config.json").read_text())["torch_dtype"] == "bfloat16"
    _, loaded = from_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16)
    bf16 = jax.jit(lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree))  # XLA's rounding: the oracle
    assert_same(loaded, bf16(variables))
    quantized = jax.jit(lambda v: jlora.quantize(v, qtype="nf4", block_size=16, targets=("q_proj", "lm_head")))(
        variables)
    assert sum(is_quantized(x) for _, x in named_leaves(quantized)) == 3
    save_pretrained(tmp_path / "nf4", quantized, config=LLAMA)  # dequantized on the way out, in their own dtype
    _, loaded = from_pretrained(tmp_path / "nf4")
    dequantized = jax.jit(jlora.dequantize)(quantized)
    assert_same(loaded, dequantized)
    assert not np.array_equal(leaves(loaded)["params/lm_head/kernel"], leaves(variables)["params/lm_head/kernel"])
    save_pretrained(tmp_path / "nf4-bf16", quantized, config=LLAMA, dtype=jnp.bfloat16)
    assert_same(from_pretrained(tmp_path / "nf4-bf16", dtype=jnp.bfloat16)[1], bf16(dequantized))


def test_a_quantized_gguf_tree_exports_in_hugging_face_layout(tmp_path):
    source = write_tiny(tmp_path / "tiny.gguf", TYPES, tied=True, seed=3, config=GGUF)  # tied: no output.weight
    module, quantized = from_pretrained(source, quantized=True)
    layer = quantized["params"]["model"]["layers"]["0"]
    assert layer["self_attn"]["q_proj"]["kernel"].qtype == "q4_0" and layer["mlp"]["up_proj"]["kernel"].qtype == "q5_0"
    assert not is_quantized(layer["mlp"]["down_proj"]["kernel"])  # iq4_nl: jlora does not decode it, loaded as float
    save_pretrained(tmp_path / "hf", quantized, config=module.config)
    names = stored(tmp_path / "hf")
    assert "lm_head.weight" not in names and names["model.embed_tokens.weight"] == ("F32", (101, 64))
    assert names["model.layers.1.mlp.down_proj.weight"] == ("F32", (64, 96))
    _, loaded = from_pretrained(tmp_path / "hf")
    _, dequantized = from_pretrained(source)  # by the gguf package, q/k rows un-permuted by the loader
    assert_same(loaded, dequantized)


def test_sharded_with_an_index(tmp_path):
    _, variables = tiny("llama")  # embedding 101 x 48 x 4 = 19392 bytes, the largest tensor
    save_pretrained(tmp_path / "out", variables, config=LLAMA, max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path / "out"))
    n = len(files) - 2
    assert n > 2 and files[1:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert [files[0], files[-1]] == ["config.json", "model.safetensors.index.json"]
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in leaves(variables).values())
    assert set(index["weight_map"].values()) == set(files[1:-1]) and index["weight_map"].keys() == stored(
        tmp_path / "out").keys()
    assert all(size <= 40_000 for size in file_sizes(tmp_path / "out").values())
    assert_same(from_pretrained(tmp_path / "out")[1], variables)
    save_pretrained(tmp_path / "small", variables, config=LLAMA, max_shard_size=10_000)  # below the embedding
    sizes = file_sizes(tmp_path / "small")
    big = [file for file, size in sizes.items() if size > 10_000]  # embedding, head, 6 MLP matrices: one a file
    assert len(big) == 8 and all(len(stored_in(tmp_path / "small" / file)) == 1 for file in big)
    assert any(len(stored_in(tmp_path / "small" / file)) > 1 for file in sizes)  # the others share files
    assert_same(from_pretrained(tmp_path / "small")[1], variables)


def test_replaces_only_what_it_wrote(tmp_path, monkeypatch):
    _, variables = tiny("bert")
    out = tmp_path / "out"
    save_pretrained(out, variables, config=BERT)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(out, variables, config=BERT)
    changed = jax.tree.map(lambda x: np.asarray(x) + np.float32(1), variables)  # numpy leaves are written too
    save_pretrained(out, changed, config=BERT, overwrite=True)
    assert_same(from_pretrained(out)[1], changed)
    foreign = tmp_path / "foreign"  # a checkpoint jlora did not write: never deleted
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / "model.safetensors").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="foreign exists and is not a checkpoint written by jlora.*never deletes"):
        save_pretrained(foreign, variables, config=BERT, overwrite=True)
    (out / "README.md").write_text("notes")  # ours, but with a file added since: not replaced either
    with pytest.raises(ValueError, match="README.md"):
        save_pretrained(out, variables, config=BERT, overwrite=True)
    assert sorted(os.listdir(foreign)) == ["config.json", "model.safetensors"]
    (out / "README.md").unlink()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(out, variables, config=BERT, overwrite=True)
    assert_same(from_pretrained(out)[1], changed)  # the old copy, whole
    assert sorted(os.listdir(tmp_path)) == ["foreign", "out"]  # no staging directory left


def test_config_dicts_and_bad_inputs(tmp_path):
    module, variables = tiny("llama")
    hf_config = json.loads((save_pretrained(tmp_path / "a", variables, config=LLAMA) / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["num_key_value_heads"] == 2
    save_pretrained(tmp_path / "b", variables, config=hf_config | {"dtype": "bfloat16"})  # the dict the loader reads
    assert json.loads((tmp_path / "b/config.json").read_text()) == hf_config
    save_pretrained(tmp_path / "b", variables, config=hf_config | {"bos_token_id": np.int64(7)}, overwrite=True)
    assert json.loads((tmp_path / "b/config.json").read_text())["bos_token_id"] == 7  # numpy values: plain JSON
    out = tmp_path / "bad"
    with pytest.raises(TypeError, match="config must be a GPT2Config, LlamaConfig or BertConfig.*got str"):
        save_pretrained(out, variables, config="llama")
    with pytest.raises(ValueError, match="model_type 't5'; jlora.models writes"):
        save_pretrained(out, variables, config={"model_type": "t5"})
    with pytest.raises(TypeError, match=r"config value \{1, 2\} \(set\) cannot be written to config.json"):
        save_pretrained(out, variables, config=hf_config | {"bos_token_id": {1, 2}})
    with pytest.raises(ValueError, match="config has no 'hidden_size'"):
        save_pretrained(out, variables, config={k: v for k, v in hf_config.items() if k != "hidden_size"})
    with pytest.raises(TypeError, match=r"variables must be the \{'params': ...\} dict of a Llama"):
        save_pretrained(out, [variables], config=LLAMA)
    with pytest.raises(ValueError, match=r"missing params/lm_head/kernel.*wrap the parameters as \{'params'"):
        save_pretrained(out, variables["params"], config=LLAMA)
    params = variables["params"]
    no_head = {"params": {k: v for k, v in params.items() if k != "lm_head"}}
    with pytest.raises(ValueError, match="not a Llama of this config: missing params/lm_head/kernel; pass"):
        save_pretrained(out, no_head, config=LLAMA)
    with pytest.raises(ValueError, match="not in the model: params/lm_head/kernel; pass"):  # untied tree, tied config
        save_pretrained(out, variables, config=dataclasses.replace(LLAMA, tie_word_embeddings=True))
    lora = jlora.lora_transform(module.apply, jlora.LoraConfig(rank=7, targets=("q_proj",)))
    _, adapters = lora.init(variables, jnp.asarray(IDS), key=jax.random.key(2))
    with pytest.raises(ValueError, match=r"q_proj/kernel/lora_a.*LoRA factors: merge them first, jlora.merge"):
        save_pretrained(out, adapters, config=LLAMA)  # the adapters, not merged
    with pytest.raises(ValueError, match=r"params/model/layers/0/mlp/up_proj/kernel has shape \(48, 80\), the config "
                                         r"gives \(48, 96\).*not one of another size"):
        save_pretrained(out, variables, config=dataclasses.replace(LLAMA, intermediate_size=96))
    swap = lambda tree, path, value: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, x: value if jax.tree_util.keystr(p, simple=True, separator="/") == path else x, tree,
        is_leaf=is_quantized)
    with pytest.raises(TypeError, match="params/model/norm/scale is a str, not an array"):
        save_pretrained(out, swap(variables, "params/model/norm/scale", "ones"), config=LLAMA)
    with pytest.raises(TypeError, match="params/model/norm/scale has dtype int32, but the model's weight is float"):
        save_pretrained(out, swap(variables, "params/model/norm/scale", jnp.ones(48, jnp.int32)), config=LLAMA)
    q = jlora.quantize(variables, qtype="int8", block_size=16, targets=("lm_head",))
    kernel = q["params"]["lm_head"]["kernel"]
    edited = dataclasses.replace(kernel, shape=(101, 48))  # its blocks fit, but it is not the model's head
    with pytest.raises(ValueError, match=r"params/lm_head/kernel has shape \(101, 48\), the config gives \(48, 101\)"):
        save_pretrained(out, swap(q, "params/lm_head/kernel", edited), config=LLAMA)
    edited = dataclasses.replace(kernel, values=kernel.values[:-16])
    with pytest.raises(ValueError, match=r"params/lm_head/kernel: QuantizedArray\(int8.*needs values of shape"):
        save_pretrained(out, swap(q, "params/lm_head/kernel", edited), config=LLAMA)
    with pytest.raises(ValueError, match="dtype=int8 is not a float type"):
        save_pretrained(out, variables, config=LLAMA, dtype=jnp.int8)
    for size in ("5 parsecs", 0, -1, "0.1B", True, 2.5):
        with pytest.raises(ValueError, match=f"max_shard_size={size!r} is not a size"):
            save_pretrained(out, variables, config=LLAMA, max_shard_size=size)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["a", "b"]
    assert export_module._bytes("2GiB") == 2 * 2**30 and export_module._bytes("5gb") == 5 * 10**9


# ---------------------------------------------------------------------------------------- reference: transformers
@pytest.mark.reference
@pytest.mark.parametrize("name", ["gpt2-merged", "gguf-llama", "bert-classifier", "roberta-classifier"])
def test_transformers_loads_the_export_to_the_same_logits(name, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if name == "gguf-llama":
        source = write_tiny(tmp_path / "t.gguf", TYPES, tied=True, seed=5, config=GGUF)
        module, variables = from_pretrained(source, quantized=True)
    else:
        module, variables = tiny(name.replace("-merged", ""))
    if name == "gpt2-merged":
        lora = jlora.lora_transform(module.apply, jlora.LoraConfig(rank=7, targets=("c_attn", "c_proj")))
        frozen, adapters = lora.init(variables, jnp.asarray(IDS), key=jax.random.key(2))
        variables = jlora.merge(frozen, noisy(adapters), lora.config)
    save_pretrained(tmp_path / "hf", variables, config=module.config)
    kind = "ForSequenceClassification" if "classifier" in name else "ForCausalLM"
    model = getattr(transformers, f"AutoModel{kind}").from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()
    if name == "gguf-llama":  # the quantized tree runs under lora.apply; module.apply takes its float form
        variables = jax.jit(jlora.dequantize)(variables)
    got = module.apply(variables, jnp.asarray(IDS))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 if "classifier" in name else 1e-4, rtol=1e-4)

"""jlora.models.llama against transformers' LlamaForCausalLM (tiny random models; SmolLM2-135M-Instruct from its Q4_1
GGUF, both models built from the same dequantized tensors), the GGUF reader (names, the q/k RoPE permutation, the
tokenizer), loading errors, and LoRA on Llama with and without the cache."""

import copy
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_factored_equals_merged, perturb, save_checkpoint
from safetensors.numpy import save_file

import jlora
from jlora.models import llama
from jlora.models.generation import cached_step, generate
from jlora.models.gguf import hf_name, read_gguf, unpermute
from jlora.paths import named_leaves

# distinct dims: batch 2, seq 7, hidden 48, 6 heads of 8, 2 kv heads (3 q heads each), intermediate 80, vocab 101
TINY = dict(model_type="llama", vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
            max_position_embeddings=64, hidden_act="silu")
IDS = np.random.default_rng(0).integers(0, 101, (2, 7)).astype(np.int32)
NEW_TOKENS = 20
# ggml tensor names, the inverse of jlora.models.gguf's mapping (used to write GGUF files here)
TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's `permute`, the oracle `unpermute` must invert."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)



def write_gguf(path, arch="llama", tensors=None, hf_config=None):
    """A GGUF file as llama.cpp's converter writes one: F32 tensors, q/k rows permuted, a byte-level BPE vocabulary
    (99 byte symbols, the merge "t h", and <|endoftext|> as a control token)."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    writer = gguf.GGUFWriter(str(path), arch)
    c = hf_config or TINY
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    symbols = list("Ġthe cat") + sorted(set(ByteLevel.alphabet()) - set("Ġthe cat"))
    tokens = list(dict.fromkeys(symbols))[:99] + ["th", "<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 100 + [3])
    writer.add_token_merges(["t h"])
    for name, w in (tensors or {}).items():
        w = np.ascontiguousarray(w, dtype=np.float32)
        if name.startswith("model.layers."):
            _, _, layer, *module, _ = name.split(".")
            kind = TO_GGUF[".".join(module)]
            if kind in ("attn_q", "attn_k"):
                w = llama_cpp_permute(w, c["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"])
            name = f"blk.{layer}.{kind}.weight"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[name]
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny(tied, dtype=jnp.float32):
    """A random jlora Llama (norm scales perturbed away from 1) and its variables, cast to `dtype`."""
    module = llama.Llama(llama.LlamaConfig.from_hf({**TINY, "tie_word_embeddings": tied}), dtype=dtype)
    return module, jax.tree.map(lambda x: x.astype(dtype), _tiny_variables(tied))


@functools.cache
def _tiny_variables(tied):
    module = llama.Llama(llama.LlamaConfig.from_hf({**TINY, "tie_word_embeddings": tied}))
    return perturb(jax.jit(module.init)(jax.random.key(0), jnp.asarray(IDS)), seed=7, scale=0.1)


def greedy(module, variables, prompt, apply_fn=None, *args):
    step = cached_step(apply_fn, *args) if apply_fn else cached_step(module.apply, variables)
    cache = module.init_cache(prompt.shape[0], prompt.shape[1] + NEW_TOKENS)
    return np.asarray(generate(step, jnp.asarray(prompt), cache=cache, max_new_tokens=NEW_TOKENS))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_tiny(request, tmp_path_factory):
    """(transformers LlamaForCausalLM, its save_pretrained directory); random weights, norms perturbed."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=request.param, initializer_range=0.2,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    return model, directory


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


@pytest.mark.reference
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tiny_logits_match_transformers(hf_tiny, dtype):
    import torch

    model, directory = hf_tiny
    module, variables = llama.from_pretrained(directory, dtype=dtype)
    paths = dict(named_leaves(variables))
    assert paths["params/model/layers/1/self_attn/k_proj/kernel"].shape == (48, 16)
    assert paths["params/model/layers/0/mlp/down_proj/kernel"].dtype == dtype
    assert {"params/model/embed_tokens/embedding", "params/model/norm/scale",
            "params/model/layers/1/post_attention_layernorm/scale"} <= set(paths)
    assert ("params/lm_head/kernel" in paths) != model.config.tie_word_embeddings
    want, got = hf_logits(model, IDS), np.asarray(jax.jit(module.apply)(variables, jnp.asarray(IDS)))
    diff = np.abs(got - want).max()
    print(f"tiny {jnp.dtype(dtype).name}: max |logit diff| {diff:.2e} (|logits| <= {np.abs(want).max():.1f})")
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    else:  # as close to the float32 logits as transformers' own bfloat16 run (~0.15 here), give or take half
        own = np.abs(hf_logits(copy.deepcopy(model).to(torch.bfloat16), IDS) - want).max()
        assert diff <= 1.5 * own, (diff, own)


@pytest.mark.reference
def test_tiny_greedy_matches_transformers_generate(hf_tiny):
    import torch

    model, directory = hf_tiny
    module, variables = llama.from_pretrained(directory)
    want = model.generate(torch.as_tensor(IDS, dtype=torch.long), attention_mask=torch.ones(IDS.shape, dtype=int),
                          max_new_tokens=NEW_TOKENS, do_sample=False).numpy()
    np.testing.assert_array_equal(greedy(module, variables, IDS), want)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 0.1)])  # bf16: 2**-4 at 2
def test_cache_incremental_equals_full_forward(dtype, atol):
    module, variables = tiny(tied=False, dtype=dtype)
    full = module.apply(variables, jnp.asarray(IDS))
    step = jax.jit(lambda v, ids, cache: module.apply(v, ids, cache=cache))
    cache, pieces = module.init_cache(2, 9), []
    for lo, hi in [(0, 4), (4, 5), (5, 7)]:  # a prefill of 4, one token, two tokens
        logits, cache = step(variables, jnp.asarray(IDS[:, lo:hi]), cache)
        pieces.append(logits)
    assert int(cache["index"]) == 7 and cache["k"].shape == (2, 2, 9, 2, 8) and cache["k"].dtype == dtype
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=atol, rtol=0)
    logits, _ = step(variables, jnp.asarray(IDS[:, :3]), cache)  # positions 7..9: past max_len 9
    assert np.isnan(np.asarray(logits)).all()


def test_lora_factored_equals_merged_with_and_without_cache():
    module, variables = tiny(tied=False)
    config = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    _, frozen, adapters = assert_factored_equals_merged(module.apply, variables, (jnp.asarray(IDS),), config)
    assert adapters["params"]["model"]["layers"]["1"]["self_attn"]["v_proj"]["kernel"]["lora_b"].shape == (4, 16)

    def with_cache(v, ids, cache):
        return module.apply(v, ids, cache=cache)

    _, cache = with_cache(variables, jnp.asarray(IDS[:, :3]), module.init_cache(2, 9))  # index 3: offset positions
    cached = jlora.lora_transform(with_cache, config, strict=True)
    frozen, adapters = cached.init(variables, jnp.asarray(IDS[:, 3:]), cache, key=jax.random.key(1))
    adapters = perturb(adapters)
    merged = jlora.merge(frozen, adapters, config)
    got = jax.jit(cached.apply)(frozen, adapters, jnp.asarray(IDS[:, 3:]), cache)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got,
                 with_cache(merged, jnp.asarray(IDS[:, 3:]), cache))
    assert np.abs(got[0] - with_cache(variables, jnp.asarray(IDS[:, 3:]), cache)[0]).max() > 1e-3  # not vacuous
    np.testing.assert_array_equal(greedy(module, merged, IDS[:, :3]),
                                  greedy(module, None, IDS[:, :3], cached.apply, frozen, adapters))


@pytest.mark.reference
def test_gguf_round_trip_undoes_rope_permutation(hf_tiny, tmp_path):
    model, _ = hf_tiny
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
    assert not np.array_equal(llama_cpp_permute(w, 6), w)
    np.testing.assert_array_equal(unpermute(llama_cpp_permute(w, 6), 6), w)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    path = write_gguf(tmp_path / "tiny.gguf", tensors=tensors)
    hf_config, read, tokenizer = read_gguf(path)
    assert read.keys() == tensors.keys()
    for name, value in tensors.items():
        np.testing.assert_array_equal(read[name], value, err_msg=name)
    assert hf_config["tie_word_embeddings"] == model.config.tie_word_embeddings
    assert (hf_config["vocab_size"], hf_config["num_key_value_heads"], hf_config["head_dim"]) == (101, 2, 8)
    module, variables = llama.from_pretrained(path)
    np.testing.assert_allclose(module.apply(variables, jnp.asarray(IDS)), hf_logits(model, IDS), atol=1e-4, rtol=0)
    enc = tokenizer.encode("the cat<|endoftext|>")
    assert enc.tokens == ["th", "e", "Ġ", "c", "a", "t", "<|endoftext|>"] and enc.ids[-1] == 100
    assert tokenizer.decode(enc.ids, skip_special_tokens=False) == "the cat<|endoftext|>"


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        read_gguf(write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    with pytest.raises(ValueError, match="'blk.0.attn_qkv.weight' has no Llama counterpart"):
        hf_name("blk.0.attn_qkv.weight")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        llama.from_pretrained(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        llama.from_pretrained(tmp_path / "missing")
    for edit, match in [({"model_type": "gpt2"}, "not a Llama"), ({"rope_scaling": {"rope_type": "llama3"}}, "llama3"),
                        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "linear"),
                        ({"attention_bias": True}, "attention_bias"), ({"num_key_value_heads": 4}, "multiple of")]:
        with pytest.raises(ValueError, match=match):
            llama.LlamaConfig.from_hf({**TINY, **edit})
    module, variables = tiny(tied=False)
    directory = save_checkpoint(tmp_path / "ckpt", TINY, variables)
    llama.from_pretrained(directory)  # loads as saved
    (directory / "config.json").write_text(json.dumps({**TINY, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight: checkpoint \(80, 48\), model expects "
                                         r"\(96, 48\) \(stored transposed"):
        llama.from_pretrained(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        llama.from_pretrained(directory)
    with pytest.raises(ValueError, match="input_ids must be an int array"):
        module.apply(variables, jnp.ones((2, 7)))
    with pytest.raises(ValueError, match="cache k/v have shape"):
        module.apply(variables, jnp.asarray(IDS), cache=llama.init_cache(module.config, 3, 9))


# --- SmolLM2-135M-Instruct (Q4_1 GGUF, 30 layers); both models from the same dequantized tensors ------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    """(jlora module, variables, transformers model, tokenizer, HF directory with vocab.json / merges.txt)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config, tensors, tokenizer = read_gguf(smollm2_gguf)
    directory = tmp_path_factory.mktemp("smollm2")
    (directory / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": None}))  # never stop early
    save_file(tensors, str(directory / "model.safetensors"))
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    module, variables = llama.from_tensors(hf_config, tensors)
    return module, variables, model, tokenizer, directory


@pytest.mark.reference
@pytest.mark.assets
def test_smollm2_logits_and_greedy_match_transformers(smollm2):
    import torch

    module, variables, model, tokenizer, _ = smollm2
    assert (module.config.num_hidden_layers, module.config.num_key_value_heads, module.config.vocab_size) == (
        30, 3, 49152)
    ids = np.array([tokenizer.encode("The capital of France is").ids], np.int32)
    want, got = hf_logits(model, ids), np.asarray(jax.jit(module.apply)(variables, jnp.asarray(ids)))
    print(f"SmolLM2 f32: max |logit diff| {np.abs(got - want).max():.2e} (|logits| <= {np.abs(want).max():.1f})")
    # float32 rounding over 30 layers (residual stream up to ~2e4): jlora is ~1.7e-4 from a float64 run of this
    # model, transformers ~6e-5, so ~1.5e-4 apart on a few prompts; 1e-4 is below what float32 on XLA:CPU reaches
    np.testing.assert_allclose(got, want, atol=2.5e-4, rtol=0)
    expected = model.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.ones(ids.shape, dtype=int),
                              max_new_tokens=NEW_TOKENS, do_sample=False).numpy()
    tokens = greedy(module, variables, ids)
    print("SmolLM2 greedy:", repr(tokenizer.decode(tokens[0, ids.shape[1]:].tolist())))
    np.testing.assert_array_equal(tokens, expected)


@pytest.mark.reference
@pytest.mark.assets
def test_smollm2_tokenizer_matches_gpt2_tokenizer_on_same_files(smollm2, smollm2_gguf):
    import gguf
    import transformers

    *_, tokenizer, directory = smollm2
    fields = gguf.GGUFReader(smollm2_gguf).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(fields["tokenizer.ggml.merges"].contents()))
    reference = transformers.GPT2TokenizerFast.from_pretrained(directory)
    for text in ["Hello world", "The capital of France is", " leading space,\ttabs\nand newlines",
                 "naïve café — 日本語 🤖", "don't you're we'll", "x = f(a, b) * 3.14 # 42"]:
        assert tokenizer.encode(text).ids == reference(text)["input_ids"], text
    assert tokenizer.encode("Hello world").tokens == ["Hello", "Ġworld"]
    # llama.cpp's "smollm" pre-tokenizer isolates digits first, so a run of spaces before a digit stays one token
    assert tokenizer.encode("a  1").tokens == ["a", "ĠĠ", "1"]
    assert reference.convert_ids_to_tokens(reference("a  1")["input_ids"]) == ["a", "Ġ", "Ġ", "1"]  # GPT-2's split
    assert tokenizer.encode("<|im_start|>user").ids[0] == 1  # control tokens stay whole

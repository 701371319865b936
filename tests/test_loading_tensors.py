"""Loaders match the checkpoint's tensors against the model config.json describes: tensors the model does not use
(more layers than the config says, unknown names, pretraining heads), tensors it lacks, tied heads that differ from
the embedding, and tensors stored in the wrong layout. Tiny models written with the safetensors numpy API (no torch).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import save_checkpoint
from safetensors.numpy import save_file

from jlora import models
from jlora.models import bert, gpt2, hf, llama
from jlora.paths import named_leaves

IDS = jnp.zeros((1, 3), jnp.int32)
# distinct dims everywhere: GPT-2 vocab 23, d 16, 2 heads, 3 layers; Llama vocab 29, hidden 16, mlp 24; BERT vocab 31
GPT2 = dict(model_type="gpt2", vocab_size=23, n_positions=16, n_embd=16, n_layer=3, n_head=2)
LLAMA = dict(model_type="llama", vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
BERT = dict(model_type="bert", vocab_size=31, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=24, max_position_embeddings=16)
GPT2_BLOCK_TENSORS = 12  # ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj: a weight and a bias each


def gpt2_tensors(**overrides):
    """{hf name: array} of a random tiny GPT-2 (Conv1D weights stored (in, out), as flax: no transpose)."""
    model = gpt2.GPT2LMHeadModel(gpt2.GPT2Config.from_hf({**GPT2, **overrides}))
    variables = model.init(jax.random.key(0), IDS)
    return {hf.default_key(p): np.asarray(x) for p, x in named_leaves(variables)}


def write(directory, config, tensors):
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def llama_dir(directory, **overrides):
    module = llama.Llama(llama.LlamaConfig.from_hf({**LLAMA, **overrides}))
    return save_checkpoint(directory, {**LLAMA, **overrides}, module.init(jax.random.key(1), IDS))


def assert_error_names(directory, *parts):
    """`gpt2.from_pretrained(directory)` raises a ValueError whose message holds every one of `parts`."""
    with pytest.raises(ValueError) as info:
        gpt2.from_pretrained(directory)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


def test_gpt2_weights_with_more_layers_than_the_config_is_an_error_or_with_strict_false_a_warning(tmp_path):
    tensors = gpt2_tensors()
    directory = write(tmp_path / "gpt2", {**GPT2, "n_layer": 2}, tensors)
    assert_error_names(directory, str(directory), f"{GPT2_BLOCK_TENSORS} tensors", "transformer.h.2.", "layers 0-2",
                       "n_layer=2", "strict=False")
    with pytest.warns(hf.UnusedTensorsWarning, match=rf"{GPT2_BLOCK_TENSORS} tensors.*transformer\.h\.2\."):
        model, variables = gpt2.from_pretrained(directory, strict=False)
    assert model.config.n_layer == 2
    loaded = {hf.default_key(p): x for p, x in named_leaves(variables)}
    assert sorted(loaded) == sorted(k for k in tensors if not k.startswith("transformer.h.2."))
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, tensors[key])


def test_llama_weights_with_more_layers_than_the_config_through_the_dispatcher(tmp_path):
    directory = llama_dir(tmp_path / "llama")
    (directory / "config.json").write_text(json.dumps({**LLAMA, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"18 tensors.*model\.layers\.1\..*layers 0-2.*num_hidden_layers=1"):
        models.from_pretrained(directory)
    with pytest.warns(hf.UnusedTensorsWarning, match=r"18 tensors.*model\.layers\.1\..*layers 0-2"):
        module, _ = models.from_pretrained(directory, strict=False)
    assert module.config.num_hidden_layers == 1


def test_missing_tensors_name_the_counts_and_the_layer_mismatch(tmp_path):
    directory = write(tmp_path / "gpt2", {**GPT2, "n_layer": 5}, gpt2_tensors())
    assert_error_names(directory, str(directory), f"{2 * GPT2_BLOCK_TENSORS} tensors", "missing", "transformer.h.3.",
                       "layers 0-2", "n_layer=5")
    with pytest.raises(ValueError, match="missing"):
        gpt2.from_pretrained(directory, strict=False)  # strict=False never excuses missing weights


def test_unknown_tensor_is_an_error_and_buffers_are_ignored(tmp_path):
    tensors = gpt2_tensors()
    buffers = {"transformer.h.0.attn.bias": np.tril(np.ones((1, 1, 16, 16), np.float32)),
               "transformer.h.1.attn.masked_bias": np.float32(-1e4) * np.ones((), np.float32)}
    _, variables = gpt2.from_pretrained(write(tmp_path / "buffers", GPT2, tensors | buffers))
    assert "bias" not in variables["params"]["transformer"]["h"]["0"]["attn"]  # the causal-mask buffer is no weight
    cross = {"transformer.h.0.crossattention.c_attn.weight": np.ones((16, 48), np.float32)}
    with pytest.raises(ValueError, match=r"1 tensors? .*crossattention\.c_attn\.weight.*strict=False"):
        gpt2.from_pretrained(write(tmp_path / "cross", GPT2, tensors | cross))


def test_tied_head_must_equal_the_embedding(tmp_path):
    tensors = gpt2_tensors()
    wte = tensors["transformer.wte.weight"]
    gpt2.from_pretrained(write(tmp_path / "same", GPT2, tensors | {"lm_head.weight": wte}))  # a tied copy: fine
    with pytest.raises(ValueError, match=r"tie_word_embeddings.*lm_head\.weight.*transformer\.wte\.weight"):
        gpt2.from_pretrained(write(tmp_path / "differs", GPT2, tensors | {"lm_head.weight": wte + 1}))

    module = llama.Llama(llama.LlamaConfig.from_hf({**LLAMA, "tie_word_embeddings": True}))
    flat = {hf.default_key(p): np.asarray(x.T if p.endswith("/kernel") else x)
            for p, x in named_leaves(module.init(jax.random.key(1), IDS))}
    head = flat["model.embed_tokens.weight"][::-1]
    with pytest.raises(ValueError, match=r"tie_word_embeddings.*lm_head\.weight"):
        llama.from_tensors({**LLAMA, "tie_word_embeddings": True}, flat | {"lm_head.weight": head}, source="x.gguf")


def test_llama_rotary_buffer_ignored_and_foreign_norm_rejected(tmp_path):
    directory = llama_dir(tmp_path / "llama")
    config = {**LLAMA}
    from safetensors.numpy import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(2, np.float32)}
    llama.from_tensors(config, tensors | inv_freq)  # an old transformers buffer, recomputed by the model
    qwen3 = {"model.layers.0.self_attn.q_norm.weight": np.ones(4, np.float32)}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight.*strict=False"):
        llama.from_tensors(config, tensors | qwen3, source="qwen3.gguf")


def test_bert_pretraining_heads_warn_and_unknown_tensors_fail(tmp_path):
    model = bert.BertModel(bert.BertConfig.from_hf(BERT))
    directory = save_checkpoint(tmp_path / "bert", BERT, model.init(jax.random.key(2), IDS))
    from safetensors.numpy import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    heads = {"cls.predictions.bias": np.zeros(31, np.float32),
             "cls.predictions.transform.dense.weight": np.ones((16, 16), np.float32),
             "cls.seq_relationship.weight": np.ones((2, 16), np.float32)}
    buffers = {"embeddings.position_ids": np.arange(16)[None]}
    write(directory, BERT, tensors | heads | buffers)
    with pytest.warns(hf.UnusedTensorsWarning, match=r"3 tensors.*cls\.predictions\.bias") as record:
        module, variables = bert.from_pretrained(directory)
    assert len(record) == 1 and "position_ids" not in str(record[0].message)
    assert isinstance(module, bert.BertModel)
    np.testing.assert_array_equal(variables["params"]["pooler"]["dense"]["bias"], tensors["pooler.dense.bias"])

    write(directory, BERT, tensors | {"encoder.layer.0.attention.self.distance_embedding.weight": np.ones((3, 2))})
    with pytest.raises(ValueError, match=r"distance_embedding.*strict=False"):
        bert.from_pretrained(directory)


def test_transposed_tensor_message_shows_the_stored_and_the_expected_shape(tmp_path):
    directory = llama_dir(tmp_path / "llama")
    from safetensors.numpy import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    key = "model.layers.0.mlp.gate_proj.weight"  # torch Linear (out 24, in 16); flax kernel (16, 24)
    assert tensors[key].shape == (24, 16)
    write(directory, LLAMA, tensors | {key: np.ascontiguousarray(tensors[key].T)})  # saved in flax layout
    with pytest.raises(ValueError) as info:
        llama.from_pretrained(directory)
    message = str(info.value)
    assert f"{key}: checkpoint (16, 24), model expects (24, 16)" in message, message
    assert "transposed" in message and "(16, 24) (transposed)" not in message

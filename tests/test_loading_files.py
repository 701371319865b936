"""Damaged Hugging Face directories: truncated or garbage safetensors, malformed config.json, broken sharded indexes.
Each is a ValueError naming the file and what is wrong (a missing file stays a FileNotFoundError)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jlora import models
from jlora.models import bert, gpt2, hf, llama
from jlora.paths import named_leaves

GPT2 = dict(model_type="gpt2", vocab_size=23, n_positions=16, n_embd=16, n_layer=1, n_head=2)


@pytest.fixture
def gpt2_dir(tmp_path):
    """A tiny 1-layer GPT-2 directory (config.json + model.safetensors), written without torch."""
    model = gpt2.GPT2LMHeadModel(gpt2.GPT2Config.from_hf(GPT2))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
    tensors = {hf.default_key(p): np.asarray(x) for p, x in named_leaves(variables)}
    directory = tmp_path / "gpt2"
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(GPT2))
    return directory


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_name_the_file(gpt2_dir, damage):
    file = gpt2_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"<html>404 Not Found</html>" * 9,
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match=re.escape(str(file))) as info:
        gpt2.from_pretrained(gpt2_dir)
    assert "not a readable safetensors file" in str(info.value) and "download" in str(info.value)


@pytest.mark.parametrize("text, what", [("{model_type: gpt2", "not valid JSON"), ("[1, 2]", "not a JSON object"),
                                        ("", "not valid JSON")])
def test_malformed_config_names_the_file(gpt2_dir, text, what):
    (gpt2_dir / "config.json").write_text(text)
    for load in (gpt2.from_pretrained, models.from_pretrained):
        with pytest.raises(ValueError, match=re.escape(str(gpt2_dir / "config.json"))) as info:
            load(gpt2_dir)
        assert what in str(info.value)


def test_config_missing_keys_or_wrong_types_name_the_file_and_key(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    save_file({"model.embed_tokens.weight": np.zeros((29, 16), np.float32)}, str(directory / "model.safetensors"))
    config = dict(model_type="llama", vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                  num_attention_heads=4)
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match=r"config\.json.*'hidden_size'"):
        llama.from_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": "16"}))
    with pytest.raises(ValueError, match=r"config\.json.*hidden_size.*'16'"):
        bert.from_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"hidden_size": 16}))
    with pytest.raises(ValueError, match=r"config\.json has no model_type"):
        models.from_pretrained(directory)


def test_sharded_index_without_weight_map_or_with_missing_shards(gpt2_dir):
    (gpt2_dir / "model.safetensors").rename(gpt2_dir / "model-00001-of-00001.safetensors")
    index = gpt2_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1}}))
    with pytest.raises(ValueError, match=re.escape(str(index)) + r".*weight_map"):
        gpt2.from_pretrained(gpt2_dir)
    index.write_text('{"weight_map": ')
    with pytest.raises(ValueError, match=re.escape(str(index)) + r".*not valid JSON"):
        gpt2.from_pretrained(gpt2_dir)
    index.write_text(json.dumps({"weight_map": ["model-00001-of-00001.safetensors"]}))
    with pytest.raises(ValueError, match=re.escape(str(index)) + r".*weight_map.*tensor name.*shard file"):
        gpt2.from_pretrained(gpt2_dir)
    weight_map = {"transformer.wte.weight": "model-00001-of-00001.safetensors",
                  "transformer.wpe.weight": "model-00002-of-00002.safetensors"}
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match=re.escape(str(index)) + r".*model-00002-of-00002\.safetensors"):
        gpt2.from_pretrained(gpt2_dir)
    weight_map = {"transformer.wte.weight": "model-00001-of-00001.safetensors",
                  "transformer.h.7.attn.c_attn.weight": "model-00001-of-00001.safetensors"}
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"transformer\.h\.7\.attn\.c_attn\.weight.*model-00001-of-00001"):
        gpt2.from_pretrained(gpt2_dir)
    index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "model-00001-of-00001.safetensors"}}))
    _, variables = gpt2.from_pretrained(gpt2_dir)  # the index lists a subset: the shard is read whole
    assert variables["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].shape == (16, 48)

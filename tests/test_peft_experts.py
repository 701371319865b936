"""PEFT `target_parameters` files of expert adapters: the round trip, the key layout PEFT nests, and the errors for
a file or an adapter PEFT's ParamWrapper cannot hold (no torch; test_mixtral checks the layout against PEFT)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb
from safetensors.numpy import load_file, save_file

import jlora
from jlora.interop import load_peft, save_peft

E, H, INTER, R = 3, 8, 5, 2
SIZES = jnp.array([2, 3, 1], jnp.int32)
X = jax.random.normal(jax.random.key(0), (6, H))


def _variables(names=("gate_up_proj", "down_proj")):
    shapes = {"gate_up_proj": (E, 2 * INTER, H), "down_proj": (E, H, INTER), "w1": (E, 2 * INTER, H),
              "w2": (E, H, INTER)}
    keys = jax.random.split(jax.random.key(1), len(names))
    experts = {n: jax.random.normal(k, shapes[n]) * 0.3 for n, k in zip(names, keys)}
    return {"params": {"model": {"experts": experts, "proj": {"kernel": jax.random.normal(keys[0], (H, H))}}}}


def _fn(params, x, sizes, up="gate_up_proj", down="down_proj"):
    p = params["params"]["model"]
    gate_up = jax.lax.ragged_dot(x @ p["proj"]["kernel"], jnp.swapaxes(p["experts"][up], 1, 2), sizes)
    return jax.lax.ragged_dot(jax.nn.silu(gate_up[:, :INTER]) * gate_up[:, INTER:],
                              jnp.swapaxes(p["experts"][down], 1, 2), sizes)


def _saved(tmp_path, config=None, variables=None, fn=_fn):
    variables = variables or _variables()
    config = config or jlora.LoraConfig(rank=R, alpha=4.0, targets=("experts", "proj"))
    lora = jlora.lora_transform(fn, config, strict=True)
    _, adapters = lora.init(variables, X, SIZES, key=jax.random.key(2))
    adapters = perturb(adapters)
    return save_peft(tmp_path / "peft", adapters, config, base_model_name_or_path="toy"), variables, adapters, lora


def test_round_trip_and_peft_key_layout(tmp_path):
    """gate_up_proj is PEFT's inner wrapper (`base_layer.` in its keys), down_proj the outer; A (E*r, in) is
    expert-major, B (out, E*r) expert-minor."""
    directory, variables, adapters, lora = _saved(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    pair = adapters["params"]["model"]["experts"]["gate_up_proj"]
    a_peft = tensors["base_model.model.model.experts.base_layer.lora_A.weight"]
    b_peft = tensors["base_model.model.model.experts.base_layer.lora_B.weight"]
    assert a_peft.shape == (E * R, H) and b_peft.shape == (2 * INTER, R * E)
    np.testing.assert_array_equal(a_peft[1 * R + 0], pair["lora_b"][1, 0])  # expert 1, rank 0
    np.testing.assert_array_equal(b_peft[:, 0 * E + 1], pair["lora_a"][1, :, 0])
    assert tensors["base_model.model.model.experts.lora_A.weight"].shape == (E * R, INTER)  # down_proj
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["model.experts.down_proj", "model.experts.gate_up_proj"]
    back, back_config = load_peft(directory, variables)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)
    frozen = jlora.split(variables, back_config)[0]
    np.testing.assert_allclose(jlora.lora_transform(_fn, back_config).apply(frozen, back, X, SIZES),
                               lora.apply(frozen, adapters, X, SIZES), atol=1e-6)


def test_missing_expert_tensors_are_an_error_or_a_warning(tmp_path):
    """A targeted expert parameter without tensors would stay untrained: strict refuses, strict=False warns."""
    directory, variables, _, _ = _saved(tmp_path)
    file = directory / "adapter_model.safetensors"
    tensors = {k: np.asarray(v) for k, v in load_file(file).items() if ".base_layer.lora_" not in k}
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 module\(s\).*model\.experts\.gate_up_proj"):
        load_peft(directory, variables)
    with pytest.warns(UserWarning, match=r"model\.experts\.gate_up_proj"):
        adapters, _ = load_peft(directory, variables, strict=False)
    assert set(adapters["params"]["model"]["experts"]) == {"down_proj"}


def test_a_tensor_of_another_rank_is_named(tmp_path):
    directory, variables, _, _ = _saved(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match=r"experts\.lora_A\.weight \(6, 5\).*rank 3 per expert.*lora_A \(9, 5\)"):
        load_peft(directory, variables)


def test_target_parameters_that_name_no_expert_tensor(tmp_path):
    directory, variables, _, _ = _saved(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "target_parameters": ["experts.up"]}))
    with pytest.raises(ValueError, match=r"target_parameters \['experts.up'\] match no parameter"):
        load_peft(directory, variables)
    (directory / "adapter_config.json").write_text(json.dumps({**config, "target_parameters": ["proj.kernel"]}))
    with pytest.raises(ValueError, match=r"names model\.proj\.kernel .*3-D expert tensors"):
        load_peft(directory, variables)


def test_two_targeted_parameters_of_unknown_order_refuse_to_export(tmp_path):
    """PEFT nests the wrappers in the torch module's registration order, which jlora cannot know for w1 / w2."""
    variables = _variables(("w1", "w2"))
    with pytest.raises(ValueError, match=r"\['w1', 'w2'\].*registers them.*target one parameter"):
        _saved(tmp_path, variables=variables, fn=lambda p, x, s: _fn(p, x, s, up="w1", down="w2"))

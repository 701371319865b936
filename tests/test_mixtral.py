"""jlora.models.mixtral against transformers' MixtralForCausalLM, and its expert adapters against PEFT's
`target_parameters` (ParamWrapper), both ways, on one tiny random model built in-process (float32).

    python -m pytest -q tests/test_mixtral.py
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb, save_checkpoint

import jlora
from jlora import models
from jlora.interop import load_peft, save_peft
from jlora.models import mixtral

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.reference

HF = dict(vocab_size=61, hidden_size=24, intermediate_size=11, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=64)
IDS = np.random.RandomState(0).randint(0, 61, (2, 9))
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture(scope="module")
def pair():
    """(torch model, its state dict as numpy, jlora module, variables): random weights of std 0.3, so the router's
    choices and the logits (up to ~6) depend on every tensor."""
    config = transformers.MixtralConfig(**HF, experts_implementation="eager")  # grouped_mm needs 16-byte strides
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    module, variables = mixtral.from_tensors(config.to_dict(), state)
    return model, state, module, variables


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _fresh(state):
    config = transformers.MixtralConfig(**HF, experts_implementation="eager")
    model = transformers.MixtralForCausalLM(config).eval()
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    return model


def test_logits_equal_transformers(pair, tmp_path):
    """Also through models.from_pretrained on a saved directory (model_type "mixtral"); parity figure: max |diff|."""
    model, _, module, variables = pair
    want = _torch_logits(model)
    got = module.apply(variables, jnp.asarray(IDS))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert _shapes(variables)["params"]["model"]["layers"]["0"]["mlp"] == {
        "gate": {"kernel": (24, 5)}, "experts": {"gate_up_proj": (5, 22, 24), "down_proj": (5, 24, 11)}}
    config = {**transformers.MixtralConfig(**HF).to_dict(), "model_type": "mixtral"}
    loaded, loaded_vars = models.from_pretrained(save_checkpoint(tmp_path / "m", config, variables))
    assert isinstance(loaded, models.Mixtral)
    np.testing.assert_allclose(loaded.apply(loaded_vars, jnp.asarray(IDS)), want, atol=1e-5, rtol=1e-5)


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def test_peft_target_parameters_load_into_jlora(pair, tmp_path):
    """PEFT's ParamWrapper adapters (random A and B, rank 3 per expert) read by load_peft give PEFT's logits."""
    model, state, module, variables = pair
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"], target_parameters=TARGETS,
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(_fresh(state), config).eval()
    want = _torch_logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    adapters, jconfig = load_peft(tmp_path, variables)
    assert _shapes(adapters)["params"]["model"]["layers"]["1"]["mlp"]["experts"] == {
        "gate_up_proj": {"lora_a": (5, 22, 3), "lora_b": (5, 3, 24)},
        "down_proj": {"lora_a": (5, 24, 3), "lora_b": (5, 3, 11)}}
    lora = jlora.lora_transform(module.apply, jconfig, strict=True)
    frozen = jlora.split(variables, jconfig)[0]
    got = lora.apply(frozen, adapters, jnp.asarray(IDS))
    assert np.abs(want - _torch_logits(model)).max() > 0.1  # the adapters change the logits
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    merged = module.apply(jlora.merge(frozen, adapters, jconfig), jnp.asarray(IDS))
    np.testing.assert_allclose(merged, want, atol=1e-5, rtol=1e-5)


def test_jlora_expert_adapters_load_into_peft(pair, tmp_path):
    """save_peft writes target_parameters (rank_pattern per parameter) that PeftModel.from_pretrained loads to the
    same logits; load_peft reads them back exactly."""
    _, state, module, variables = pair
    config = jlora.LoraConfig(rank=3, alpha=6, targets=("q_proj", "experts"), rank_pattern={"down_proj": 2})
    lora = jlora.lora_transform(module.apply, config, strict=True)
    frozen, adapters = lora.init(variables, jnp.asarray(IDS), key=jax.random.key(0))
    adapters = perturb(adapters, scale=0.1)  # lora_b non-zero; deltas of the size of the weights
    save_peft(tmp_path / "a", adapters, config, base_model_name_or_path="tiny-mixtral")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                            for p in ("down_proj", "gate_up_proj")]
    assert written["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"):  # PEFT 0.21 warns, yet applies them
        peft_model = peft.PeftModel.from_pretrained(_fresh(state), tmp_path / "a").eval()
    assert peft_model.base_model.model.model.layers[0].mlp.experts.lora_A["default"].weight.shape == (5 * 2, 11)
    np.testing.assert_allclose(lora.apply(frozen, adapters, jnp.asarray(IDS)), _torch_logits(peft_model),
                               atol=1e-5, rtol=1e-5)
    back, back_config = load_peft(tmp_path / "a", variables)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)
    assert back_config.rank_for("params/model/layers/0/mlp/experts/down_proj") == 2

"""load_peft's coverage checks and refusals against PEFT itself: which modules PEFT adapts, what PEFT does with a
missing or unexpected tensor, and PiSSA / OLoRA adapters, unconverted and converted.

    python -m pytest -q tests/test_interop_peft_torch.py

Uses the tiny torch / jax model pair of test_interop_peft.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_interop_peft import (
    ALPHA,
    TOL,
    Q,
    R,
    _perturb_torch,
    jax_tiny,
    tiny_inputs,
    tiny_variables,
    torch_forward,
    torch_tiny,
)

import jlora
from jlora.interop import load_peft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.reference


# --- what PEFT adapts, and what it does with missing / unexpected tensors -------------------------------------------


KEYS = ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query", "encoder.layer.0.output.dense",
        "model.layers.3.mlp.experts.1.down_proj", "model.layers.12.self_attn.q_proj", "classifier", "vision.conv",
        "transformer.h.0.attn.c_attn", "score", "lm_head"]
SELECTIONS = [
    dict(target_modules=["query", "dense"]), dict(target_modules=["query"], modules_to_save=["classifier", "output"]),
    dict(target_modules=["query", "down_proj", "q_proj"], layers_to_transform=[1, 3]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=12, layers_pattern="layers"),
    dict(target_modules=["query", "down_proj"], layers_to_transform=[0, 1], layers_pattern=["layer", "experts"]),
    dict(target_modules=r".*(query|c_attn|conv)"),
    dict(target_modules=["query", "c_attn"], exclude_modules=["h.0.attn.c_attn"]),
    dict(target_modules=["query", "q_proj"], exclude_modules=r".*\.1\..*"),
    dict(target_modules=["classifier", "score"]),
]


@pytest.mark.parametrize("selection", SELECTIONS)
def test_target_matching_agrees_with_peft(selection):
    """jlora.interop.coverage.peft_targeted against PEFT's own check_target_module_exists."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from jlora.interop.coverage import peft_targeted

    config = peft.LoraConfig(**selection)
    ours = [k for k in KEYS if peft_targeted({"modules_to_save": None, **selection}, k)]
    theirs = [k for k in KEYS if check_target_module_exists(config, k)]
    assert ours == theirs and 0 < len(ours) < len(KEYS)


def test_missing_and_unexpected_tensors_like_peft(tmp_path):
    """PEFT warns about missing adapter keys and ignores unexpected ones; load_peft refuses both, and with
    strict=False warns and gives PEFT's outputs (the missing module unadapted, the unexpected tensors unused)."""
    variables, (ids, img) = tiny_variables(), tiny_inputs()
    model = _perturb_torch(peft.get_peft_model(torch_tiny(variables), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["query", "value"])))
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = safetensors_torch.load_file(file)
    query = "base_model.model.encoder.layer.0.attention.self.query"
    dense = "base_model.model.encoder.layer.0.output.dense"
    tensors = {k: v for k, v in tensors.items() if not k.startswith(query)}
    tensors.update({f"{dense}.lora_A.weight": torch.randn(R, Q), f"{dense}.lora_B.weight": torch.randn(Q, R)})
    safetensors_torch.save_file(tensors, file)
    (tmp_path / "README.md").unlink()

    with pytest.warns(UserWarning, match="Found missing adapter keys.*attention.self.query.lora_A"):
        want = torch_forward(peft.PeftModel.from_pretrained(torch_tiny(variables), str(tmp_path)).eval(), ids, img)
    with pytest.raises(ValueError, match=r"attention.self.query.*output.dense.*target_modules does not cover"):
        load_peft(tmp_path, variables)
    with pytest.warns(UserWarning, match="strict=False: loaded the rest"):
        adapters, config = load_peft(tmp_path, variables, strict=False)
    frozen, _ = jlora.split(variables, config)
    got = np.asarray(jlora.lora_transform(jax_tiny, config, strict=True).apply(frozen, adapters, ids, img))
    assert np.abs(want - torch_forward(torch_tiny(variables), ids, img)).max() > 1e-2  # value's adapter matters
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_load_unconverted_and_converted(init, tmp_path):
    """PiSSA / OLoRA rewrite the base weights in PEFT: load_peft rebuilds the initial factors from the original base
    and loads the unconverted adapter as the rank-2r plain LoRA [A | A0] [B ; -B0], with the PEFT model's outputs;
    converted by PEFT (path_initial_model_for_weight_conversion) it loads too, with the same outputs."""
    variables, (ids, img) = tiny_variables(), tiny_inputs()
    model = peft.get_peft_model(torch_tiny(variables), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["query", "value"], init_lora_weights=init))
    init_dir = tmp_path / "init"
    model.peft_config["default"].init_lora_weights = True  # PEFT's conversion recipe
    model.save_pretrained(init_dir)
    model.peft_config["default"].init_lora_weights = init
    model = _perturb_torch(model)
    want = torch_forward(model, ids, img)  # on PEFT's rewritten base
    assert np.abs(want - torch_forward(torch_tiny(variables), ids, img)).max() > 1e-2
    model.save_pretrained(tmp_path / "raw")  # init_lora_weights=init: PEFT re-runs the init on load
    model.peft_config["default"].init_lora_weights = True  # else PEFT warns, loading the initial adapter beside it
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(init_dir))
    for readme in tmp_path.glob("*/README.md"):
        readme.unlink()
    for name in ("raw", "lora"):
        adapters, config = load_peft(tmp_path / name, variables)
        query = "params/encoder/layer/0/attention/self/query/kernel"
        assert config.rank_for(query) == 2 * R and config.init == "loralib", name
        got = np.asarray(jlora.lora_transform(jax_tiny, config, strict=True).apply(variables, adapters, ids, img))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)

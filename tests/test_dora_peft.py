"""DoRA (`LoraConfig(dora=True)`) against PEFT's `use_dora=True` on the tiny torch / jax model pair of
test_interop_peft (an embedding, two Linears, a Conv2d, all of distinct dims): PEFT's initial magnitudes, outputs,
gradients of lora_A, lora_B and the magnitude, merge, and save_peft / load_peft both ways.

    python -m pytest -q tests/test_dora_peft.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_interop_peft import (
    ALPHA,
    TARGETS,
    TOL,
    R,
    assert_trees_equal,
    jax_tiny,
    tiny_inputs,
    tiny_variables,
    torch_forward,
    torch_tiny,
)
from torch_oracles import to_np, to_torch

import jlora
from jlora.interop import load_peft, save_peft
from jlora.models.hf import default_key

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.reference,
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

CONFIG = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=TARGETS, dora=True, rank_pattern={"value": 6})


def _peft_model(variables, seed=0):
    """PEFT's DoRA model on the same weights, every trainable tensor moved (lora_B non-zero, magnitude != norm),
    and its initial magnitudes."""
    model = peft.get_peft_model(torch_tiny(variables), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), use_dora=True, rank_pattern={"value": 6}))
    initial = _magnitudes(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(param + 0.3 * torch.randn(param.shape, generator=gen))
    return model.eval(), initial


def _magnitudes(model) -> dict[str, np.ndarray]:
    return {k.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector.default.weight"): to_np(v).copy()
            for k, v in model.named_parameters() if "lora_magnitude_vector" in k}


def test_peft_dora_outputs_gradients_and_round_trip(tmp_path):
    """jlora's initial magnitudes are PEFT's. PEFT save_pretrained -> load_peft: lora.apply (eager and jit) gives
    PEFT's outputs, and the gradients of lora_a, lora_b and magnitude equal PEFT's of lora_A, lora_B and
    lora_magnitude_vector (f32, 1e-5); save_peft writes files PEFT loads to the same outputs, and load_peft reads
    them back exactly; PEFT's merge_and_unload equals jlora.merge."""
    variables, (ids, img) = tiny_variables(), tiny_inputs()
    model, initial = _peft_model(variables)
    lora = jlora.lora_transform(jax_tiny, CONFIG, strict=True)
    _, fresh = lora.init(variables, ids, img, key=jax.random.key(0))
    fresh = jlora.paths.flatten_adapters(fresh)[0]
    assert len(fresh) == len(initial) == 4  # m = ||W|| per output unit: Linear columns, embedding dims, conv channels
    for path, pair in fresh.items():
        want = initial[default_key(path).removesuffix(".weight")].reshape(-1)
        np.testing.assert_allclose(np.asarray(pair["magnitude"]).reshape(-1), want, err_msg=path, **TOL)
    model.save_pretrained(tmp_path / "peft")
    adapters, config = load_peft(tmp_path / "peft", variables)
    assert config.dora and config.rank_for("params/encoder/layer/0/attention/self/value/kernel") == 6
    lora = jlora.lora_transform(jax_tiny, config, strict=True)
    frozen, _ = jlora.split(variables, config)

    out = torch.from_numpy(np.array(jax.random.normal(jax.random.key(5), (ids.shape[0], 3)))).float()
    model.zero_grad()
    y = model(torch.from_numpy(np.asarray(ids, np.int64)), to_torch(img).permute(0, 3, 1, 2))
    (y * out).sum().backward()
    got = lora.apply(frozen, adapters, ids, img)
    np.testing.assert_allclose(np.asarray(got), to_np(y.detach()), **TOL)
    np.testing.assert_allclose(np.asarray(jax.jit(lora.apply)(frozen, adapters, ids, img)), to_np(y.detach()), **TOL)

    grads = jax.grad(lambda ad: jnp.sum(lora.apply(frozen, ad, ids, img) * jnp.asarray(out.numpy())))(adapters)
    params = dict(model.named_parameters())
    for path, g in jlora.paths.flatten_adapters(grads)[0].items():
        module = "base_model.model." + default_key(path).removesuffix(".weight")
        embed = path.endswith("embedding")
        ta = params[f"{module}.lora_embedding_A.default" if embed else f"{module}.lora_A.default.weight"].grad
        tb = params[f"{module}.lora_embedding_B.default" if embed else f"{module}.lora_B.default.weight"].grad
        tm = params[f"{module}.lora_magnitude_vector.default.weight"].grad
        ta = to_np(ta).T if embed else np.transpose(to_np(ta), (*range(2, ta.ndim), 1, 0))
        tb = to_np(tb).T if embed else to_np(tb).reshape(tb.shape[:2]).T
        np.testing.assert_allclose(np.asarray(g["lora_a"]), ta, err_msg=path, **TOL)
        np.testing.assert_allclose(np.asarray(g["lora_b"]), tb, err_msg=path, **TOL)
        np.testing.assert_allclose(np.asarray(g["magnitude"]).reshape(-1), to_np(tm).reshape(-1), err_msg=path,
                                   **TOL)
        assert np.abs(np.asarray(g["magnitude"])).max() > 1e-4  # the magnitude is trained

    save_peft(tmp_path / "again", adapters, config, base_model_name_or_path="tiny", variables=frozen)
    again = peft.PeftModel.from_pretrained(torch_tiny(variables), str(tmp_path / "again")).eval()
    np.testing.assert_allclose(torch_forward(again, ids, img), to_np(y.detach()), **TOL)
    reloaded, reloaded_config = load_peft(tmp_path / "again", variables)
    assert_trees_equal(reloaded, adapters)
    assert reloaded_config.dora

    merged = jlora.merge(frozen, adapters, config)
    unloaded = model.merge_and_unload()
    np.testing.assert_allclose(np.asarray(jax_tiny(merged, ids, img)), torch_forward(unloaded, ids, img), **TOL)
    state = {k: to_np(v) for k, v in unloaded.state_dict().items()}
    w = np.asarray(merged["params"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"])
    np.testing.assert_allclose(w.T, state["encoder.layer.0.attention.self.query.weight"], **TOL)

"""PiSSA / OLoRA against PEFT: the same weights give the same initial products A·B, the same residual base and the
same outputs; adapters saved by `save_peft` (unconverted, or converted to a plain LoRA) load in PEFT with jlora's
outputs. Products are compared, not factors: singular vectors (and QR columns) are defined up to sign."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

import jlora
from jlora.interop import save_peft
from jlora.variants.convert import convert_to_plain_lora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.reference

IN, OUT, R, ALPHA, BATCH = 11, 19, 7, 3.0, 5
SCALE = ALPHA / R


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(OUT, name="q")(x)


class TorchNet(torch.nn.Module):
    def __init__(self, kernel, bias):
        super().__init__()
        self.q = torch.nn.Linear(IN, OUT)
        with torch.no_grad():
            self.q.weight.copy_(torch.from_numpy(np.array(kernel).T))
            self.q.bias.copy_(torch.from_numpy(np.array(bias)))

    def forward(self, x):
        return self.q(x)


def _weights(decay: bool = False):
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((IN, OUT)).astype(np.float32)
    if decay:  # a spectrum falling by 2x per direction: the randomized SVD converges
        u, _, vh = np.linalg.svd(kernel, full_matrices=False)
        kernel = ((u * 2.0 ** -np.arange(IN)) @ vh).astype(np.float32)
    bias = rng.standard_normal(OUT).astype(np.float32)
    return {"params": {"q": {"kernel": kernel, "bias": bias}}}


X = np.random.default_rng(1).standard_normal((BATCH, IN)).astype(np.float32)


def _peft(variables, init):
    model = TorchNet(variables["params"]["q"]["kernel"], variables["params"]["q"]["bias"])
    return peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q"],
                                                      init_lora_weights=init)).eval()


def _torch_out(model, x=X):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_matches_peft(init):
    variables = _weights()
    model = _peft(variables, init)
    layer = model.base_model.model.q
    peft_ab = SCALE * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy().T
    peft_residual = layer.base_layer.weight.detach().numpy().T
    lora = jlora.lora_transform(Net().apply, jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("q",), init=init))
    frozen, adapters = lora.init(variables, X, key=jax.random.key(0))
    pair = adapters["params"]["q"]["kernel"]
    np.testing.assert_allclose(SCALE * pair["lora_a"] @ pair["lora_b"], peft_ab, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(frozen["params"]["q"]["kernel"], peft_residual, rtol=1e-5, atol=1e-5)
    if init == "olora":  # the factors themselves, up to the sign of each direction
        b_peft = layer.lora_B["default"].weight.detach().numpy().T  # (r, out): Q_r^T
        np.testing.assert_allclose(np.abs(pair["lora_b"]), np.abs(b_peft), rtol=1e-4, atol=1e-5)
    want = _torch_out(model)
    for apply in (lora.apply, jax.jit(lora.apply)):
        np.testing.assert_allclose(apply(frozen, adapters, X), want, rtol=1e-5, atol=1e-5)


def test_pissa_niter_matches_peft_closely():
    """Both draw their own random sketch: on a decaying spectrum both products approach the exact rank-r SVD."""
    variables = _weights(decay=True)
    layer = _peft(variables, "pissa_niter_4").base_model.model.q
    peft_ab = SCALE * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy().T
    lora = jlora.lora_transform(Net().apply, jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("q",),
                                                              init="pissa_niter_4"))
    _, adapters = lora.init(variables, X, key=jax.random.key(0))
    pair = adapters["params"]["q"]["kernel"]
    w = variables["params"]["q"]["kernel"]
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    exact = (u[:, :R] * s[:R]) @ vh[:R]
    ours = SCALE * np.asarray(pair["lora_a"] @ pair["lora_b"])
    assert np.abs(ours - exact).max() < 1e-3 * s[0] and np.abs(peft_ab - exact).max() < 1e-3 * s[0]
    np.testing.assert_allclose(ours, peft_ab, atol=2e-3 * s[0])


def _trained(init):
    variables = _weights()
    config = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("q",), init=init)
    lora = jlora.lora_transform(Net().apply, config)
    frozen, initial = lora.init(variables, X, key=jax.random.key(0))
    rng = np.random.default_rng(2)
    trained = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32), initial)
    return variables, config, frozen, initial, trained, np.asarray(lora.apply(frozen, trained, X))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_save_peft_unconverted_loads_in_peft(init, tmp_path):
    """save_peft writes init_lora_weights=init: PEFT re-runs the init on the original base, then loads A, B."""
    variables, config, _, _, trained, want = _trained(init)
    save_peft(tmp_path / "a", trained, config, base_model_name_or_path="tiny")
    base = TorchNet(variables["params"]["q"]["kernel"], variables["params"]["q"]["bias"])
    assert np.abs(want - _torch_out(base)).max() > 1e-2
    got = _torch_out(peft.PeftModel.from_pretrained(base, tmp_path / "a").eval())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    adapters, back = jlora.interop.load_peft(tmp_path / "a", variables)  # round trip: the rank-2r plain LoRA
    np.testing.assert_allclose(jlora.lora_transform(Net().apply, back).apply(variables, adapters, X), want,
                               rtol=1e-5, atol=1e-5)


def test_converted_adapters_load_in_peft_as_plain_lora(tmp_path):
    variables, config, _, initial, trained, want = _trained("pissa_niter_2")
    plain, plain_config = convert_to_plain_lora(trained, initial, config)
    save_peft(tmp_path / "a", plain, plain_config, base_model_name_or_path="tiny")
    base = TorchNet(variables["params"]["q"]["kernel"], variables["params"]["q"]["bias"])
    got = _torch_out(peft.PeftModel.from_pretrained(base, tmp_path / "a").eval())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

"""jlora.interop.loralib against microsoft/LoRA's loralib: a state dict loralib writes loads into jlora with the same
outputs, and jlora's export loads back into loralib.

    python -m pytest -q tests/test_interop_loralib.py

The torch side is a GPT-2-like block with loralib layers at GPT-2's module names: a `MergedLinear` c_attn on q and v
(enable_lora [True, False, True], fan_in_fan_out, as the E2E recipe), a `Linear` c_fc and an `Embedding` wte. The jax
side is a plain function of a params tree with the same paths. loralib merges W in place on `eval()`, so its
outputs are taken in `train()` mode with lora_dropout 0 (and once merged, to check against that too).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from torch_oracles import container, to_np, to_torch

import jlora
from jlora.interop import load_loralib, save_loralib, to_loralib
from jlora.models.hf import default_key
from jlora.paths import named_leaves

torch = pytest.importorskip("torch")
loralib = pytest.importorskip("loralib")

pytestmark = pytest.mark.reference

D, FC, VOCAB, BATCH, SEQ, R, ALPHA = 12, 10, 17, 3, 5, 4, 32
ENABLE = (True, False, True)
TOL = dict(rtol=1e-5, atol=1e-5)



class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        attn = container(c_attn=loralib.MergedLinear(D, 3 * D, r=R, lora_alpha=ALPHA, enable_lora=list(ENABLE),
                                                      fan_in_fan_out=True))
        mlp = container(c_fc=loralib.Linear(D, FC, r=R, lora_alpha=ALPHA, fan_in_fan_out=True))
        self.transformer = container(wte=loralib.Embedding(VOCAB, D, r=R, lora_alpha=ALPHA),
                                      h=torch.nn.ModuleList([container(attn=attn, mlp=mlp)]))

    def forward(self, ids):  # ids (batch, seq) -> (batch, seq, FC)
        block = self.transformer.h[0]
        qkv = block.attn.c_attn(self.transformer.wte(ids))
        q, k, v = qkv.split(D, -1)
        return block.mlp.c_fc(torch.tanh(q * v + k))


def jax_block(variables, ids):
    t = variables["params"]["transformer"]
    block = t["h"]["0"]
    x = jnp.take(t["wte"]["embedding"], ids, axis=0)
    qkv = x @ block["attn"]["c_attn"]["kernel"] + block["attn"]["c_attn"]["bias"]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    return jnp.tanh(q * v + k) @ block["mlp"]["c_fc"]["kernel"] + block["mlp"]["c_fc"]["bias"]


def _variables(model) -> dict:
    """The torch block's base weights as flax variables (fan_in_fan_out weights are already (in, out))."""
    block = model.transformer.h[0]
    leaf = lambda layer: {"kernel": jnp.asarray(to_np(layer.weight)), "bias": jnp.asarray(to_np(layer.bias))}  # noqa: E731
    return {"params": {"transformer": {
        "wte": {"embedding": jnp.asarray(to_np(model.transformer.wte.weight))},
        "h": {"0": {"attn": {"c_attn": leaf(block.attn.c_attn)}, "mlp": {"c_fc": leaf(block.mlp.c_fc)}}}}}}


def _trained(seed=0, *, biases=True):
    """(torch block with random non-zero lora_A / lora_B (and changed biases if `biases`), the flax variables of
    its base weights before the change)."""
    torch.manual_seed(seed)
    model = TorchBlock()
    variables = _variables(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or (biases and name.endswith("bias")):  # O(1) outputs: 1e-5 is float32 rounding
                p.copy_(torch.randn(p.shape) * (D**-0.5 if "lora_A" in name else 0.1))
    return model.train(), variables


def _ids(seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ))


def _torch_out(model, ids):
    with torch.no_grad():
        return to_np(model(torch.from_numpy(ids)))


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_loralib_state_dict_loads_and_exports(bias, tmp_path):
    model, variables = _trained(biases=bias != "none")
    ids = _ids()
    want = _torch_out(model, ids)  # train() mode, lora_dropout 0: unmerged
    state = loralib.lora_state_dict(model, bias=bias)
    assert set(state) >= {"transformer.h.0.attn.c_attn.lora_A", "transformer.h.0.attn.c_attn.lora_B"}
    assert tuple(state["transformer.h.0.attn.c_attn.lora_A"].shape) == (2 * R, D)
    assert tuple(state["transformer.h.0.attn.c_attn.lora_B"].shape) == (2 * D, R)

    # the E2E checkpoints' wrapping, read from a path
    torch.save({"model_state_dict": state}, tmp_path / "e2e.pt")
    adapters, config = load_loralib(tmp_path / "e2e.pt", variables, rank=R, alpha=ALPHA, enable_lora=ENABLE,
                                    bias=bias)
    kernel = adapters["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert kernel["lora_a"].shape == (D, 2 * R) and kernel["lora_b"].shape == (R, 2 * D)
    c_attn = "params/transformer/h/0/attn/c_attn/kernel"
    assert config.fused_for(c_attn) == ENABLE and config.scale_for(c_attn) == ALPHA / R
    lora = jlora.lora_transform(jax_block, config, strict=True)
    frozen, _ = jlora.split(variables, config)
    got = np.asarray(lora.apply(frozen, adapters, jnp.asarray(ids, jnp.int32)))
    base = np.asarray(jax_block(variables, jnp.asarray(ids, jnp.int32)))
    assert np.abs(want - base).max() > 1e-1
    print(f"bias={bias}: loralib -> jlora max |diff| {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, **TOL)
    merged = _torch_out(model.eval(), ids)  # loralib merges into W on eval()
    np.testing.assert_allclose(got, merged, **TOL)

    # export: exactly loralib's tensors, and a fresh loralib block loading them gives the same outputs
    exported = to_loralib(adapters, config)
    assert sorted(exported) == sorted(state)
    for k, v in exported.items():
        assert np.array_equal(v, to_np(state[k])), k
    fresh = TorchBlock()  # the base weights from `variables` (model's W is merged now)
    _, unexpected = fresh.load_state_dict({default_key(p): to_torch(x) for p, x in named_leaves(variables)},
                                          strict=False)
    assert not unexpected
    missing, unexpected = fresh.load_state_dict({k: to_torch(v) for k, v in exported.items()}, strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    back = _torch_out(fresh.train(), ids)
    print(f"bias={bias}: jlora -> loralib max |diff| {np.abs(back - got).max():.2e}")
    np.testing.assert_allclose(back, got, **TOL)

    # round trip: exact
    again, again_config = load_loralib(exported, variables, rank=R, alpha=ALPHA, enable_lora=ENABLE, bias=bias)
    assert again_config == config
    fa, fb = dict(named_leaves(again)), dict(named_leaves(adapters))
    assert sorted(fa) == sorted(fb) and all(np.array_equal(fa[k], fb[k]) for k in fa)
    ddp = {f"module.{k}": v for k, v in exported.items()}  # a DistributedDataParallel checkpoint's prefix
    fa = dict(named_leaves(load_loralib(ddp, variables, rank=R, alpha=ALPHA, bias=bias)[0]))
    assert all(np.array_equal(fa[k], fb[k]) for k in fb)
    save_loralib(tmp_path / "out.pt", adapters, config)
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    assert sorted(saved) == sorted(state) and all(torch.equal(saved[k], state[k]) for k in saved)


def test_errors():
    model, variables = _trained()
    state = {k: to_np(v) for k, v in loralib.lora_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"c_attn.lora_A has shape \(8, 12\), but rank=2 .* needs \(4, 12\)"):
        load_loralib(state, variables, rank=2, alpha=ALPHA)
    renamed = {k.replace("c_fc", "c_fx"): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"c_fx.weight.*close candidates.*mlp\.c_fc\.weight"):
        load_loralib(renamed, variables, rank=R, alpha=ALPHA)
    with pytest.raises(ValueError, match="no '<module>.lora_A'"):
        load_loralib({"x.weight": np.zeros(3)}, variables, rank=R, alpha=ALPHA)
    conv = {"params": {"conv": {"kernel": jnp.zeros((3, 3, 5, 7))}}}
    with pytest.raises(ValueError, match="ConvLoRA"):  # loralib's ConvLoRA factors: (r*k, in*k), (out*k, r*k)
        load_loralib({"conv.lora_A": np.zeros((6, 15)), "conv.lora_B": np.zeros((21, 6))}, conv, rank=2, alpha=1)
    with pytest.raises(ValueError, match="bias=.* needs transformer.h.0.attn.c_attn.bias"):
        load_loralib(state, variables, rank=R, alpha=ALPHA, bias="lora_only")
    whole = {k: to_np(v) for k, v in model.state_dict().items()}  # W (in, out) with fan_in_fan_out, and biases
    adapters, _ = load_loralib(whole, variables, rank=R, alpha=ALPHA)
    assert sorted(dict(named_leaves(adapters))) == sorted(
        f"params/transformer/{m}/{w}/{f}" for m, w in [("h/0/attn/c_attn", "kernel"), ("h/0/mlp/c_fc", "kernel"),
                                                      ("wte", "embedding")] for f in ("lora_a", "lora_b"))
    with pytest.raises(ValueError, match=r"c_attn.weight has shape \(12, 36\).*fan_in_fan_out=False"):
        load_loralib(whole, variables, rank=R, alpha=ALPHA, fan_in_fan_out=False)
    stacked = {"params": {"q": {"kernel": {"lora_a": jnp.ones((2, 5, 3)), "lora_b": jnp.ones((2, 3, 7))}}}}
    with pytest.raises(ValueError, match="no loralib equivalent"):
        to_loralib(stacked, jlora.LoraConfig(rank=3, targets=("q",)))

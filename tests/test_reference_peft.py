"""jlora against Hugging Face PEFT (the PyTorch oracle for convolutions, rsLoRA and PEFT's bias modes).

    python -m pytest -q tests/test_reference_peft.py

The same W, bias, A and a NON-ZERO B go into a `peft.get_peft_model` wrapped torch module and into jlora
(Dense: lora_a = A^T, lora_b = B^T; Conv: lora_a (kh, kw, in, r) = A.weight (r, in, kh, kw) as HWIO,
lora_b (r, out) = B.weight (out, r, 1, 1) squeezed and transposed). Dims are pairwise distinct, alpha != r, and the
jlora side runs both eager and under `jax.jit`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_oracles import TOL, flat, jlora_out_grads, leaf_paths, rand, set_param, to_np, to_torch, torch_out_grads

import jlora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.reference

IN, OUT, R, BATCH, VOCAB, DIM = 11, 19, 7, 5, 23, 13
ALPHA = 3.0  # != R: alpha / r = 3/7, alpha / sqrt(r) = 3/sqrt(7)
SCALINGS = [("alpha_over_r", False), ("rslora", True)]  # (jlora scaling, PEFT use_rslora)

# the conv case: in 5, out 7, kernel (3, 2), stride (2, 1), padding (1, 2); batch 4, rank 6, image 9 x 10
C_IN, C_OUT, KH, KW, C_R, C_BATCH, H, W = 5, 7, 3, 2, 6, 4, 9, 10
STRIDE, PAD = (2, 1), (1, 2)


# --- 4. Conv2d ----------------------------------------------------------------------------------------------------


class _TorchConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(C_IN, C_OUT, (KH, KW), stride=STRIDE, padding=PAD)

    def forward(self, x):
        return self.conv(x)


class _FlaxConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(C_OUT, (KH, KW), strides=STRIDE, padding=[(p, p) for p in PAD], name="conv")(x)


def _oihw_to_hwio(w):
    return np.transpose(w, (2, 3, 1, 0))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(("scaling", "use_rslora"), SCALINGS, ids=[s for s, _ in SCALINGS])
def test_conv2d_outputs_and_grads_match_peft(scaling, use_rslora, jit):
    rng = np.random.default_rng(10)
    # weights ~ N(0, 1/fan_in) and a mean-scaled probe: O(1) outputs and grads, so 1e-5 is float32 rounding
    fan_in = C_IN * KH * KW
    w_oihw, bias = rand(rng, C_OUT, C_IN, KH, KW, scale=fan_in**-0.5), rand(rng, C_OUT)
    a_w = rand(rng, C_R, C_IN, KH, KW, scale=fan_in**-0.5)  # PEFT lora_A.weight (r, in, kh, kw)
    b_w = rand(rng, C_OUT, C_R, 1, 1, scale=C_R**-0.5)  # PEFT lora_B.weight (out, r, 1, 1), non-zero
    x_nhwc = rand(rng, C_BATCH, H, W, C_IN)

    model = peft.get_peft_model(_TorchConv(), peft.LoraConfig(r=C_R, lora_alpha=ALPHA, target_modules=["conv"],
                                                              lora_dropout=0.0, use_rslora=use_rslora))
    layer = model.base_model.model.conv
    set_param(layer.base_layer.weight, w_oihw)
    set_param(layer.base_layer.bias, bias)
    set_param(layer.lora_A["default"].weight, a_w)
    set_param(layer.lora_B["default"].weight, b_w)
    out_nchw = model(to_torch(x_nhwc).permute(0, 3, 1, 2))
    out_nhwc = to_np(out_nchw.permute(0, 2, 3, 1))
    assert out_nhwc.shape == (C_BATCH, (H + 2 * PAD[0] - KH) // STRIDE[0] + 1, W + 2 * PAD[1] - KW + 1, C_OUT)
    probe = rand(rng, *out_nhwc.shape, scale=(out_nhwc.size / C_OUT) ** -0.5)
    _, t_grads = torch_out_grads(model, to_torch(x_nhwc).permute(0, 3, 1, 2), np.transpose(probe, (0, 3, 1, 2)))
    assert set(t_grads) == {"base_model.model.conv.lora_A.default.weight",
                            "base_model.model.conv.lora_B.default.weight"}

    flax_model = _FlaxConv()
    cfg = jlora.LoraConfig(rank=C_R, alpha=ALPHA, targets=("conv",), scaling=scaling)
    lora = jlora.lora_transform(flax_model.apply, cfg, strict=True)
    variables = {"params": {"conv": {"kernel": jnp.asarray(_oihw_to_hwio(w_oihw)), "bias": jnp.asarray(bias)}}}
    frozen, adapters = lora.init(variables, jnp.asarray(x_nhwc), key=jax.random.key(1))
    pair = adapters["params"]["conv"]["kernel"]
    assert pair["lora_a"].shape == (KH, KW, C_IN, C_R) and pair["lora_b"].shape == (C_R, C_OUT)
    adapters["params"]["conv"]["kernel"] = {"lora_a": jnp.asarray(_oihw_to_hwio(a_w)),
                                            "lora_b": jnp.asarray(b_w[:, :, 0, 0].T)}

    j_out, j_grads = jlora_out_grads(lora, frozen, adapters, jnp.asarray(x_nhwc), probe, jit=jit)
    assert j_out.shape == out_nhwc.shape
    np.testing.assert_allclose(j_out, out_nhwc, **TOL)
    g = j_grads["params"]["conv"]["kernel"]
    np.testing.assert_allclose(g["lora_a"], _oihw_to_hwio(t_grads["base_model.model.conv.lora_A.default.weight"]),
                               **TOL)
    np.testing.assert_allclose(g["lora_b"], t_grads["base_model.model.conv.lora_B.default.weight"][:, :, 0, 0].T,
                               **TOL)

    # PEFT's merge (W += s * (B A) reshaped to OIHW) against jlora.merge, in HWIO
    merged = jlora.merge(frozen, adapters, cfg)["params"]["conv"]["kernel"]
    layer.merge()
    np.testing.assert_allclose(np.asarray(merged), _oihw_to_hwio(to_np(layer.base_layer.weight)), **TOL)


def test_conv2d_init_matches_peft():
    """PEFT's conv lora_A is kaiming_uniform(a=sqrt(5)) on (r, in, kh, kw): U(+-1/sqrt(in*kh*kw)); lora_B zeros."""
    c_in, c_out, k, r = 16, 24, 3, 16  # 3*3*16*16 = 2304 draws
    fan_in = c_in * k * k

    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(c_out, (k, k), name="conv")(x)

    x = jnp.ones((1, 6, 6, c_in), jnp.float32)
    model = Conv()
    cfg = jlora.LoraConfig(rank=r, alpha=ALPHA, targets=("conv",))
    _, adapters = jlora.lora_transform(model.apply, cfg).init(model.init(jax.random.key(0), x), x,
                                                              key=jax.random.key(1))
    a = np.asarray(adapters["params"]["conv"]["kernel"]["lora_a"])
    b = np.asarray(adapters["params"]["conv"]["kernel"]["lora_b"])
    assert a.shape == (k, k, c_in, r) and b.shape == (r, c_out)
    assert np.all(b == 0)
    assert np.all(np.abs(a) <= 1 / math.sqrt(fan_in))
    np.testing.assert_allclose(a.var(), 1 / (3 * fan_in), rtol=0.1)

    class TConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(c_in, c_out, k)

    torch.manual_seed(0)
    t = peft.get_peft_model(TConv(), peft.LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["conv"]))
    t_a = to_np(t.base_model.model.conv.lora_A["default"].weight)
    assert np.all(np.abs(t_a) <= 1 / math.sqrt(fan_in))
    np.testing.assert_allclose(t_a.var(), 1 / (3 * fan_in), rtol=0.1)
    assert np.all(to_np(t.base_model.model.conv.lora_B["default"].weight) == 0)


# --- 5. Linear, rsLoRA, and PEFT's bias modes ----------------------------------------------------------------------


class _TorchTwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT)
        self.other = torch.nn.Linear(OUT, DIM)

    def forward(self, x):
        return self.other(torch.tanh(self.proj(x)))


class _FlaxTwoLinear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(DIM, name="other")(jnp.tanh(nn.Dense(OUT, name="proj")(x)))


_PEFT_TO_JLORA = {
    "base_model.model.proj.lora_A.default.weight": "params/proj/kernel/lora_a",
    "base_model.model.proj.lora_B.default.weight": "params/proj/kernel/lora_b",
    "base_model.model.proj.base_layer.bias": "params/proj/bias",
    "base_model.model.other.bias": "params/other/bias",
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize(("scaling", "use_rslora"), SCALINGS, ids=[s for s, _ in SCALINGS])
def test_linear_outputs_and_grads_match_peft(scaling, use_rslora, bias, jit):
    rng = np.random.default_rng(11)
    # weights ~ N(0, 1/fan_in), as trained layers are: O(1) activations and grads, so 1e-5 is float32 rounding
    w1, b1 = rand(rng, OUT, IN) / math.sqrt(IN), rand(rng, OUT)  # torch layout (out, in)
    w2, b2 = rand(rng, DIM, OUT) / math.sqrt(OUT), rand(rng, DIM)
    a, b = rand(rng, R, IN) / math.sqrt(IN), rand(rng, OUT, R) / math.sqrt(R)  # PEFT lora_A (r, in), lora_B (out, r)
    x, probe = rand(rng, BATCH, IN), rand(rng, BATCH, DIM)

    model = peft.get_peft_model(_TorchTwoLinear(), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0, bias=bias, use_rslora=use_rslora))
    inner = model.base_model.model
    assert inner.proj.scaling["default"] == pytest.approx(ALPHA / (math.sqrt(R) if use_rslora else R))
    set_param(inner.proj.base_layer.weight, w1)
    set_param(inner.proj.base_layer.bias, b1)
    set_param(inner.other.weight, w2)
    set_param(inner.other.bias, b2)
    set_param(inner.proj.lora_A["default"].weight, a)
    set_param(inner.proj.lora_B["default"].weight, b)
    t_out, t_grads = torch_out_grads(model, to_torch(x), probe)
    assert set(t_grads) <= set(_PEFT_TO_JLORA)

    flax_model = _FlaxTwoLinear()
    cfg = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("proj",), bias=bias, scaling=scaling)
    assert cfg.scale_for("params/proj/kernel") == pytest.approx(inner.proj.scaling["default"])
    lora = jlora.lora_transform(flax_model.apply, cfg, strict=True)
    variables = {"params": {"proj": {"kernel": jnp.asarray(w1.T), "bias": jnp.asarray(b1)},
                            "other": {"kernel": jnp.asarray(w2.T), "bias": jnp.asarray(b2)}}}
    frozen, adapters = lora.init(variables, jnp.asarray(x), key=jax.random.key(1))
    # PEFT's trainable set (bias='none' | 'all' | 'lora_only') is jlora's adapters, one to one
    assert leaf_paths(adapters) == {_PEFT_TO_JLORA[n] for n in t_grads}
    adapters["params"]["proj"]["kernel"] = {"lora_a": jnp.asarray(a.T), "lora_b": jnp.asarray(b.T)}

    j_out, j_grads = jlora_out_grads(lora, frozen, adapters, jnp.asarray(x), probe, jit=jit)
    np.testing.assert_allclose(j_out, t_out, **TOL)
    j_flat = flat(j_grads)
    for name, grad in t_grads.items():
        path = _PEFT_TO_JLORA[name]
        np.testing.assert_allclose(j_flat[path], grad.T if path.endswith(("lora_a", "lora_b")) else grad, **TOL,
                                   err_msg=f"{name} vs {path}")

    merged = jlora.merge(frozen, adapters, cfg)["params"]["proj"]["kernel"]
    inner.proj.merge()
    np.testing.assert_allclose(np.asarray(merged), to_np(inner.proj.base_layer.weight).T, **TOL)


MID, MID_R, MID_ALPHA = 17, 4, 5.0  # the layer rank_pattern / alpha_pattern override: r 4, alpha 5


class _TorchThreeLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT)
        self.mid = torch.nn.Linear(OUT, MID)
        self.head = torch.nn.Linear(MID, DIM)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.proj(x)))))


class _FlaxThreeLinear(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(OUT, name="proj")(x))
        x = jnp.tanh(nn.Dense(MID, name="mid")(x))
        return nn.Dense(DIM, name="head")(x)


_PEFT3_TO_JLORA = {
    "base_model.model.proj.lora_A.default.weight": "params/proj/kernel/lora_a",
    "base_model.model.proj.lora_B.default.weight": "params/proj/kernel/lora_b",
    "base_model.model.mid.lora_A.default.weight": "params/mid/kernel/lora_a",
    "base_model.model.mid.lora_B.default.weight": "params/mid/kernel/lora_b",
    "base_model.model.head.modules_to_save.default.weight": "params/head/kernel",
    "base_model.model.head.modules_to_save.default.bias": "params/head/bias",
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(("scaling", "use_rslora"), SCALINGS, ids=[s for s, _ in SCALINGS])
def test_rank_alpha_patterns_and_modules_to_save_match_peft(scaling, use_rslora, jit):
    """PEFT's rank_pattern / alpha_pattern (per-module r and alpha) and modules_to_save (a head trained in full)."""
    rng = np.random.default_rng(13)
    model = peft.get_peft_model(_TorchThreeLinear(), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["proj", "mid"], rank_pattern={"mid": MID_R},
        alpha_pattern={"mid": MID_ALPHA}, modules_to_save=["head"], lora_dropout=0.0, use_rslora=use_rslora))
    inner = model.base_model.model
    values = {}  # torch name -> value, every parameter in torch layout, weights ~ N(0, 1/fan_in), B non-zero
    for name, p in model.named_parameters():
        values[name] = rand(rng, *p.shape, scale=p.shape[-1] ** -0.5 if p.ndim == 2 else 1.0)
        set_param(p, values[name])
    set_param(inner.head.original_module.weight, values["base_model.model.head.modules_to_save.default.weight"])
    set_param(inner.head.original_module.bias, values["base_model.model.head.modules_to_save.default.bias"])
    x, probe = rand(rng, BATCH, IN), rand(rng, BATCH, DIM)
    t_out, t_grads = torch_out_grads(model, to_torch(x), probe)
    assert set(t_grads) == set(_PEFT3_TO_JLORA)

    cfg = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("proj", "mid"), rank_pattern={"mid": MID_R},
                           alpha_pattern={"mid": MID_ALPHA}, modules_to_save=("head",), scaling=scaling)
    for layer, path in (("proj", "params/proj/kernel"), ("mid", "params/mid/kernel")):
        assert cfg.scale_for(path) == pytest.approx(getattr(inner, layer).scaling["default"]), layer
    lora = jlora.lora_transform(_FlaxThreeLinear().apply, cfg, strict=True)
    v = {n.removeprefix("base_model.model."): val for n, val in values.items()}
    variables = {"params": {
        "proj": {"kernel": v["proj.base_layer.weight"].T, "bias": v["proj.base_layer.bias"]},
        "mid": {"kernel": v["mid.base_layer.weight"].T, "bias": v["mid.base_layer.bias"]},
        "head": {"kernel": v["head.modules_to_save.default.weight"].T, "bias": v["head.modules_to_save.default.bias"]},
    }}
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    frozen, adapters = lora.init(variables, jnp.asarray(x), key=jax.random.key(1))
    assert leaf_paths(adapters) == set(_PEFT3_TO_JLORA.values())
    assert adapters["params"]["mid"]["kernel"]["lora_a"].shape == (OUT, MID_R)
    for name, path in _PEFT3_TO_JLORA.items():  # the PEFT values into the adapter tree, transposed where 2-D
        *parents, last = path.split("/")
        node = adapters
        for k in parents:
            node = node[k]
        node[last] = jnp.asarray(values[name].T)

    j_out, j_grads = jlora_out_grads(lora, frozen, adapters, jnp.asarray(x), probe, jit=jit)
    np.testing.assert_allclose(j_out, t_out, **TOL)
    j_flat = flat(j_grads)
    for name, path in _PEFT3_TO_JLORA.items():
        np.testing.assert_allclose(j_flat[path], t_grads[name].T, **TOL, err_msg=f"{name} vs {path}")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_embedding_outputs_and_grads_match_peft(jit):
    rng = np.random.default_rng(12)
    table = rand(rng, VOCAB, DIM)
    a, b = rand(rng, R, VOCAB), rand(rng, DIM, R)  # PEFT lora_embedding_A (r, vocab), lora_embedding_B (dim, r)
    ids = rng.integers(0, VOCAB, size=(BATCH, 3))
    probe = rand(rng, BATCH, 3, DIM)

    class TEmb(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(VOCAB, DIM)

        def forward(self, i):
            return self.wte(i)

    model = peft.get_peft_model(TEmb(), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["wte"]))
    layer = model.base_model.model.wte
    set_param(layer.base_layer.weight, table)
    set_param(layer.lora_embedding_A["default"], a)
    set_param(layer.lora_embedding_B["default"], b)
    t_out, t_grads = torch_out_grads(model, torch.from_numpy(ids), probe)

    class Emb(nn.Module):
        @nn.compact
        def __call__(self, i):
            return nn.Embed(VOCAB, DIM, name="wte")(i)

    cfg = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("wte",))
    lora = jlora.lora_transform(Emb().apply, cfg, strict=True)
    frozen, _ = lora.init({"params": {"wte": {"embedding": jnp.asarray(table)}}}, jnp.asarray(ids),
                          key=jax.random.key(2))
    adapters = {"params": {"wte": {"embedding": {"lora_a": jnp.asarray(a.T), "lora_b": jnp.asarray(b.T)}}}}
    j_out, j_grads = jlora_out_grads(lora, frozen, adapters, jnp.asarray(ids), probe, jit=jit)
    np.testing.assert_allclose(j_out, t_out, **TOL)
    g = j_grads["params"]["wte"]["embedding"]
    np.testing.assert_allclose(g["lora_a"], t_grads["base_model.model.wte.lora_embedding_A.default"].T, **TOL)
    np.testing.assert_allclose(g["lora_b"], t_grads["base_model.model.wte.lora_embedding_B.default"].T, **TOL)


def test_gaussian_init_matches_peft():
    """init='gaussian' is PEFT's init_lora_weights='gaussian': lora_A ~ N(0, 1/r^2), lora_B zeros."""
    n_in, n_out, r = 64, 48, 32

    class Dense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(n_out, name="proj")(x)

    x = jnp.ones((2, n_in), jnp.float32)
    model = Dense()
    cfg = jlora.LoraConfig(rank=r, alpha=ALPHA, targets=("proj",), init="gaussian")
    _, adapters = jlora.lora_transform(model.apply, cfg).init(model.init(jax.random.key(0), x), x,
                                                              key=jax.random.key(1))
    a = np.asarray(adapters["params"]["proj"]["kernel"]["lora_a"])
    assert np.all(np.asarray(adapters["params"]["proj"]["kernel"]["lora_b"]) == 0)

    class TDense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(n_in, n_out)

    torch.manual_seed(0)
    t = peft.get_peft_model(TDense(), peft.LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["proj"],
                                                      init_lora_weights="gaussian"))
    t_a = to_np(t.base_model.model.proj.lora_A["default"].weight)
    assert a.shape == t_a.shape[::-1]
    # 2048 draws: the sample variance has a relative std of sqrt(2/2048) ~ 3%, so 15% is a 5-sigma band
    np.testing.assert_allclose(a.var(), 1 / r**2, rtol=0.15)
    np.testing.assert_allclose(t_a.var(), 1 / r**2, rtol=0.15)

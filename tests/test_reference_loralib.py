"""jlora against Microsoft loralib (the PyTorch oracle): outputs, gradients, merges, trainable sets, inits.

    python -m pytest -q tests/test_reference_loralib.py

Every equivalence check copies the same W, bias, A and a NON-ZERO B into loralib and into jlora (lora_a = A^T,
lora_b = B^T, see /work/shared/reference/loralib.md), uses pairwise-distinct dims and alpha != r so that a
transposed factor or a wrong scale cannot pass, and runs the jlora side both eager and under `jax.jit`.
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
loralib = pytest.importorskip("loralib")

pytestmark = pytest.mark.reference

IN, OUT, R, BATCH, VOCAB, DIM, D_SLICE = 11, 19, 7, 5, 23, 13, 17
ALPHA = 3.0  # != R, so alpha / r = 3/7 is visible in every output


class _Dense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, name="proj")(x)


class _Embed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(VOCAB, DIM, name="wte")(ids)


class _Attn(nn.Module):
    """GPT-2's fused c_attn: one Dense with 3 * d outputs (q, k, v)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3 * D_SLICE, name="c_attn")(x)


# --- 1. loralib.Linear ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["W(out,in)", "W(in,out)"])
def test_linear_outputs_and_grads_match_loralib(fan_in_fan_out, jit):
    rng = np.random.default_rng(0)
    kernel, bias = rand(rng, IN, OUT), rand(rng, OUT)  # flax layout (in, out)
    a, b = rand(rng, R, IN) / math.sqrt(IN), rand(rng, OUT, R)  # loralib A (r, in), B (out, r): B non-zero
    x, probe = rand(rng, BATCH, IN), rand(rng, BATCH, OUT)

    layer = loralib.Linear(IN, OUT, r=R, lora_alpha=ALPHA, lora_dropout=0.0, fan_in_fan_out=fan_in_fan_out,
                           merge_weights=True)
    set_param(layer.weight, kernel if fan_in_fan_out else kernel.T)
    set_param(layer.bias, bias)
    set_param(layer.lora_A, a)
    set_param(layer.lora_B, b)
    assert tuple(layer.weight.shape) == ((IN, OUT) if fan_in_fan_out else (OUT, IN))
    layer.weight.requires_grad_(False)  # loralib freezes W; the bias is trained (bias='all')
    layer.train()
    t_out, t_grads = torch_out_grads(layer, to_torch(x), probe)
    assert set(t_grads) == {"bias", "lora_A", "lora_B"}

    model = _Dense(OUT)
    cfg = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("proj",), bias="all")
    lora = jlora.lora_transform(model.apply, cfg, strict=True)
    variables = {"params": {"proj": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}}
    frozen, adapters = lora.init(variables, jnp.asarray(x), key=jax.random.key(1))
    assert frozen["params"]["proj"]["bias"] is None
    assert adapters["params"]["proj"]["kernel"]["lora_a"].shape == (IN, R)
    assert adapters["params"]["proj"]["kernel"]["lora_b"].shape == (R, OUT)
    adapters["params"]["proj"]["kernel"] = {"lora_a": jnp.asarray(a.T), "lora_b": jnp.asarray(b.T)}

    j_out, j_grads = jlora_out_grads(lora, frozen, adapters, jnp.asarray(x), probe, jit=jit)
    np.testing.assert_allclose(j_out, t_out, **TOL)
    g = j_grads["params"]["proj"]
    np.testing.assert_allclose(g["kernel"]["lora_a"], t_grads["lora_A"].T, **TOL)
    np.testing.assert_allclose(g["kernel"]["lora_b"], t_grads["lora_B"].T, **TOL)
    np.testing.assert_allclose(g["bias"], t_grads["bias"], **TOL)

    # loralib's eval() folds s * (B A) into W in place; jlora.merge is the pure equivalent.
    layer.eval()
    merged = jlora.merge(frozen, adapters, cfg)["params"]["proj"]
    w = to_np(layer.weight)
    np.testing.assert_allclose(np.asarray(merged["kernel"]), w if fan_in_fan_out else w.T, **TOL)
    np.testing.assert_allclose(np.asarray(merged["bias"]), bias, **TOL)
    np.testing.assert_allclose(np.asarray(model.apply({"params": {"proj": merged}}, jnp.asarray(x))), t_out, **TOL)


# --- 2. loralib.Embedding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_embedding_outputs_and_grads_match_loralib(jit):
    rng = np.random.default_rng(1)
    table = rand(rng, VOCAB, DIM)
    a, b = rand(rng, R, VOCAB), rand(rng, DIM, R)  # loralib A (r, vocab) (zeros at init), B (dim, r)
    ids = rng.integers(0, VOCAB, size=(BATCH, 3))
    ids[0, :] = [0, VOCAB - 1, 0]  # the edges of the table, and a repeated id (grads must accumulate)
    probe = rand(rng, BATCH, 3, DIM)

    layer = loralib.Embedding(VOCAB, DIM, r=R, lora_alpha=ALPHA, merge_weights=True)
    set_param(layer.weight, table)
    set_param(layer.lora_A, a)
    set_param(layer.lora_B, b)
    layer.weight.requires_grad_(False)
    layer.train()
    t_out, t_grads = torch_out_grads(layer, torch.from_numpy(ids), probe)
    assert set(t_grads) == {"lora_A", "lora_B"}

    model = _Embed()
    cfg = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("wte",))
    lora = jlora.lora_transform(model.apply, cfg, strict=True)
    frozen, adapters = lora.init({"params": {"wte": {"embedding": jnp.asarray(table)}}}, jnp.asarray(ids),
                                 key=jax.random.key(2))
    pair = adapters["params"]["wte"]["embedding"]
    assert pair["lora_a"].shape == (VOCAB, R) and pair["lora_b"].shape == (R, DIM)
    adapters["params"]["wte"]["embedding"] = {"lora_a": jnp.asarray(a.T), "lora_b": jnp.asarray(b.T)}

    j_out, j_grads = jlora_out_grads(lora, frozen, adapters, jnp.asarray(ids), probe, jit=jit)
    np.testing.assert_allclose(j_out, t_out, **TOL)
    g = j_grads["params"]["wte"]["embedding"]
    np.testing.assert_allclose(g["lora_a"], t_grads["lora_A"].T, **TOL)
    np.testing.assert_allclose(g["lora_b"], t_grads["lora_B"].T, **TOL)

    layer.eval()  # W += (B A)^T * s
    merged = jlora.merge(frozen, adapters, cfg)
    np.testing.assert_allclose(np.asarray(merged["params"]["wte"]["embedding"]), to_np(layer.weight), **TOL)


# --- 3. loralib.MergedLinear (GPT-2's c_attn, q and v adapted) --------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("fan_in_fan_out", [True, False], ids=["W(in,out)", "W(out,in)"])
@pytest.mark.parametrize("enable", [(True, False, True), (False, True, False)], ids=["qv", "k"])
def test_merged_linear_outputs_and_grads_match_loralib(enable, fan_in_fan_out, jit):
    rng = np.random.default_rng(2)
    n_on, out = sum(enable), 3 * D_SLICE
    kernel, bias = rand(rng, IN, out), rand(rng, out)
    a = rand(rng, R * n_on, IN) / math.sqrt(IN)  # loralib A (r * e, in)
    b = rand(rng, D_SLICE * n_on, R)  # loralib B (d * e, r), non-zero
    x, probe = rand(rng, BATCH, IN), rand(rng, BATCH, out)

    layer = loralib.MergedLinear(IN, out, r=R, lora_alpha=ALPHA, lora_dropout=0.0, enable_lora=list(enable),
                                 fan_in_fan_out=fan_in_fan_out, merge_weights=True)
    set_param(layer.weight, kernel if fan_in_fan_out else kernel.T)
    set_param(layer.bias, bias)
    set_param(layer.lora_A, a)
    set_param(layer.lora_B, b)
    layer.weight.requires_grad_(False)
    layer.train()
    t_out, t_grads = torch_out_grads(layer, to_torch(x), probe)
    # the disabled slices get no update from loralib: a sanity check that the oracle is what we think it is
    plain = x @ kernel + bias
    for j, on in enumerate(enable):
        sl = slice(j * D_SLICE, (j + 1) * D_SLICE)
        assert np.allclose(t_out[:, sl], plain[:, sl], **TOL) != on

    model = _Attn()
    cfg = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("c_attn",), fused={"c_attn": enable}, bias="all")
    lora = jlora.lora_transform(model.apply, cfg, strict=True)
    variables = {"params": {"c_attn": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}}
    frozen, adapters = lora.init(variables, jnp.asarray(x), key=jax.random.key(3))
    pair = adapters["params"]["c_attn"]["kernel"]
    assert pair["lora_a"].shape == (IN, n_on * R) and pair["lora_b"].shape == (R, n_on * D_SLICE)
    adapters["params"]["c_attn"]["kernel"] = {"lora_a": jnp.asarray(a.T), "lora_b": jnp.asarray(b.T)}

    j_out, j_grads = jlora_out_grads(lora, frozen, adapters, jnp.asarray(x), probe, jit=jit)
    np.testing.assert_allclose(j_out, t_out, **TOL)
    g = j_grads["params"]["c_attn"]
    np.testing.assert_allclose(g["kernel"]["lora_a"], t_grads["lora_A"].T, **TOL)
    np.testing.assert_allclose(g["kernel"]["lora_b"], t_grads["lora_B"].T, **TOL)
    np.testing.assert_allclose(g["bias"], t_grads["bias"], **TOL)

    layer.eval()  # W += T(zero_pad(conv1d(A, B, groups=e))) * s
    merged = jlora.merge(frozen, adapters, cfg)["params"]["c_attn"]["kernel"]
    w = to_np(layer.weight)
    np.testing.assert_allclose(np.asarray(merged), w if fan_in_fan_out else w.T, **TOL)


# --- 6. bias modes: mark_only_lora_as_trainable vs jlora's adapters ---------------------------------------------


class _TorchTwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = loralib.Linear(IN, OUT, r=R, lora_alpha=ALPHA)
        self.l2 = torch.nn.Linear(OUT, DIM)
        self.ln = torch.nn.LayerNorm(DIM)

    def forward(self, x):
        return self.ln(self.l2(self.l1(x)))


class _FlaxTwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(OUT, name="l1")(x)
        x = nn.Dense(DIM, name="l2")(x)
        return nn.LayerNorm(name="ln")(x)


# torch parameter name -> jlora path; every parameter of both models is listed, so the map is one-to-one
_TORCH_TO_JLORA = {
    "l1.weight": "params/l1/kernel",
    "l1.bias": "params/l1/bias",
    "l1.lora_A": "params/l1/kernel/lora_a",
    "l1.lora_B": "params/l1/kernel/lora_b",
    "l2.weight": "params/l2/kernel",
    "l2.bias": "params/l2/bias",
    "ln.weight": "params/ln/scale",
    "ln.bias": "params/ln/bias",
}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_set_matches_mark_only_lora_as_trainable(bias):
    module = _TorchTwoLayer()
    assert set(dict(module.named_parameters())) == set(_TORCH_TO_JLORA)
    loralib.mark_only_lora_as_trainable(module, bias=bias)
    torch_trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    expected = {_TORCH_TO_JLORA[n] for n in torch_trainable}
    # what loralib checkpoints (lora_state_dict) is the same set
    assert set(loralib.lora_state_dict(module, bias=bias)) == torch_trainable

    x = jnp.ones((BATCH, IN), jnp.float32)
    model = _FlaxTwoLayer()
    variables = model.init(jax.random.key(0), x)
    assert leaf_paths(variables) | {"params/l1/kernel/lora_a", "params/l1/kernel/lora_b"} == set(
        _TORCH_TO_JLORA.values())
    cfg = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("l1",), bias=bias)
    frozen, adapters = jlora.lora_transform(model.apply, cfg).init(variables, x, key=jax.random.key(1))
    assert leaf_paths(adapters) == expected
    # frozen holds everything else; its trained-in-full slots are None (dropped by tree flattening)
    assert leaf_paths(frozen) == set(_TORCH_TO_JLORA.values()) - expected - {"params/l1/kernel/lora_a",
                                                                                "params/l1/kernel/lora_b"}
    # trainable_mask says the same on the adapters tree, and on (frozen, adapters)
    mask = jlora.trainable_mask(adapters, cfg)
    assert all(jax.tree_util.tree_leaves(mask))
    both = jlora.trainable_mask((frozen, adapters), cfg)
    assert {p.split("/", 1)[1] for p, m in flat(both).items() if m} == expected
    # and `split` agrees with init about the trained-in-full leaves
    _, full = jlora.split(variables, cfg)
    assert leaf_paths(full) == expected - {"params/l1/kernel/lora_a", "params/l1/kernel/lora_b"}


# --- 7. init statistics ----------------------------------------------------------------------------------------


def test_dense_init_matches_loralib_kaiming_uniform():
    n_in, n_out, r = 64, 48, 32
    bound, var = 1.0 / math.sqrt(n_in), 1.0 / (3 * n_in)
    x = jnp.ones((2, n_in), jnp.float32)
    model = _Dense(n_out)
    cfg = jlora.LoraConfig(rank=r, alpha=ALPHA, targets=("proj",))
    _, adapters = jlora.lora_transform(model.apply, cfg).init(model.init(jax.random.key(0), x), x,
                                                              key=jax.random.key(1))
    a = np.asarray(adapters["params"]["proj"]["kernel"]["lora_a"])
    b = np.asarray(adapters["params"]["proj"]["kernel"]["lora_b"])
    assert a.shape == (n_in, r) and b.shape == (r, n_out)
    assert np.all(b == 0)
    assert np.all(np.abs(a) <= bound)
    assert np.abs(a).max() > 0.95 * bound  # uses the whole interval, not a narrower one
    # 2048 draws: the sample variance of U(-c, c) has a relative std of ~2%, so 10% is a 5-sigma band
    np.testing.assert_allclose(a.var(), var, rtol=0.1)
    assert abs(a.mean()) < 5 * math.sqrt(var / a.size)

    # the same statistics as loralib's own draw of A (r, in)
    torch.manual_seed(0)
    t_a = to_np(loralib.Linear(n_in, n_out, r=r).lora_A)
    assert np.all(np.abs(t_a) <= bound)
    np.testing.assert_allclose(t_a.var(), var, rtol=0.1)


def test_merged_linear_init_matches_loralib():
    n_in, d, r, enable = 64, 16, 32, (True, False, True)

    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3 * d, name="c_attn")(x)

    x = jnp.ones((2, n_in), jnp.float32)
    cfg = jlora.LoraConfig(rank=r, alpha=ALPHA, targets=("c_attn",), fused={"c_attn": enable})
    model = Attn()
    _, adapters = jlora.lora_transform(model.apply, cfg).init(model.init(jax.random.key(0), x), x,
                                                              key=jax.random.key(1))
    a = np.asarray(adapters["params"]["c_attn"]["kernel"]["lora_a"])
    b = np.asarray(adapters["params"]["c_attn"]["kernel"]["lora_b"])
    t = loralib.MergedLinear(n_in, 3 * d, r=r, enable_lora=list(enable))
    assert a.shape == tuple(t.lora_A.shape[::-1]) and b.shape == tuple(t.lora_B.shape[::-1])
    assert np.all(b == 0)
    assert np.all(np.abs(a) <= 1.0 / math.sqrt(n_in))
    np.testing.assert_allclose(a.var(), 1.0 / (3 * n_in), rtol=0.1)


def test_embed_init_matches_loralib():
    vocab, dim, r = 300, 64, 32
    ids = jnp.arange(7)

    class Emb(nn.Module):
        @nn.compact
        def __call__(self, i):
            return nn.Embed(vocab, dim, name="wte")(i)

    model = Emb()
    cfg = jlora.LoraConfig(rank=r, alpha=ALPHA, targets=("wte",))
    _, adapters = jlora.lora_transform(model.apply, cfg).init(model.init(jax.random.key(0), ids), ids,
                                                              key=jax.random.key(1))
    a = np.asarray(adapters["params"]["wte"]["embedding"]["lora_a"])
    b = np.asarray(adapters["params"]["wte"]["embedding"]["lora_b"])
    t = loralib.Embedding(vocab, dim, r=r)
    assert a.shape == tuple(t.lora_A.shape[::-1]) and b.shape == tuple(t.lora_B.shape[::-1])
    assert np.all(a == 0)  # loralib: A zeros, B ~ N(0, 1)
    assert np.all(to_np(t.lora_A) == 0)
    # 2048 draws of N(0, 1): mean within 5 sigma (0.11), variance within ~5 sigma (0.16)
    assert abs(b.mean()) < 5 / math.sqrt(b.size)
    np.testing.assert_allclose(b.var(), 1.0, atol=0.16)
    np.testing.assert_allclose(to_np(t.lora_B).var(), 1.0, atol=0.16)

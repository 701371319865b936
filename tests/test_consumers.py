"""Factored == merged on every supported consumer, with non-zero B and pairwise distinct dims, eager and jit."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_factored_equals_merged, perturb

import jlora

KERNEL = jlora.LoraConfig(rank=3, alpha=5.0, targets=("kernel",))


def x_of(*shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def adapter_shapes(adapters):
    return jax.tree.map(jnp.shape, adapters)


def test_dense_layout_and_equivalence():
    m, x = nn.Dense(19), x_of(5, 11)
    _, _, ad = assert_factored_equals_merged(m.apply, m.init(jax.random.key(0), x), (x,), KERNEL)
    assert adapter_shapes(ad) == {"params": {"kernel": {"lora_a": (11, 3), "lora_b": (3, 19)}}}


@pytest.mark.parametrize(
    "module, x_shape, a_shape, b_shape",
    [
        (nn.DenseGeneral((3, 4), axis=-1), (2, 5, 6), (6, 3), (3, 3, 4)),  # several output axes
        (nn.DenseGeneral(7, axis=(-2, -1)), (2, 5, 6), (5, 6, 3), (3, 7)),  # several contracted axes
        (nn.Einsum((6, 4, 7), "btd,dhk->bthk"), (2, 5, 6), (6, 3), (3, 4, 7)),
    ],
)
def test_multi_axis_kernels(module, x_shape, a_shape, b_shape):
    x = x_of(*x_shape)
    _, _, ad = assert_factored_equals_merged(module.apply, module.init(jax.random.key(0), x), (x,), KERNEL)
    assert adapter_shapes(ad)["params"]["kernel"] == {"lora_a": a_shape, "lora_b": b_shape}


@pytest.mark.parametrize(
    "x_shape, kernel, kw, a_shape",
    [
        ((2, 13, 5), (3,), {}, (3, 5, 3)),  # 1-D
        ((2, 9, 8, 5), (3, 2), dict(strides=(2, 1), padding=((1, 2), (0, 1))), (3, 2, 5, 3)),  # 2-D
        ((2, 6, 7, 5, 4), (2, 3, 2), dict(kernel_dilation=(1, 2, 1)), (2, 3, 2, 4, 3)),  # 3-D
    ],
)
def test_conv(x_shape, kernel, kw, a_shape):
    m, x = nn.Conv(7, kernel, **kw), x_of(*x_shape)
    _, _, ad = assert_factored_equals_merged(m.apply, m.init(jax.random.key(0), x), (x,), KERNEL, atol=2e-5)
    assert adapter_shapes(ad)["params"]["kernel"] == {"lora_a": a_shape, "lora_b": (3, 7)}


EMBED = jlora.LoraConfig(rank=3, alpha=5.0, targets=("embedding",))


def test_embedding_lookup_and_init():
    m, ids = nn.Embed(23, 13), jnp.array([[1, 2, 22], [0, 7, 7]])
    lora, _frozen, _ = assert_factored_equals_merged(m.apply, m.init(jax.random.key(0), ids), (ids,), EMBED)
    _, fresh = lora.init(m.init(jax.random.key(0), ids), ids, key=jax.random.key(1))
    pair = fresh["params"]["embedding"]
    assert pair["lora_a"].shape == (23, 3) and pair["lora_b"].shape == (3, 13)
    assert not np.any(pair["lora_a"]) and np.std(pair["lora_b"]) > 0.3  # loralib: A zeros, B ~ N(0, 1)


def test_attend_and_tied_embedding():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            wte = nn.Embed(23, 13, name="wte")
            return wte.attend(jnp.tanh(wte(ids)))

    m, ids = Tied(), jnp.array([[1, 2, 22], [0, 7, 7]])
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("wte",))
    lora, _, ad = assert_factored_equals_merged(m.apply, m.init(jax.random.key(0), ids), (ids,), cfg)
    assert adapter_shapes(ad)["params"]["wte"]["embedding"] == {"lora_a": (23, 3), "lora_b": (3, 13)}
    assert lora.consumers(m.init(jax.random.key(0), ids), ids) == {"params/wte/embedding": ["gather", "dot"]}


class Block(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        return jnp.tanh(nn.Dense(6, name="dense")(carry)), None


class Stacked(nn.Module):
    remat: bool = True

    @nn.compact
    def __call__(self, x):
        block = nn.remat(Block) if self.remat else Block
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
        return layers(name="layers")(x, None)[0]


@pytest.mark.parametrize("remat", [True, False])
def test_scan_stacked_layers(remat):
    m, x = Stacked(remat), x_of(2, 5, 6)
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("dense",))
    lora, _, ad = assert_factored_equals_merged(m.apply, m.init(jax.random.key(0), x), (x,), cfg)
    pair = ad["params"]["layers"]["dense"]["kernel"]
    assert adapter_shapes(pair) == {"lora_a": (4, 6, 3), "lora_b": (4, 3, 6)}
    _, fresh = lora.init(m.init(jax.random.key(0), x), x, key=jax.random.key(1))
    a = fresh["params"]["layers"]["dense"]["kernel"]["lora_a"]
    assert all(not np.allclose(a[0], a[i]) for i in range(1, 4)), "each layer needs its own init key"


def test_cond_and_nested_jit_and_casts():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(7, name="d", dtype=jnp.float32, param_dtype=jnp.float32)
            y = nn.cond(x.sum() > 0, lambda mdl, v: mdl(v), lambda mdl, v: -mdl(v), d, x)
            return y

    m, x = M(), x_of(5, 11)
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("d",))
    assert_factored_equals_merged(m.apply, m.init(jax.random.key(0), x), (x,), cfg)

    def plain(params, x):
        w = params["w"]
        inner = jax.jit(lambda w, x: x @ w.astype(jnp.float32).T.T)
        return jnp.tanh(inner(w, x)) @ params["v"].reshape(19, 4).reshape(19, 2, 2).reshape(19, 4)

    params = {"w": x_of(11, 19, seed=1), "v": x_of(19, 2, 2, seed=2)}  # merged, split and merged again
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("w", "v"))
    assert_factored_equals_merged(plain, params, (x,), cfg)


def test_torch_layout_plain_function_contracts_the_b_side():
    def f(params, x):
        return x @ params["w"].T  # w stored (out, in) as in PyTorch

    params, x = {"w": x_of(19, 11, seed=1)}, x_of(5, 11)
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("w",))
    lora = jlora.lora_transform(f, cfg, strict=True)
    _, fresh = lora.init(params, x, key=jax.random.key(1))
    pair = fresh["w"]
    # the input side (b, covering `in`) gets the kaiming-uniform init, the output side (a) zeros
    assert pair["lora_a"].shape == (19, 3) and not np.any(pair["lora_a"]) and np.any(pair["lora_b"])
    assert_factored_equals_merged(f, params, (x,), cfg)


def test_fused_projection_like_merged_linear():
    def f(params, x):
        q, k, v = jnp.split(x @ params["c_attn"], 3, axis=-1)
        return q * jnp.tanh(k) + v

    params, x = {"c_attn": x_of(11, 3 * 13, seed=1)}, x_of(5, 11)
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("c_attn",), fused={"c_attn": (True, False, True)})
    _lora, frozen, ad = assert_factored_equals_merged(f, params, (x,), cfg)
    assert adapter_shapes(ad) == {"c_attn": {"lora_a": (11, 6), "lora_b": (3, 26)}}
    # the disabled k slice gets no update at all
    merged = jlora.merge(frozen, ad, cfg)
    np.testing.assert_array_equal(merged["c_attn"][:, 13:26], params["c_attn"][:, 13:26])
    assert not np.allclose(merged["c_attn"][:, :13], params["c_attn"][:, :13])


def test_fallback_warns_and_strict_raises():
    def f(params, x):
        return x @ jnp.sin(params["w"])  # sin is no consumer jlora can factor

    params, x = {"w": x_of(11, 19, seed=1)}, x_of(5, 11)
    cfg = jlora.LoraConfig(rank=3, alpha=5.0, targets=("w",))
    lora = jlora.lora_transform(f, cfg)
    frozen, ad = lora.init(params, x, key=jax.random.key(1))
    ad = perturb(ad)
    with pytest.warns(jlora.FactoredFallbackWarning, match=r"'w' \(11, 19\) reaches `sin`"):
        y = lora.apply(frozen, ad, x)
    np.testing.assert_allclose(y, f(jlora.merge(frozen, ad, cfg), x), atol=1e-5)
    strict = jlora.lora_transform(f, cfg, strict=True)
    with pytest.raises(ValueError, match="reaches `sin`"):
        strict.apply(frozen, ad, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.lora_transform(lambda p, x: x @ p["w"], cfg, strict=True).apply(frozen, ad, x)


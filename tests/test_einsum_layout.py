"""Einsum kernels contracted on a middle axis (Gemma's projections) get a true rank-r adapter: lora_a covers exactly
the contracted axes, lora_b the rest, wherever they sit; factored == merged, gradients, checkpoints, rank <= r."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb

import jlora
from jlora.analysis import LayoutWarning
from jlora.layout import read_layout

N, K, D, H, F, R = 4, 2, 24, 6, 10, 3  # heads, kv heads, model dim, head dim, MLP hidden, rank: pairwise distinct
EINSUMS = {  # Gemma's own equations (gemma/modules.py, gemma/layers.py) and W's shape
    "q_einsum": ("BTD,NDH->BTNH", (N, D, H)),
    "kv_einsum": ("BSD,CKDH->CBSKH", (2, K, D, H)),
    "qkv_einsum": ("BTD,SNDH->SBTNH", (3, N, D, H)),
    "attn_vec_einsum": ("BTNH,NHD->BTD", (N, H, D)),
    "gating_einsum": ("...D,GFD->...GF", (2, F, D)),
    "linear": ("...F,FD->...D", (F, D)),
}
CONTRACTED = {"q_einsum": (1,), "kv_einsum": (2,), "qkv_einsum": (2,), "attn_vec_einsum": (0, 1),
              "gating_einsum": (2,), "linear": (0,)}


def gemma_block(params, x):
    """A Gemma-layout attention + gated MLP block (no softmax subtleties needed: the projections are the point)."""
    q = jnp.einsum(EINSUMS["q_einsum"][0], x, params["q_einsum"]["w"])  # (B, T, N, H)
    k, v = jnp.einsum(EINSUMS["kv_einsum"][0], x, params["kv_einsum"]["w"])  # (B, T, K, H) each
    qkv = jnp.einsum(EINSUMS["qkv_einsum"][0], x, params["qkv_einsum"]["w"])  # (3, B, T, N, H)
    scores = jnp.einsum("BTNH,BSNH->BNTS", q + qkv[0], jnp.repeat(k, N // K, axis=2))
    attn = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(scores / math.sqrt(H)), jnp.repeat(v, N // K, axis=2))
    h = x + jnp.einsum(EINSUMS["attn_vec_einsum"][0], attn + qkv[1], params["attn_vec_einsum"]["w"])
    gate = jnp.einsum(EINSUMS["gating_einsum"][0], h, params["gating_einsum"]["w"])  # (B, T, 2, F)
    return h + jnp.einsum(EINSUMS["linear"][0], jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :],
                          params["linear"]["w"])


def make(key=0, targets=tuple(EINSUMS), rank=R):
    keys = jax.random.split(jax.random.key(key), len(EINSUMS) + 1)
    params = {name: {"w": jax.random.normal(k, shape) / math.sqrt(shape[CONTRACTED[name][0]])}
              for k, (name, (_, shape)) in zip(keys, EINSUMS.items())}
    x = jax.random.normal(keys[-1], (2, 5, D))
    config = jlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    lora = jlora.lora_transform(gemma_block, config, strict=True)
    frozen, adapters = lora.init(params, x, key=jax.random.key(key + 1))
    return lora, config, params, x, frozen, adapters


def delta_matrix(w, merged, contracted):
    """merged - w as a matrix from the contracted axes to the rest."""
    d = np.asarray(merged - w, np.float64)
    rest = [i for i in range(d.ndim) if i not in contracted]
    return d.transpose(list(contracted) + rest).reshape(math.prod(d.shape[i] for i in contracted), -1)


def test_lora_a_covers_exactly_the_contracted_axes():
    _, _, _, _, _, adapters = make()
    shapes = {name: (adapters[name]["w"]["lora_a"].shape, adapters[name]["w"]["lora_b"].shape) for name in EINSUMS}
    assert shapes == {
        "q_einsum": ((D, R), (R, N, H)),  # as gemma.peft: a (D, r), b (r, N, H)
        "kv_einsum": ((D, R), (R, 2, K, H)),
        "qkv_einsum": ((D, R), (R, 3, N, H)),
        "attn_vec_einsum": ((N, H, R), (R, D)),
        "gating_einsum": ((2, F, R), (R, D)),  # contracted last: the input side is lora_b (D from its side)
        "linear": ((F, R), (R, D)),
    }


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_factored_equals_merged_and_each_update_has_rank_r(jit):
    lora, config, params, x, frozen, adapters = make()
    adapters = perturb(adapters)  # lora_b non-zero
    apply = jax.jit(lora.apply) if jit else lora.apply
    merged = jlora.merge(frozen, adapters, config)
    np.testing.assert_allclose(apply(frozen, adapters, x), gemma_block(merged, x), rtol=1e-4, atol=1e-4)
    for name, contracted in CONTRACTED.items():
        m = delta_matrix(params[name]["w"], merged[name]["w"], contracted)
        assert np.linalg.matrix_rank(m, tol=1e-5 * np.abs(m).max()) == R, name  # <= r, and exactly r here


def test_gradients_equal_merge_then_apply():
    lora, config, _, x, frozen, adapters = make()
    adapters = perturb(adapters, scale=0.05)

    def factored(a):
        return jnp.sum(jnp.tanh(lora.apply(frozen, a, x)))

    def reference(a):
        return jnp.sum(jnp.tanh(gemma_block(jlora.merge(frozen, a, config), x)))

    got, want = jax.grad(factored)(adapters), jax.grad(reference)(adapters)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))


def test_unmerge_and_checkpoint_read_the_layout_back(tmp_path):
    lora, config, params, x, frozen, adapters = make()
    adapters = perturb(adapters)
    back = jlora.unmerge(jlora.merge(frozen, adapters, config), adapters, config)
    for name in EINSUMS:
        np.testing.assert_allclose(back[name]["w"], params[name]["w"], atol=1e-5)
    jlora.save_adapters(tmp_path / "ckpt", adapters, config, variables=frozen)
    loaded, loaded_config = jlora.load_adapters(tmp_path / "ckpt", variables=frozen)
    lay = read_layout("q", (N, D, H), loaded["q_einsum"]["w"]["lora_a"].shape, loaded["q_einsum"]["w"]["lora_b"].shape)
    assert lay.a_idx == (1,) and lay.b_idx == (0, 2)
    np.testing.assert_allclose(jlora.lora_transform(gemma_block, loaded_config).apply(frozen, loaded, x),
                               lora.apply(frozen, adapters, x), atol=1e-6)


def test_parameter_count_of_a_gemma_block():
    """The issue's block, N=8, D=256, H=32, r=8: the q_einsum pair had N times the parameters of rank-r LoRA."""
    n, d, h, r = 8, 256, 32, 8
    w = {"w": jnp.zeros((n, d, h))}
    _, adapters = jlora.lora_transform(
        lambda p, x: jnp.einsum("BTD,NDH->BTNH", x, p["w"]), jlora.LoraConfig(rank=r, targets=("w",))
    ).init(w, jnp.zeros((1, 2, d)), key=jax.random.key(0))
    assert sum(a.size for a in jax.tree.leaves(adapters)) == d * r + r * n * h == 4096  # was n*d*r + r*h = 16,640


def test_coinciding_sizes_fall_back_to_the_leading_layout_with_a_warning():
    """W (D, D, H) contracted on the middle axis: a (D, r) / b (r, D, H) would read back as the leading layout, so
    lora.init says so and uses the leading one (which reads back unambiguously)."""
    w = {"w": jax.random.normal(jax.random.key(0), (D, D, H))}
    fn = lambda p, x: jnp.einsum("BD,NDH->BNH", x, p["w"])  # noqa: E731
    with pytest.warns(LayoutWarning, match=r"same sizes.*leading axes \[0, 1\]"):
        _, adapters = jlora.lora_transform(fn, jlora.LoraConfig(rank=R, targets=("w",))).init(
            w, jnp.ones((2, D)), key=jax.random.key(1))
    assert adapters["w"]["lora_a"].shape == (D, D, R) and adapters["w"]["lora_b"].shape == (R, H)


def test_uses_that_contract_different_axes_are_said():
    w = {"w": jax.random.normal(jax.random.key(0), (N, D, H))}

    def fn(p, x, y):
        return jnp.einsum("BD,NDH->BNH", x, p["w"]).sum() + jnp.einsum("BN,NDH->BDH", y, p["w"]).sum()

    with pytest.warns(LayoutWarning, match=r"contract different axes"):
        jlora.lora_transform(fn, jlora.LoraConfig(rank=R, targets=("w",))).init(
            w, jnp.ones((2, D)), jnp.ones((2, N)), key=jax.random.key(1))


def test_ambiguous_shapes_are_an_error_on_read_back():
    with pytest.raises(ValueError, match="do not say which"):
        read_layout("w", (5, D, D), (D, R), (R, 5, D))  # lora_a on axis 1 or axis 2

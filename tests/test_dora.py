"""DoRA (`LoraConfig(dora=True)`, jlora.variants.dora) without torch: the formula on every layout, dropout as PEFT
applies it, merge / unmerge, the compiled step's dots (no (in, out) product), checkpoints, optimizer masks, retracing
and the errors. PEFT itself is the oracle in test_dora_peft.py.

    python -m pytest -q tests/test_dora.py
"""

from __future__ import annotations

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import perturb

import jlora
from jlora.merge import dora_norms  # jlora.dora_norms once exported
from jlora.paths import flatten_adapters

IN, OUT, R = 11, 19, 7
TOL = dict(rtol=1e-5, atol=1e-5)


class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(OUT, name="q")(x)


def _dense(dropout=0.0, **kw):
    x = jax.random.normal(jax.random.key(0), (5, IN))
    model = Dense()
    variables = model.init(jax.random.key(1), x)
    config = jlora.LoraConfig(rank=R, alpha=3.0, targets=("q",), dora=True, dropout=dropout, **kw)
    lora = jlora.lora_transform(model.apply, config, strict=True)
    frozen, adapters = lora.init(variables, x, key=jax.random.key(2))
    return model, x, config, lora, frozen, perturb(adapters)


def _reference(frozen, pair, x, scale, xd=None):
    """PEFT's DoRA Linear: x @ W + bias + (g - 1) * (xd @ W) + g * s * (xd @ A) @ B, g = m / ||W + s A B||_col."""
    w, bias = frozen["params"]["q"]["kernel"], frozen["params"]["q"]["bias"]
    v = w + scale * pair["lora_a"] @ pair["lora_b"]
    g = pair["magnitude"] / jnp.linalg.norm(v, axis=0, keepdims=True)
    xd = x if xd is None else xd
    return x @ w + bias + (g - 1) * (xd @ w) + g * (scale * (xd @ pair["lora_a"]) @ pair["lora_b"])


def test_dense_formula_eager_and_jit():
    _, x, _config, lora, frozen, adapters = _dense()
    pair = adapters["params"]["q"]["kernel"]
    assert pair["magnitude"].shape == (1, OUT)
    want = _reference(frozen, pair, x, 3.0 / R)
    np.testing.assert_allclose(lora.apply(frozen, adapters, x), want, **TOL)
    np.testing.assert_allclose(jax.jit(lora.apply)(frozen, adapters, x), want, **TOL)


def test_init_magnitude_is_the_weight_norm_and_output_unchanged():
    model, x, _config, lora, frozen, _ = _dense()
    _, adapters = lora.init(frozen | {}, x, key=jax.random.key(2))
    m = adapters["params"]["q"]["kernel"]["magnitude"]
    np.testing.assert_allclose(m, jnp.linalg.norm(frozen["params"]["q"]["kernel"], axis=0, keepdims=True), **TOL)
    np.testing.assert_allclose(lora.apply(frozen, adapters, x), model.apply(frozen, x), **TOL)


def test_dropout_as_peft_applies_it():
    """With LoRA dropout the base output is not rescaled as a whole: x @ W + (g - 1) * (xd @ W) + g * s * ..."""
    _, x, _config, lora, frozen, adapters = _dense(dropout=0.5)
    key = jax.random.key(7)
    keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, x.shape)  # the interpreter's first branch key
    xd = jnp.where(keep, x / 0.5, 0.0)
    want = _reference(frozen, adapters["params"]["q"]["kernel"], x, 3.0 / R, xd)
    np.testing.assert_allclose(lora.apply(frozen, adapters, x, dropout_key=key), want, **TOL)


def test_gradients_treat_the_norm_as_constant():
    """d/d(a, b, m) of lora.apply = those of the reference with the norm under stop_gradient (PEFT's detach)."""
    _, x, _config, lora, frozen, adapters = _dense()
    pair = adapters["params"]["q"]["kernel"]

    def ref(pair):
        w = frozen["params"]["q"]["kernel"]
        n = jax.lax.stop_gradient(jnp.linalg.norm(w + 3.0 / R * pair["lora_a"] @ pair["lora_b"], axis=0))
        v = w + 3.0 / R * pair["lora_a"] @ pair["lora_b"]
        return jnp.sum(jnp.sin(x @ (pair["magnitude"] / n * v) + frozen["params"]["q"]["bias"]))

    got = jax.grad(lambda ad: jnp.sum(jnp.sin(lora.apply(frozen, ad, x))))(adapters)["params"]["q"]["kernel"]
    want = jax.grad(ref)(pair)
    for k in ("lora_a", "lora_b", "magnitude"):
        np.testing.assert_allclose(got[k], want[k], err_msg=k, **TOL)


def test_merge_and_unmerge_are_exact():
    model, x, config, lora, frozen, adapters = _dense()
    merged = jlora.merge(frozen, adapters, config)
    np.testing.assert_allclose(model.apply(merged, x), lora.apply(frozen, adapters, x), **TOL)
    with pytest.raises(ValueError, match=r"jlora.dora_norms\(frozen, adapters, config\)"):
        jlora.unmerge(merged, adapters, config)
    norms = dora_norms(frozen, adapters, config)
    back = jlora.unmerge(merged, adapters, config, norms=norms)
    np.testing.assert_allclose(back["params"]["q"]["kernel"], frozen["params"]["q"]["kernel"], **TOL)


class Layouts(nn.Module):
    """A fused projection (q|k|v), a kernel used transposed, a conv, an embedding lookup, and a tied head."""

    @nn.compact
    def __call__(self, ids, img):
        emb = nn.Embed(23, 12, name="emb")
        h = emb(ids)  # (B, T, 12)
        qkv = nn.Dense(3 * 8, name="c_attn")(h)
        wt = self.param("proj", nn.initializers.normal(0.3), (13, 24))  # (out, in), used as x @ W.T
        h = jnp.tanh(qkv) @ wt.T
        c = nn.Conv(5, (3, 2), name="conv")(img).mean((1, 2))
        return h.sum(-1) + c.sum(-1)[:, None]


def _layouts(targets, **kw):
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 23)
    img = jax.random.normal(jax.random.key(1), (2, 7, 9, 3))
    model = Layouts()
    variables = model.init(jax.random.key(2), ids, img)
    config = jlora.LoraConfig(rank=3, alpha=5.0, targets=targets, dora=True, **kw)
    lora = jlora.lora_transform(model.apply, config, strict=True)
    frozen, adapters = lora.init(variables, ids, img, key=jax.random.key(3))
    return model, (ids, img), config, lora, frozen, perturb(adapters)


def test_layouts_fused_transposed_conv_embedding():
    """Every layout equals model.apply on the merged weights (jit too); the magnitudes have W's rank, size 1 on
    the input axes; a fused projection's covers its enabled slices only, and a disabled slice keeps its output."""
    model, args, config, lora, frozen, adapters = _layouts(("emb", "c_attn", "proj", "conv"),
                                                           fused={"c_attn": (True, False, True)})
    pairs, _ = flatten_adapters(adapters)
    shapes = {p.split("/")[1]: pair["magnitude"].shape for p, pair in pairs.items()}
    assert shapes == {"emb": (1, 12), "c_attn": (1, 16), "proj": (13, 1), "conv": (1, 1, 1, 5)}
    merged = jlora.merge(frozen, adapters, config)
    want = model.apply(merged, *args)
    np.testing.assert_allclose(jax.jit(lora.apply)(frozen, adapters, *args), want, **TOL)  # eager: the dense test
    w, wm = frozen["params"]["c_attn"]["kernel"], merged["params"]["c_attn"]["kernel"]
    np.testing.assert_array_equal(wm[:, 8:16], w[:, 8:16])  # the disabled k slice: g = 1, no update
    back = jlora.unmerge(merged, adapters, config, norms=dora_norms(frozen, adapters, config))
    for p in pairs:
        leaf_back, leaf_frozen = back, frozen
        for k in p.split("/"):
            leaf_back, leaf_frozen = leaf_back[k], leaf_frozen[k]
        np.testing.assert_allclose(leaf_back, leaf_frozen, err_msg=p, **TOL)


def test_tied_head_falls_back_with_a_warning():
    """A tied embedding's attend contracts the axes the gain lies on: no factored form, so the fallback
    materialises g * (W + s a b), with the usual FactoredFallbackWarning, and stays exact."""

    class Tied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(23, 12, name="emb")
            return emb.attend(jnp.tanh(emb(ids)))

    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 23)
    model = Tied()
    variables = model.init(jax.random.key(2), ids)
    config = jlora.LoraConfig(rank=3, alpha=5.0, targets=("emb",), dora=True)
    lora = jlora.lora_transform(model.apply, config)
    frozen, adapters = lora.init(variables, ids, key=jax.random.key(3))
    adapters = perturb(adapters)
    with pytest.warns(jlora.FactoredFallbackWarning, match="emb"):
        got = lora.apply(frozen, adapters, ids)
    np.testing.assert_allclose(got, model.apply(jlora.merge(frozen, adapters, config), ids), **TOL)


def test_scan_stacked_layers():
    """An nn.scan-stacked kernel (L, in, out): one magnitude row per layer, (L, 1, out)."""
    w = jax.random.normal(jax.random.key(0), (3, IN, IN)) / IN**0.5

    def fn(params, x):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, params["layers"]["kernel"])[0]

    x = jax.random.normal(jax.random.key(1), (4, IN))
    config = jlora.LoraConfig(rank=R, alpha=3.0, targets=("layers",), dora=True)
    lora = jlora.lora_transform(fn, config, strict=True)
    frozen, adapters = lora.init({"layers": {"kernel": w}}, x, key=jax.random.key(2))
    adapters = perturb(adapters)
    assert adapters["layers"]["kernel"]["magnitude"].shape == (3, 1, IN)
    want = fn(jlora.merge(frozen, adapters, config), x)
    np.testing.assert_allclose(jax.jit(lora.apply)(frozen, adapters, x), want, **TOL)


_DOT = re.compile(r"dot_general\b.*->\s*tensor<([0-9x]+)xf32>")


def test_step_forms_no_in_out_product_and_costs_little_more_than_lora():
    """The compiled DoRA train step has no dot producing an (in, out) (or (out, in)) tensor, as test_cost checks
    for LoRA, and XLA counts at most 10 % more FLOPs than the LoRA step."""
    d_in, d_out = 64, 96
    x = jax.random.normal(jax.random.key(0), (256, d_in))  # tokens: the norms cost ~ (2r + 2) in out per step

    def fn(params, x):
        return jnp.tanh(x @ params["q"]["kernel"]) @ params["o"]["kernel"]

    params = {"q": {"kernel": jnp.ones((d_in, d_out)) / 8}, "o": {"kernel": jnp.ones((d_out, d_in)) / 8}}
    costs, texts = {}, {}
    for dora in (False, True):
        config = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q", "o"), dora=dora)
        lora = jlora.lora_transform(fn, config, strict=True)
        frozen, adapters = lora.init(params, x, key=jax.random.key(1))

        def step(adapters, lora=lora, frozen=frozen):
            return jax.grad(lambda ad: jnp.sum(lora.apply(frozen, ad, x) ** 2))(adapters)

        lowered = jax.jit(step).lower(adapters)
        texts[dora] = lowered.as_text()
        costs[dora] = lowered.compile().cost_analysis()
        costs[dora] = (costs[dora][0] if isinstance(costs[dora], list) else costs[dora])["flops"]
    shapes = {tuple(int(n) for n in m.group(1).split("x")) for m in _DOT.finditer(texts[True])}
    assert shapes and not shapes & {(d_in, d_out), (d_out, d_in)}, shapes
    assert (d_out, 4) in shapes or (4, d_out) in shapes  # W^T a: the one (out, r) product per weight
    assert costs[True] <= 1.10 * costs[False], costs


def test_checkpoint_mask_and_no_retrace(tmp_path):
    """save_adapters / load_adapters keep the magnitude and config.dora; trainable_mask and masked_optimizer train
    the magnitude; a jitted train step traces once."""
    _, x, config, lora, frozen, adapters = _dense()
    jlora.save_adapters(tmp_path / "ck", adapters, config, variables=frozen)
    loaded, loaded_config = jlora.load_adapters(tmp_path / "ck", variables=frozen)
    assert loaded_config.dora and loaded_config == config
    chex.assert_trees_all_equal(loaded, adapters)
    assert jlora.trainable_mask(adapters)["params"]["q"]["kernel"]["magnitude"]
    tx = jlora.masked_optimizer(optax.adam(1e-2), config)
    state = tx.init(adapters)

    def step(adapters, state, x):
        grads = jax.grad(lambda ad: jnp.sum(lora.apply(frozen, ad, x) ** 2))(adapters)
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state

    chex.clear_trace_counter()
    jstep = jax.jit(chex.assert_max_traces(step, n=1))
    new = adapters
    for seed in range(3):
        new, state = jstep(new, state, x + seed)
    m0, m1 = adapters["params"]["q"]["kernel"]["magnitude"], new["params"]["q"]["kernel"]["magnitude"]
    assert np.abs(np.asarray(m1 - m0)).max() > 1e-3


def test_errors():
    _, x, config, lora, frozen, adapters = _dense()
    with pytest.raises(TypeError, match="LoraConfig.dora"):
        jlora.LoraConfig(targets=("q",), dora="yes")
    plain = jlora.LoraConfig(rank=R, alpha=3.0, targets=("q",))
    with pytest.raises(ValueError, match="config.dora is False"):
        jlora.lora_transform(Dense().apply, plain).apply(frozen, adapters, x)
    pair = adapters["params"]["q"]["kernel"]
    no_m = {"params": {"q": {"kernel": {k: pair[k] for k in ("lora_a", "lora_b")}}}}
    with pytest.raises(ValueError, match="no 'magnitude'"):
        lora.apply(frozen, no_m, x)
    bad = {"params": {"q": {"kernel": {**pair, "magnitude": pair["magnitude"].T}}}}
    with pytest.raises(ValueError, match=r"magnitude \(19, 1\) does not fit"):
        lora.apply(frozen, bad, x)
    with pytest.raises(ValueError, match="DoRA adapters .* cannot be stacked"):
        jlora.multi.stack([adapters, adapters], [config, config])
    with pytest.raises(ValueError, match="DoRA"):
        jlora.combine_adapters([adapters, adapters], [0.5, 0.5], configs=[config, config], method="linear")
    from jlora.interop.loralib import to_loralib

    with pytest.raises(ValueError, match="no loralib equivalent"):
        to_loralib(adapters, config)


def test_fused_dora_has_no_peft_export(tmp_path):
    from jlora.interop import save_peft

    _, _, config, _, frozen, adapters = _layouts(("c_attn",), fused={"c_attn": (True, False, True)})
    with pytest.raises(ValueError, match="fused projection has no PEFT"):
        save_peft(tmp_path / "p", adapters, config, variables=frozen, base_model_name_or_path="x")

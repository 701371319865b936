"""PiSSA / OLoRA initialisation (`LoraConfig(init="pissa" | "pissa_niter_K" | "olora")`): the base becomes the
residual, the output is unchanged at step 0, and `convert_to_plain_lora` gives the same model on the original base."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.interop import save_peft
from jlora.layout import delta, read_layout
from jlora.variants.convert import convert_to_plain_lora
from jlora.variants.init import RewrittenBaseWarning

IN, OUT, R, ALPHA = 11, 19, 7, 3.0
INITS = ["pissa", "pissa_niter_4", "olora"]


class Net(nn.Module):
    @nn.compact
    def __call__(self, tokens, image):
        x = nn.Embed(23, IN, name="emb")(tokens)
        h = nn.Dense(OUT, name="q")(x) + nn.Dense(3 * 6, name="qkv")(x).sum(-1, keepdims=True)
        c = nn.Conv(5, (3, 2), name="conv")(image)
        return h.sum() + c.sum(), h, c


TOKENS = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
IMAGE = jax.random.normal(jax.random.key(3), (2, 6, 5, 4))
VARS = Net().init(jax.random.key(0), TOKENS, IMAGE)


def _config(init, **kw):
    return jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("emb", "q", "qkv", "conv"), init=init,
                            fused={"qkv": (True, False, True)}, rank_pattern={"conv": 4, "qkv": 3}, **kw)


def _pairs(adapters):
    return jlora.paths.flatten_adapters(adapters)[0]


def _weights(tree):
    return dict(jlora.paths.named_leaves(tree))


@pytest.mark.parametrize("init", INITS)
def test_output_unchanged_and_frozen_is_the_residual(init):
    config = _config(init)
    lora = jlora.lora_transform(Net().apply, config)
    frozen, adapters = lora.init(VARS, TOKENS, IMAGE, key=jax.random.key(1))
    want = Net().apply(VARS, TOKENS, IMAGE)
    for apply in (lora.apply, jax.jit(lora.apply)):
        got = apply(frozen, adapters, TOKENS, IMAGE)
        for g, w in zip(got[1:], want[1:]):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    base, res = _weights(VARS), _weights(frozen)
    for path, pair in _pairs(adapters).items():
        assert np.abs(pair["lora_b"]).max() > 0.1 and np.abs(pair["lora_a"]).max() > 0.1, path
        assert np.abs(res[path] - base[path]).max() > 1e-2, path  # the base really was rewritten
        lay = read_layout(path, base[path].shape, pair["lora_a"].shape, pair["lora_b"].shape, config.fused_for(path))
        np.testing.assert_allclose(res[path] + delta(pair["lora_a"], pair["lora_b"], lay, config.scale_for(path)),
                                   base[path], rtol=1e-5, atol=1e-5)


def test_merge_at_init_gives_back_the_original_weights():
    config = _config("olora")
    frozen, adapters = jlora.lora_transform(Net().apply, config).init(VARS, TOKENS, IMAGE, key=jax.random.key(1))
    merged = jlora.merge(frozen, adapters, config)
    for path, w in _weights(VARS).items():
        np.testing.assert_allclose(_weights(merged)[path], w, rtol=1e-5, atol=1e-5, err_msg=path)
    unmerged = _weights(jlora.unmerge(merged, adapters, config))
    for path, w in _weights(frozen).items():
        np.testing.assert_allclose(unmerged[path], w, rtol=1e-5, atol=1e-5, err_msg=path)


def test_pissa_takes_the_principal_directions():
    config = _config("pissa")
    frozen, adapters = jlora.lora_transform(Net().apply, config).init(VARS, TOKENS, IMAGE, key=jax.random.key(1))
    w = np.asarray(VARS["params"]["q"]["kernel"])
    pair = adapters["params"]["q"]["kernel"]
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    best = (u[:, :R] * s[:R]) @ vh[:R]  # Eckart-Young: the best rank-R approximation
    np.testing.assert_allclose(config.scale_for("params/q/kernel") * pair["lora_a"] @ pair["lora_b"], best,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(frozen["params"]["q"]["kernel"], compute_uv=False)[: IN - R],
                               s[R:], rtol=1e-4)


def test_scan_stacked_weight_gets_one_factorisation_per_layer():
    def fn(v, x):
        return jnp.einsum("lbi,lio->lbo", x, v["params"]["layers"]["kernel"])

    v = {"params": {"layers": {"kernel": jax.random.normal(jax.random.key(0), (3, IN, OUT))}}}
    x = jax.random.normal(jax.random.key(1), (3, 5, IN))
    config = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("layers",), init="pissa")
    lora = jlora.lora_transform(fn, config)
    frozen, adapters = lora.init(v, x, key=jax.random.key(2))
    assert adapters["params"]["layers"]["kernel"]["lora_b"].shape == (3, R, OUT)
    np.testing.assert_allclose(lora.apply(frozen, adapters, x), fn(v, x), rtol=1e-5, atol=1e-5)
    s_res = np.linalg.svd(np.asarray(frozen["params"]["layers"]["kernel"]), compute_uv=False)
    s_w = np.linalg.svd(np.asarray(v["params"]["layers"]["kernel"]), compute_uv=False)
    np.testing.assert_allclose(s_res[:, : IN - R], s_w[:, R:], rtol=1e-4, atol=1e-5)  # each layer's tail
    plain, plain_config = convert_to_plain_lora(adapters, adapters, config)
    np.testing.assert_allclose(jlora.lora_transform(fn, plain_config).apply(v, plain, x), fn(v, x), rtol=1e-5,
                               atol=1e-5)


def test_olora_b_has_orthonormal_rows():
    _, adapters = jlora.lora_transform(Net().apply, _config("olora")).init(VARS, TOKENS, IMAGE, key=jax.random.key(1))
    b = np.asarray(adapters["params"]["q"]["kernel"]["lora_b"])
    np.testing.assert_allclose(b @ b.T, np.eye(R), atol=1e-5)


def test_pissa_niter_uses_the_key():
    lora = jlora.lora_transform(Net().apply, _config("pissa_niter_1"))
    a1 = lora.init(VARS, TOKENS, IMAGE, key=jax.random.key(1))[1]["params"]["q"]["kernel"]["lora_a"]
    a1b = lora.init(VARS, TOKENS, IMAGE, key=jax.random.key(1))[1]["params"]["q"]["kernel"]["lora_a"]
    a2 = lora.init(VARS, TOKENS, IMAGE, key=jax.random.key(2))[1]["params"]["q"]["kernel"]["lora_a"]
    np.testing.assert_array_equal(a1, a1b)
    assert np.abs(np.asarray(a1) - np.asarray(a2)).max() > 1e-4


def test_bfloat16_base_keeps_its_dtype():
    v16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), VARS)
    frozen, adapters = jlora.lora_transform(Net().apply, _config("pissa")).init(v16, TOKENS, IMAGE,
                                                                              key=jax.random.key(1))
    assert frozen["params"]["q"]["kernel"].dtype == jnp.bfloat16
    assert adapters["params"]["q"]["kernel"]["lora_a"].dtype == jnp.float32


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_convert_to_plain_lora_applies_to_the_original_base(init):
    config = _config(init)
    lora = jlora.lora_transform(Net().apply, config)
    frozen, initial = lora.init(VARS, TOKENS, IMAGE, key=jax.random.key(1))
    rng = np.random.default_rng(0)
    trained = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), initial)
    plain, plain_config = convert_to_plain_lora(trained, initial, config)
    assert plain_config.init == "loralib" and plain_config.rank == 2 * R
    assert plain_config.rank_for("params/conv/kernel") == 8
    for path in _pairs(plain):
        assert plain_config.scale_for(path) == pytest.approx(config.scale_for(path))
    want = lora.apply(frozen, trained, TOKENS, IMAGE)
    got = jlora.lora_transform(Net().apply, plain_config).apply(VARS, plain, TOKENS, IMAGE)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_convert_rslora_keeps_the_scale():
    config = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("q",), init="pissa", scaling="rslora",
                              alpha_pattern={"q": 5.0})
    _, initial = jlora.lora_transform(Net().apply, config).init(VARS, TOKENS, IMAGE, key=jax.random.key(1))
    _, plain_config = convert_to_plain_lora(initial, initial, config)
    assert plain_config.scale_for("params/q/kernel") == pytest.approx(config.scale_for("params/q/kernel"))


def test_convert_errors():
    config = _config("pissa")
    _, initial = jlora.lora_transform(Net().apply, config).init(VARS, TOKENS, IMAGE, key=jax.random.key(1))
    with pytest.raises(ValueError, match="leaves the base as it is"):
        convert_to_plain_lora(initial, initial, _config("loralib"))
    partial = {"params": {k: v for k, v in initial["params"].items() if k != "q"}}
    with pytest.raises(ValueError, match="params/q/kernel: missing from initial_adapters"):
        convert_to_plain_lora(initial, partial, config)


def test_rank_above_the_weight_is_an_error():
    config = jlora.LoraConfig(rank=12, targets=("q",), init="pissa")
    with pytest.raises(ValueError, match=r"params/q/kernel: init='pissa' takes r = 12 .* only 11"):
        jlora.lora_transform(Net().apply, config).init(VARS, TOKENS, IMAGE, key=jax.random.key(1))


def test_quantized_base_is_an_error():
    config = jlora.LoraConfig(rank=4, targets=("q",), init="olora")
    qvars = jlora.quantize(VARS, qtype="int8", block_size=11, targets="params/q/kernel")
    with pytest.raises(ValueError, match="params/q/kernel: init='olora' rewrites the base .* quantized"):
        jlora.lora_transform(Net().apply, config).init(qvars, TOKENS, IMAGE, key=jax.random.key(1))


@pytest.mark.parametrize("init", ["pissa_niter_", "pissa_niter_x", "svd"])
def test_bad_init_names(init):
    with pytest.raises(ValueError, match="pissa_niter_<K>"):
        jlora.LoraConfig(targets=("q",), init=init)


# --- checkpoints and PEFT export of adapters whose init rewrote the base ------------------------------------------


@pytest.fixture(scope="module")
def pissa_q():
    config = jlora.LoraConfig(rank=R, alpha=ALPHA, targets=("q",), init="pissa")
    frozen, adapters = jlora.lora_transform(Net().apply, config).init(VARS, TOKENS, IMAGE, key=jax.random.key(1))
    return config, frozen, adapters


def test_checkpoint_records_the_init_and_refuses_the_original_base(pissa_q, tmp_path):
    config, frozen, adapters = pissa_q
    jlora.save_adapters(tmp_path / "a", adapters, config, variables=frozen)
    loaded, back = jlora.load_adapters(tmp_path / "a", variables=frozen)  # the residual: checked, no warning
    assert back.init == "pissa"
    np.testing.assert_array_equal(loaded["params"]["q"]["kernel"]["lora_a"],
                                  adapters["params"]["q"]["kernel"]["lora_a"])
    with pytest.raises(ValueError, match=r"(?s)params/q/kernel: weights differ.*init='pissa', which rewrote each "
                                         r"targeted weight to the residual.*convert_to_plain_lora"):
        jlora.load_adapters(tmp_path / "a", variables=VARS)
    with pytest.warns(RewrittenBaseWarning, match=r"init='pissa'.*\['params/q/kernel'\] could not be checked"):
        jlora.load_adapters(tmp_path / "a", variables=VARS, check_weights=False)
    jlora.save_adapters(tmp_path / "b", adapters, config)  # no fingerprint: nothing to check the base against
    with pytest.warns(RewrittenBaseWarning, match="saved without variables="):
        jlora.load_adapters(tmp_path / "b", variables=VARS)


@pytest.mark.parametrize("init, targets, kwargs, match", [
    ("pissa_niter_2", ("q",), {}, "PEFT would redo that randomized SVD"),
    ("pissa", ("emb",), {}, "params/emb/embedding: .*an embedding gets its plain init"),
    ("olora", ("conv",), {}, "params/conv/kernel: .*a conv an error"),
    ("olora", ("q",), {"fan_in_fan_out": True}, "untransposed"),
])
def test_save_peft_refuses_what_peft_would_not_rebuild(init, targets, kwargs, match, tmp_path):
    config = jlora.LoraConfig(rank=4, alpha=ALPHA, targets=targets, init=init)
    _, adapters = jlora.lora_transform(Net().apply, config).init(VARS, TOKENS, IMAGE, key=jax.random.key(1))
    with pytest.raises(ValueError, match="(?s)" + match + ".*convert_to_plain_lora"):
        save_peft(tmp_path / "a", adapters, config, base_model_name_or_path="tiny", **kwargs)
    assert not (tmp_path / "a").exists()

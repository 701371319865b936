"""Adapters checked against the config and the variables in apply / merge / unmerge: no silently wrong scale."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb

import jlora
from jlora.validate import check_adapters, check_pairs


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(19, name="query")(x)
        h = nn.Dense(17, name="value")(jnp.tanh(h))
        return nn.Dense(13, name="head")(h)


X = jax.random.normal(jax.random.key(0), (5, 11))
MODEL = Net()
VARS = MODEL.init(jax.random.key(0), X)
QV = ("query", "value")


@functools.cache
def _init(items):
    cfg = jlora.LoraConfig(**{"alpha": 3.0, "targets": QV, **dict(items)})
    return jlora.lora_transform(MODEL.apply, cfg).init(VARS, X, key=jax.random.key(1))


def made_with(**kwargs):
    """Fresh containers of (frozen, adapters) from lora.init with LoraConfig(alpha=3, targets=QV, **kwargs)."""
    return jax.tree.map(lambda x: x, _init(tuple(sorted((k, tuple(v.items()) if isinstance(v, dict) else v)
                                                        for k, v in kwargs.items()))))


def all_uses(cfg, frozen, adapters, match):
    """apply (eager and jit), merge, unmerge and check_adapters under `cfg` all raise a ValueError matching."""
    lora = jlora.lora_transform(MODEL.apply, cfg)
    with pytest.raises(ValueError, match=match):
        lora.apply(frozen, adapters, X)
    with pytest.raises(ValueError, match=match):
        jax.jit(lora.apply)(frozen, adapters, X)
    with pytest.raises(ValueError, match=match):
        jlora.merge(frozen, adapters, cfg)
    with pytest.raises(ValueError, match=match):
        jax.jit(jlora.merge, static_argnums=2)(frozen, adapters, cfg)
    with pytest.raises(ValueError, match=match):
        jlora.unmerge(VARS, adapters, cfg)
    with pytest.raises(ValueError, match=match):
        check_adapters(frozen, adapters, cfg)


def test_rank_8_adapters_under_a_rank_4_config_raise():
    frozen, ad8 = made_with(rank=8)
    ad8 = perturb(ad8)  # lora_b non-zero: the equivalence check below is not vacuous
    cfg4 = jlora.LoraConfig(rank=4, alpha=3.0, targets=QV)
    match = (r"params/query/kernel: lora_a \(11, 8\) / lora_b \(8, 19\) are rank-8 adapters, but the config gives "
             r"rank 4 \(config.rank=4\)(.|\n)*load_adapters")
    all_uses(cfg4, frozen, ad8, match)
    with pytest.raises(ValueError, match=match):
        check_pairs(ad8, cfg4)
    # the config they were made with still works, and equals the merged model
    cfg8 = jlora.LoraConfig(rank=8, alpha=3.0, targets=QV)
    y = jax.jit(jlora.lora_transform(MODEL.apply, cfg8).apply)(frozen, ad8, X)
    np.testing.assert_allclose(y, MODEL.apply(jlora.merge(frozen, ad8, cfg8), X), atol=1e-5)


def test_rank_pattern_mismatch_raises():
    frozen, ad = made_with(rank=7, rank_pattern={"value": 2})
    match = r"params/value/kernel: lora_a \(19, 2\) / lora_b \(2, 17\) are rank-2 adapters, but .* rank 7"
    all_uses(jlora.LoraConfig(rank=7, alpha=3.0, targets=QV), frozen, ad, match)
    frozen, ad = made_with(rank=7)
    match = r"params/value/kernel.*rank-7 adapters, but the config gives rank 2 \(config.rank_pattern\['value'\]\)"
    all_uses(jlora.LoraConfig(rank=7, alpha=3.0, targets=QV, rank_pattern={"value": 2}), frozen, ad, match)


def test_pair_under_rank_pattern_0_raises():
    _, ad = made_with(rank=7)
    cfg = jlora.LoraConfig(rank=7, targets=QV, rank_pattern={"value": 0})
    with pytest.raises(ValueError, match=r"params/value/kernel: .*config.rank_pattern\['value'\] gives it rank 0"):
        check_pairs(ad, cfg)


def test_fused_layout_mismatch_raises():
    def fn(p, x):
        return x @ p["c_attn"]

    params = {"c_attn": jax.random.normal(jax.random.key(2), (11, 18))}
    fused = jlora.LoraConfig(rank=3, alpha=2.0, targets=("c_attn",), fused={"c_attn": (True, False, True)})
    plain = jlora.LoraConfig(rank=3, alpha=2.0, targets=("c_attn",))
    for made, used, match in ((fused, plain, r"c_attn: lora_a \(11, 6\) / lora_b \(3, 12\) .*fused layout"),
                              (plain, fused, r"c_attn: lora_a \(11, 3\) / lora_b \(3, 18\).*fused mask "
                                             r"\(True, False, True\).*last axis 6")):
        frozen, ad = jlora.lora_transform(fn, made).init(params, X, key=jax.random.key(1))
        lora = jlora.lora_transform(fn, used)
        for run in (lora.apply, jax.jit(lora.apply)):
            with pytest.raises(ValueError, match=match):
                run(frozen, ad, X)
        with pytest.raises(ValueError, match=match):
            jlora.merge(frozen, ad, used)


def test_target_without_a_pair_raises():
    frozen, ad = made_with(rank=7)
    del ad["params"]["value"]["kernel"]
    all_uses(jlora.LoraConfig(rank=7, alpha=3.0, targets=QV), frozen, ad,
             r"selects params/value/kernel, but the adapters have no lora pair there")


def test_pair_on_an_untargeted_weight_raises():
    frozen, ad = made_with(rank=7)
    all_uses(jlora.LoraConfig(rank=7, alpha=3.0, targets=("query",)), frozen, ad,
             r"lora pairs at params/value/kernel, which the config \(targets=\('query',\)\) does not target")


def test_missing_leaf_trained_in_full_raises():
    cfg = jlora.LoraConfig(rank=7, alpha=3.0, targets=QV, bias="lora_only")
    frozen, ad = made_with(rank=7, bias="lora_only")
    del ad["params"]["value"]["bias"]
    match = r"trains params/value/bias in full \(bias='lora_only'.*lack them"
    lora = jlora.lora_transform(MODEL.apply, cfg)
    for run in (lora.apply, jax.jit(lora.apply)):
        with pytest.raises(ValueError, match=match):
            run(frozen, ad, X)
        with pytest.raises(ValueError, match=r"trains params/query/bias, params/value/bias in full"):
            # the full variables and the lora pairs alone: the base biases would be used silently
            run(VARS, {"params": {k: {"kernel": v["kernel"]} for k, v in ad["params"].items()}}, X)
    with pytest.raises(ValueError, match=match):
        jlora.merge(VARS, ad, cfg)
    _, pairs_only = made_with(rank=7)
    with pytest.raises(ValueError, match=r"trains params/query/bias, params/value/bias in full"):
        jlora.unmerge(VARS, pairs_only, cfg)


def test_leaf_trained_in_full_the_config_does_not_train_raises():
    frozen, ad = made_with(rank=7, bias="all")
    cfg = jlora.LoraConfig(rank=7, alpha=3.0, targets=QV, bias="lora_only")
    with pytest.raises(ValueError, match=r"arrays at params/head/bias, which the config \(bias='lora_only'"):
        jlora.merge(frozen, ad, cfg)
    ad["params"]["head"]["bias"] = jnp.ones(4)
    with pytest.raises(ValueError, match=r"params/head/bias: adapters \(4,\), variables \(13,\)"):
        check_adapters(VARS, ad, jlora.LoraConfig(rank=7, alpha=3.0, targets=QV, bias="all"))


@pytest.mark.parametrize("pair, match", [
    ({"lora_a": jnp.ones((11, 7))}, r"lora pair at 'params/query/kernel' .* found \['lora_a'\] \(lora_b missing\)"),
    ({"lora_a": jnp.ones((11, 7)), "lora_b": jnp.ones((7, 19)), "scale": jnp.ones(())},
     r"lora pair at 'params/query/kernel' .* \(extra \['scale'\]\)"),
])
def test_malformed_pair_is_named_by_its_path(pair, match, tmp_path):
    frozen, ad = made_with(rank=7)
    ad["params"]["query"]["kernel"] = pair
    all_uses(jlora.LoraConfig(rank=7, alpha=3.0, targets=QV), frozen, ad, match)
    with pytest.raises(ValueError, match=match):
        jlora.save_adapters(tmp_path / "ckpt", ad, jlora.LoraConfig(rank=7, targets=QV))
    assert not (tmp_path / "ckpt").exists()


def test_pair_of_non_arrays_raises():
    ad = {"params": {"query": {"kernel": {"lora_a": 1.0, "lora_b": jnp.ones((7, 19))}}}}
    with pytest.raises(ValueError, match=r"params/query/kernel: lora_a must be arrays of at least 2 dims"):
        check_pairs(ad, jlora.LoraConfig(rank=7, targets=QV))
    with pytest.raises(TypeError, match="jlora.LoraConfig"):
        check_pairs(ad, {"rank": 7})


def test_nnx_state_variables():
    from flax import nnx

    class Lin(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(11, 19, rngs=rngs)

    state = nnx.state(Lin(nnx.Rngs(0)))
    ad = {"query": {"kernel": {"lora_a": jnp.ones((11, 7)), "lora_b": jnp.ones((7, 19))}}}
    check_adapters(state, ad, jlora.LoraConfig(rank=7, targets=("query",)))
    with pytest.raises(ValueError, match=r"query/kernel: lora_a \(11, 7\).*rank-7 adapters.*rank 4"):
        check_adapters(state, ad, jlora.LoraConfig(rank=4, targets=("query",)))


def test_rank_above_min_in_out_warns_at_init():
    def fn(p, x):
        return jnp.einsum("bi,ihk->bhk", x @ p["w"], p["g"])

    params = {"w": jnp.ones((11, 5)), "g": jnp.ones((5, 2, 3))}  # w: in 11, out 5; g: in 5, out 2 * 3
    for cfg, want in ((jlora.LoraConfig(rank=6, targets=("w", "g"), rank_pattern={"g": 5}),
                       ["jlora: rank 6 at w exceeds min(in, out) = min(11, 5)"]),
                      (jlora.LoraConfig(rank=5, targets=("w", "g"), rank_pattern={"g": 6}),
                       ["jlora: rank 6 at g exceeds min(in, out) = min(5, 6)"])):
        with pytest.warns(jlora.validate.RankWarning) as record:
            jlora.lora_transform(fn, cfg).init(params, X, key=jax.random.key(0))
        assert [str(w.message).split(" of its")[0] for w in record] == want

"""combine_adapters: each method's own invariants (exact cases, ranks, pruning counts, DARE statistics, jit) and
every refusal. PEFT itself is the oracle in test_combine_peft.py.

    python -m pytest -q tests/test_combine.py
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.combination import combine_adapters

IN, OUT, HEAD = 11, 19, 8
TOL = dict(rtol=1e-5, atol=1e-5)
TARGETS = ("query", "value", "head")


def fn(variables, x):  # x (batch, IN) -> (batch, HEAD)
    p = variables["params"]
    h = jnp.tanh(x @ p["query"]["kernel"])  # (IN, OUT)
    h = jnp.tanh(h @ p["value"]["kernel"])  # (OUT, OUT)
    return h @ p["head"]["kernel"]  # (OUT, HEAD)


rng = np.random.default_rng(0)
SHAPES = {"query": (IN, OUT), "value": (OUT, OUT), "head": (OUT, HEAD)}
VARS = {"params": {name: {"kernel": jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)}
                   for name, shape in SHAPES.items()}}
X = jnp.asarray(rng.standard_normal((4, IN)), jnp.float32)


@functools.cache
def adapter(n):
    """Three adapters (random factors, lora_b non-zero): rank 7 alpha 3; rank 5 alpha 2 rsLoRA; rank 7 alpha 5 on
    query and value only."""
    config = [jlora.LoraConfig(rank=7, alpha=3.0, targets=TARGETS),
              jlora.LoraConfig(rank=5, alpha=2.0, targets=TARGETS, scaling="rslora"),
              jlora.LoraConfig(rank=7, alpha=5.0, targets=("query", "value"))][n]
    r = np.random.default_rng(10 + n)
    pairs = {name: {"kernel": {"lora_a": jnp.asarray(r.standard_normal((shape[0], config.rank)) * 0.3, jnp.float32),
                               "lora_b": jnp.asarray(r.standard_normal((config.rank, shape[1])) * 0.3, jnp.float32)}}
             for name, shape in SHAPES.items() if name in config.targets}
    return {"params": pairs}, config


def delta(adapters, config):
    """{path: merge(...) - base} of the adapted kernels."""
    merged = jlora.merge(VARS, adapters, config)
    return {k: merged["params"][k]["kernel"] - VARS["params"][k]["kernel"] for k in TARGETS}


def expected(ns, weights):
    """sum_i weights[i] * delta_i: what the exact methods must give (a target an adapter lacks gets nothing)."""
    parts = [delta(*adapter(n)) for n in ns]
    return {k: sum(w * d[k] for w, d in zip(weights, parts)) for k in TARGETS}


def only(tree, names):
    return {"params": {k: v for k, v in tree["params"].items() if k in names}}


def combine(ns, weights, *, targets=TARGETS, **kw):
    """combine_adapters of adapters `ns`, cut to `targets` (fewer targets, fewer programs to compile)."""
    configs = [dataclasses.replace(adapter(n)[1], targets=tuple(t for t in adapter(n)[1].targets if t in targets))
               for n in ns]
    return combine_adapters([only(adapter(n)[0], targets) for n in ns], weights, configs=configs, **kw)


def assert_delta(combined, config, want):
    got = delta(combined, config)
    for k in TARGETS:
        np.testing.assert_allclose(got[k], want[k], err_msg=k, **TOL)


def test_linear_weights_one_zero_reproduces_the_first_adapter():
    combined, config = combine([0, 2], [1.0, 0.0], method="linear")
    assert config.scale_for("params/query/kernel") == 1.0 and config.rank == 7
    want = delta(*adapter(0))
    assert float(jnp.max(jnp.abs(want["query"]))) > 0.1
    assert_delta(combined, config, want)
    lora = jlora.lora_transform(fn, config)
    want = fn(jlora.merge(VARS, *adapter(0)), X)
    np.testing.assert_allclose(lora.apply(VARS, combined, X), want, **TOL)
    np.testing.assert_allclose(jax.jit(lora.apply)(VARS, combined, X), want, **TOL)


def test_linear_is_the_factor_sum_not_the_update_sum():
    """PEFT's linear weights each factor by sqrt(|w * scale|): the product holds cross terms a0 @ b2."""
    combined, config = combine([0, 2], [0.5, 0.5], method="linear")
    (a0, c0), (a2, c2) = adapter(0), adapter(2)
    s0, s2 = c0.scale_for("params/query/kernel"), c2.scale_for("params/query/kernel")
    q0, q2 = a0["params"]["query"]["kernel"], a2["params"]["query"]["kernel"]
    a = np.sqrt(0.5 * s0) * q0["lora_a"] + np.sqrt(0.5 * s2) * q2["lora_a"]
    b = np.sqrt(0.5 * s0) * q0["lora_b"] + np.sqrt(0.5 * s2) * q2["lora_b"]
    np.testing.assert_allclose(delta(combined, config)["query"], a @ b, **TOL)
    assert float(jnp.max(jnp.abs(a @ b - expected([0, 2], [0.5, 0.5])["query"]))) > 1e-2


def test_cat_is_exact_with_negative_weights_and_its_rank_is_the_sum():
    combined, config = combine([0, 1], [0.7, -0.4], method="cat")
    assert combined["params"]["query"]["kernel"]["lora_a"].shape == (IN, 12)
    assert combined["params"]["query"]["kernel"]["lora_b"].shape == (12, OUT)
    assert (config.rank, config.alpha, config.scaling) == (12, 12.0, "alpha_over_r")  # scale 1 though 1 was rsLoRA
    assert_delta(combined, config, expected([0, 1], [0.7, -0.4]))


def test_a_target_one_adapter_lacks_gets_the_others_alone():
    """adapter 2 has no pair on head: PEFT skips it there, the union of targets is adapted."""
    for method in ("cat", "svd", "linear"):
        combined, config = combine([0, 2], [0.7, 0.3], method=method, targets=("query", "head"),
                                   **({"svd_rank": 14} if method == "svd" else {}))
        assert set(combined["params"]) == {"query", "head"}
        want = expected([0], [0.7])["head"]
        np.testing.assert_allclose(delta(combined, config)["head"], want, **TOL)


def test_svd_at_full_rank_reproduces_the_weighted_sum():
    """rank 7 + rank 5 on (11, 19): svd_rank 11 = min(in, out) keeps every singular value. svd_rank 15 is lowered to
    min(in, out) per target: 11 on query, 8 on head, and stays 15 on value (19, 19), above its true rank 12."""
    want = expected([0, 1], [0.7, -0.4])
    combined, config = combine([0, 1], [0.7, -0.4], method="svd", svd_rank=15)
    ranks = {k: combined["params"][k]["kernel"]["lora_a"].shape[-1] for k in TARGETS}
    assert ranks == {"query": 11, "value": 15, "head": 8}
    assert config.rank == 15 and config.rank_for("params/head/kernel") == 8
    assert config.scale_for("params/head/kernel") == 1.0
    assert_delta(combined, config, want)


def test_svd_truncation_is_the_best_low_rank_approximation():
    """The default rank is the adapters' largest (7): the error is Eckart-Young's, sqrt(sum of the dropped s^2)."""
    want = expected([0, 1], [0.7, -0.4])["query"]
    combined, config = combine([0, 1], [0.7, -0.4], method="svd")
    assert config.rank == 7
    s = np.linalg.svd(np.asarray(want, np.float64), compute_uv=False)
    err = np.linalg.norm(np.asarray(delta(combined, config)["query"], np.float64) - want)
    assert s[7] > 1e-2
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[7:] ** 2)), rtol=1e-4)


def test_svd_clamp_clips_both_factors_at_the_quantile():
    loose, _ = combine([0, 1], [0.7, -0.4], method="svd", targets=("query",))
    tight, _ = combine([0, 1], [0.7, -0.4], method="svd", svd_clamp=0.8, targets=("query",))
    for k in ("query",):
        a, b = loose["params"][k]["kernel"]["lora_a"], loose["params"][k]["kernel"]["lora_b"]
        hi = jnp.quantile(jnp.concatenate([a.ravel(), b.ravel()]), 0.8)
        np.testing.assert_allclose(tight["params"][k]["kernel"]["lora_a"], jnp.clip(a, -hi, hi), **TOL)
        np.testing.assert_allclose(tight["params"][k]["kernel"]["lora_b"], jnp.clip(b, -hi, hi), **TOL)
        assert float(jnp.max(jnp.abs(a))) > float(hi)


@pytest.mark.parametrize("pruned, plain", [("magnitude_prune", "linear"), ("dare_linear", "linear"),
                                           ("dare_ties", "ties"), ("magnitude_prune_svd", "svd")])
def test_density_one_prunes_nothing(pruned, plain):
    extra = {"key": jax.random.key(0)} if pruned.startswith("dare") else {}
    got, _ = combine([0, 2], [0.6, -0.3], method=pruned, density=1.0, targets=("query",), **extra)
    want, _ = combine([0, 2], [0.6, -0.3], method=plain, targets=("query",),
                      **({"density": 1.0} if plain == "ties" else {}))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **TOL), got, want)


def test_ties_of_agreeing_adapters_is_their_mean():
    """Two copies with equal weights: every sign agrees, the disjoint mean is one copy's weighted factor."""
    got, config = combine_adapters([adapter(0)[0]] * 2, [0.8, 0.8], configs=[adapter(0)[1]] * 2, method="ties",
                                   density=1.0)
    assert_delta(got, config, expected([0], [0.8]))
    freq, _ = combine_adapters([adapter(0)[0]] * 2, [0.8, 0.8], configs=[adapter(0)[1]] * 2, method="ties",
                               density=1.0, majority_sign_method="frequency")
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **TOL), freq, got)


def test_magnitude_prune_keeps_the_largest_density_fraction():
    a0, c0 = adapter(0)
    got, _ = combine([0], [1.0], method="magnitude_prune", density=0.3)
    for name in ("lora_a", "lora_b"):
        x = np.asarray(a0["params"]["query"]["kernel"][name])
        y = np.asarray(got["params"]["query"]["kernel"][name])
        kept = y != 0
        assert kept.sum() == int(0.3 * x.size)
        assert np.abs(x[kept]).min() > np.abs(x[~kept]).max()
        np.testing.assert_allclose(y[kept], x[kept] * np.sqrt(c0.scale_for("params/query/kernel")), **TOL)


def big_adapter(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    tree = {"params": {"big": {"kernel": {"lora_a": jax.random.normal(k1, (64, 16)) + 3.0,
                                          "lora_b": jax.random.normal(k2, (16, 48)) + 3.0}}}}
    return tree, jlora.LoraConfig(rank=16, alpha=16.0, targets=("big",))


def test_dare_keeps_about_density_and_rescales_by_its_inverse():
    (t0, c0), (t1, c1) = big_adapter(0), big_adapter(1)
    kw = dict(configs=[c0, c1], method="dare_linear", density=0.3)
    got, _ = combine_adapters([t0, t1], [1.0, 0.0], key=jax.random.key(5), **kw)
    again, _ = combine_adapters([t0, t1], [1.0, 0.0], key=jax.random.key(5), **kw)
    other, _ = combine_adapters([t0, t1], [1.0, 0.0], key=jax.random.key(6), **kw)
    legacy, _ = combine_adapters([t0, t1], [1.0, 0.0], key=jax.random.PRNGKey(5), **kw)  # a raw uint32 key
    jax.tree.map(np.testing.assert_array_equal, legacy, got)
    for name in ("lora_a", "lora_b"):
        x, y = t0["params"]["big"]["kernel"][name], got["params"]["big"]["kernel"][name]
        kept = np.asarray(y != 0)
        assert abs(kept.mean() - 0.3) < 0.05, kept.mean()  # 4 sigma over >= 768 entries
        np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.3, **TOL)
        np.testing.assert_array_equal(again["params"]["big"]["kernel"][name], y)
        assert not np.array_equal(np.asarray(other["params"]["big"]["kernel"][name]) != 0, kept)
    # the mask on the update (dare_linear_svd) too, and each adapter draws its own
    svd, _ = combine_adapters([t0, t0], [1.0, 1.0], configs=[c0, c0], method="dare_linear_svd", density=0.3,
                              svd_rank=16, key=jax.random.key(5))
    update = (t0["params"]["big"]["kernel"]["lora_a"] @ t0["params"]["big"]["kernel"]["lora_b"])
    ratio = np.asarray(jlora.merge({"params": {"big": {"kernel": jnp.zeros((64, 48))}}}, svd,
                                   _cfg(svd))["params"]["big"]["kernel"] / update) * 0.3
    counts = np.round(ratio).astype(int)  # 0, 1 or 2 of the two adapters kept each entry (up to the svd's error)
    assert abs((counts == 2).mean() - 0.09) < 0.04 and abs((counts == 0).mean() - 0.49) < 0.06


def _cfg(tree):
    return jlora.LoraConfig(rank=tree["params"]["big"]["kernel"]["lora_a"].shape[-1],
                            alpha=float(tree["params"]["big"]["kernel"]["lora_a"].shape[-1]), targets=("big",))


@pytest.mark.parametrize("method, kw", [("cat", {}), ("ties", {"density": 0.5}),
                                        ("dare_ties_svd", {"density": 0.6, "key": jax.random.key(2), "svd_rank": 6})])
def test_jit_equals_eager_with_traced_weights_and_key(method, kw):
    ns = [0, 2]  # on query alone: one program to compile
    trees = [only(adapter(n)[0], ("query",)) for n in ns]
    configs = [dataclasses.replace(adapter(n)[1], targets=("query",)) for n in ns]
    eager, config = combine_adapters(trees, [0.6, -0.3], configs=configs, method=method, **kw)
    static = {k: v for k, v in kw.items() if k != "key"}
    jitted = jax.jit(lambda t, w, k: combine_adapters(t, w, configs=configs, method=method, key=k, **static)[0])(
        trees, jnp.asarray([0.6, -0.3]), kw.get("key"))  # the weights and the key traced
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, **TOL), jitted, eager)
    merged = jlora.merge(VARS, eager, config)["params"]["query"]["kernel"]
    assert float(jnp.max(jnp.abs(merged - VARS["params"]["query"]["kernel"]))) > 1e-2


def test_the_combined_config_round_trips_and_keeps_the_first_configs_dropout():
    first = dataclasses.replace(adapter(0)[1], dropout=0.1)
    combined, config = combine_adapters([adapter(0)[0], adapter(1)[0]], [1.0, 1.0], configs=[first, adapter(1)[1]],
                                        method="cat")
    assert config.dropout == 0.1 and config.bias == "none" and config.modules_to_save == ()
    assert jlora.LoraConfig.from_dict(config.to_dict()) == config
    jlora.check_adapters(VARS, combined, config)


# --- refusals: each names the problem and the fix ------------------------------------------------------------------


def test_mismatched_shapes_at_a_target_are_refused():
    other = {"params": {"query": {"kernel": {"lora_a": jnp.ones((13, 7)), "lora_b": jnp.ones((7, OUT))}}}}
    cfg = jlora.LoraConfig(rank=7, alpha=3.0, targets=("query",))
    with pytest.raises(ValueError, match=r"params/query/kernel .*different shapes.*\(13, 7\).*one base model"):
        combine_adapters([adapter(0)[0], other], [1, 1], configs=[adapter(0)[1], cfg], method="cat")


@pytest.mark.parametrize("weights, match", [([1.0], r"2 real numbers, one per adapter, got shape \(1,\)"),
                                            ([1.0, 2.0, 3.0], "2 real numbers"), ([1.0, np.nan], "finite"),
                                            (["a", "b"], "2 real numbers, one per adapter, got \\[.a.")])
def test_bad_weights(weights, match):
    with pytest.raises((ValueError, TypeError), match=match):
        combine([0, 2], weights, method="linear")


def test_bad_lists():
    with pytest.raises(TypeError, match=r"list of adapter trees.*pass \[adapters\]"):
        combine_adapters(adapter(0)[0], [1.0], configs=[adapter(0)[1]])
    with pytest.raises(TypeError, match="non-empty list of adapter trees"):
        combine_adapters([], [], configs=[])
    with pytest.raises(ValueError, match="list of 2 jlora.LoraConfigs, one per adapter.*got 1 configs"):
        combine_adapters([adapter(0)[0]] * 2, [1.0, 1.0], configs=[adapter(0)[1]])
    with pytest.raises(TypeError, match=r"configs\[1\] are not jlora.LoraConfigs"):
        combine_adapters([adapter(0)[0]] * 2, [1.0, 1.0], configs=[adapter(0)[1], {"rank": 7}])


def test_unknown_method():
    with pytest.raises(ValueError, match=r"method must be one of \('linear'.*got 'mean'"):
        combine([0, 2], [1, 1], method="mean")


@pytest.mark.parametrize("kw, match", [
    ({"method": "svd", "svd_rank": 0}, "svd_rank must be a positive int"),
    ({"method": "svd", "svd_rank": 2.5}, "svd_rank must be a positive int"),
    ({"method": "linear", "svd_rank": 4}, r"method='linear' does not use svd_rank=4: drop it"),
    ({"method": "svd", "svd_clamp": 1.5}, r"svd_clamp must be a fraction in \(0, 1\]"),
    ({"method": "ties"}, "pass density= in"),
    ({"method": "dare_ties_svd", "key": 0}, "pass density= in"),
    ({"method": "ties", "density": 0.0}, r"density must be a fraction in \(0, 1\]"),
    ({"method": "ties", "density": 1.5}, r"density must be a fraction in \(0, 1\].*density=1 keeps every entry"),
    ({"method": "magnitude_prune", "density": -0.2}, r"density must be a fraction in \(0, 1\]"),
    ({"method": "cat", "density": 0.5}, "method='cat' does not use density=0.5"),
    ({"method": "ties", "density": 0.5, "majority_sign_method": "mean"}, "'total' or 'frequency'"),
    ({"method": "magnitude_prune", "density": 0.5, "majority_sign_method": "frequency"},
     "does not use majority_sign_method='frequency'"),
    ({"method": "linear", "key": jax.random.key(0)}, "(?s)does not use key=.*key: dare_"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        combine([0, 2], [1.0, 1.0], **kw)


def test_dare_needs_a_key():
    with pytest.raises(TypeError, match=r"drops entries at random: pass key=jax.random.key\(0\)"):
        combine([0, 2], [1.0, 1.0], method="dare_linear", density=0.5)
    with pytest.raises(TypeError, match="key must be one JAX PRNG key"):
        combine([0, 2], [1.0, 1.0], method="dare_ties", density=0.5, key=7)


def test_factor_methods_need_equal_ranks():
    with pytest.raises(ValueError, match=r"same rank at a target \(as PEFT requires\).*adapters\[0\] rank 7, "
                                         r"adapters\[1\] rank 5; use method='cat' \(exact\), 'svd' or 'ties_svd'"):
        combine([0, 1], [1.0, 1.0], method="ties", density=0.5)


def test_trees_that_cannot_be_combined():
    tree, cfg = adapter(0)
    with_bias = {"params": {**tree["params"], "query": {**tree["params"]["query"], "bias": jnp.zeros(OUT)}}}
    with pytest.raises(ValueError, match=r"adapters\[1\] holds leaves trained in full at \['params/query/bias'\].*"
                                         r"pass only the lora pairs"):
        combine_adapters([tree, with_bias], [1, 1], configs=[cfg, cfg])
    with pytest.raises(ValueError, match=r"adapters\[0\] holds no lora_a / lora_b pair"):
        combine_adapters([{}], [1], configs=[cfg])
    with pytest.raises(ValueError, match=r"(?s)adapters\[0\] does not match configs\[0\].*rank-7 adapters.*rank 5"):
        combine_adapters([tree], [1], configs=[dataclasses.replace(cfg, rank=5)])
    fused = {"params": {"c_attn": {"kernel": {"lora_a": jnp.ones((IN, 14)), "lora_b": jnp.ones((7, 2 * 6))}}}}
    fcfg = jlora.LoraConfig(rank=7, targets=("c_attn",), fused={"c_attn": (True, False, True)})
    with pytest.raises(ValueError, match="fused layout, which combine_adapters does not support"):
        combine_adapters([fused], [1], configs=[fcfg])
    stacked = {"params": {"layers": {"kernel": {"lora_a": jnp.ones((3, IN, 7)), "lora_b": jnp.ones((3, 7, OUT))}}}}
    with pytest.raises(ValueError, match=r"lora_b \(3, 7, 19\) is a stacked or einsum layout.*lora_b of shape"):
        combine_adapters([stacked], [1], configs=[jlora.LoraConfig(rank=7, targets=("layers",))])

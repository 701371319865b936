"""LoraConfig validation, target selection, patterns and the scale: every error path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.paths import select_targets

VARS = {
    "params": {
        "layer_0": {"query": {"kernel": jnp.ones((11, 19)), "bias": jnp.ones(19)},
                    "value": {"kernel": jnp.ones((11, 19)), "bias": jnp.ones(19)}},
        "head": {"kernel": jnp.ones((19, 7)), "bias": jnp.ones(7)},
        "norm": {"scale": jnp.ones(19)},
    }
}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank must be a positive int"),
        (dict(rank=2.5), "rank must be a positive int"),
        (dict(alpha=0), "alpha must be a positive finite number"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(bias="some"), "bias must be one of"),
        (dict(scaling="sqrt"), "scaling must be one of"),
        (dict(init="zeros"), "init must be one of"),
        (dict(targets=()), "targets is empty"),
        (dict(targets="("), "not a valid regex"),
        (dict(rank_pattern={"query": -1}), r"rank_pattern\['query'\] must be an int >= 0"),
        (dict(alpha_pattern={"query": 0}), r"alpha_pattern\['query'\] must be a positive finite number"),
        (dict(fused={"c_attn": (False, False)}), "at least one enabled"),
        (dict(dtype=jnp.int32), "floating dtype"),
        (dict(alpha=math.inf), "alpha must be a positive finite number, got inf"),
        (dict(alpha=math.nan), "alpha must be a positive finite number, got nan"),
        (dict(alpha_pattern={"query": math.inf}), r"alpha_pattern\['query'\] must be a positive finite number"),
        (dict(rank_pattern={"layer_(0": 4}), r"rank_pattern key is not a valid regex .*'layer_\(0'.*re.escape"),
        (dict(alpha_pattern={"[q": 2.0}), "alpha_pattern key is not a valid regex"),
        (dict(fused={"c_attn)": (1, 0, 1)}), "fused key is not a valid regex"),
        (dict(modules_to_save=("head[",)), "modules_to_save entry is not a valid regex"),
    ],
)
def test_invalid_values_raise(kwargs, match):
    kwargs = {"targets": ("query",), **kwargs}
    with pytest.raises(ValueError, match=match):
        jlora.LoraConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(targets=3), "targets must be a tuple"), (dict(targets=("q", 3)), "targets names must be"),
     (dict(modules_to_save=(3,)), "modules_to_save must be"), (dict(rank_pattern=3), "rank_pattern must be"),
     (dict(dropout="0.1"), r"dropout must be a number, got str '0.1' \(write dropout=0.1"),
     (dict(dropout=None), "dropout must be a number, got NoneType None"),
     (dict(dtype="foo"), r"dtype must be a floating dtype \(jnp.float32, 'bfloat16', ...\) or None, got 'foo'"),
     (dict(fused={"query": 3}), r"fused\['query'\] must be a tuple of bools, one per slice"),
     (dict(fused={"query": "ab"}), r"fused\['query'\] must be a tuple of bools"),
     (dict(fused={"query": (1, 2)}), r"fused\['query'\] must hold bools \(or 0/1\), got \(1, 2\)"),
     (dict(rank="8"), r"rank must be an int, got str '8' \(write rank=8"),
     (dict(alpha="16"), "alpha must be a number, got str '16'"),
     (dict(rank_pattern={"query": "4"}), r"rank_pattern\['query'\] must be an int, got str"),
     (dict(rank_pattern={3: 4}), "rank_pattern keys must be non-empty module names"),
     (dict(alpha_pattern="query"), "alpha_pattern must be a mapping of name -> float, got the string"),
     (dict(modules_to_save=5), r"modules_to_save must be a tuple of module names \(or None\), got int 5"),
     (dict(targets=5), "targets must be a tuple")],
)
def test_invalid_types_raise(kwargs, match):
    with pytest.raises(TypeError, match=match):
        jlora.LoraConfig(**{"targets": ("query",), **kwargs})


def test_modules_to_save_none_and_numpy_scalars_are_accepted():
    cfg = jlora.LoraConfig(targets=("query",), modules_to_save=None, rank=np.int64(4), alpha=np.float32(2.0))
    assert cfg.modules_to_save == () and cfg == jlora.LoraConfig(targets=("query",), rank=4, alpha=2.0)
    assert type(cfg.rank) is int and jlora.LoraConfig.from_dict(cfg.to_dict()) == cfg


def test_config_is_hashable_and_normalised():
    a = jlora.LoraConfig(targets=["query"], rank_pattern={"value": 4}, fused={"c": [1, 0, 1]})
    b = jlora.LoraConfig(targets=("query",), rank_pattern=(("value", 4),), fused={"c": (True, False, True)})
    assert a == b and hash(a) == hash(b)
    assert jax.jit(lambda x, c: x * c.rank, static_argnums=1)(2.0, a) == 16.0


def test_scale_is_alpha_over_r_or_rslora_with_patterns():
    cfg = jlora.LoraConfig(rank=8, alpha=16, targets=("query",), rank_pattern={"value": 4},
                           alpha_pattern={"layer_0/value": 2})
    assert cfg.scale_for("params/layer_0/query/kernel") == 2.0
    assert cfg.scale_for("params/layer_0/value/kernel") == 0.5
    rs = jlora.LoraConfig(rank=9, alpha=6, targets=("query",), scaling="rslora")
    assert math.isclose(rs.scale_for("q/kernel"), 2.0)
    with pytest.raises(ValueError, match="rank 0"):
        jlora.LoraConfig(targets=("q",), rank_pattern={"q": 0}).scale_for("q/kernel")


def test_target_forms_select_the_same_weights():
    names = jlora.LoraConfig(targets=("query", "value"))
    regex = jlora.LoraConfig(targets=r"params/layer_0/(query|value)/kernel")
    pred = jlora.LoraConfig(targets=lambda path, leaf: path.endswith("y/kernel") or "value/kernel" in path)
    want = ["params/layer_0/query/kernel", "params/layer_0/value/kernel"]
    for cfg in (names, regex, pred):
        assert select_targets(VARS, cfg) == want
    assert select_targets(VARS, jlora.LoraConfig(targets=("query", "value"), rank_pattern={"value": 0})) == want[:1]


@pytest.mark.parametrize("field, value", [("rank_pattern", {"valeu": 2}), ("alpha_pattern", {"layer_0/vlaue": 4.0}),
                                          ("fused", {"qkv": (True, False, True)}), ("rank_pattern", {"head": 2})])
def test_pattern_keys_matching_no_target_raise(field, value):
    cfg = jlora.LoraConfig(targets=("query", "value"), **{field: value})
    key = next(iter(value))
    match = (rf"{field}\['{key}'\] match no target, so they would be ignored.*The targets are: "
             r"params/layer_0/query/kernel, params/layer_0/value/kernel")
    with pytest.raises(ValueError, match=match):
        select_targets(VARS, cfg)
    with pytest.raises(ValueError, match=match):
        jlora.lora_transform(lambda p, x: x @ p["params"]["layer_0"]["query"]["kernel"], cfg).init(
            VARS, jnp.ones((2, 11)), key=jax.random.key(0))


def test_string_target_naming_a_module_hints_a_tuple():
    with pytest.raises(ValueError, match=r"targets='query' is a string, so a regex .* targets=\('query',\)"):
        select_targets(VARS, jlora.LoraConfig(targets="query"))
    with pytest.raises(ValueError, match="selects no parameter"):  # no module of that name: no such hint
        select_targets(VARS, jlora.LoraConfig(targets="key"))


def test_target_matching_nothing_lists_candidates():
    with pytest.raises(ValueError, match=r"selects no parameter.*params/head/kernel \(19, 7\)"):
        select_targets(VARS, jlora.LoraConfig(targets=("key",)))
    with pytest.raises(ValueError, match=r"\['key'\] match no weight"):
        select_targets(VARS, jlora.LoraConfig(targets=("query", "key")))
    with pytest.raises(ValueError, match="not weights"):
        select_targets(VARS, jlora.LoraConfig(targets=lambda p, x: p.endswith("bias")))
    with pytest.raises(ValueError, match="hold no weights at all"):
        select_targets({"b": jnp.ones(3)}, jlora.LoraConfig(targets=("b",)))


def test_serialisation_round_trip():
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("query",), rank_pattern={"value": 2}, bias="lora_only",
                           fused={"c_attn": (True, False, True)}, dtype=jnp.bfloat16, modules_to_save=("head",))
    assert jlora.LoraConfig.from_dict(cfg.to_dict()) == cfg
    pred = jlora.LoraConfig(targets=lambda p, x: True)
    with pytest.raises(TypeError, match="predicate"):
        pred.to_dict()
    exact = pred.with_targets(["params/a.b/kernel"])
    assert select_targets({"params": {"a.b": {"kernel": jnp.ones((2, 3))}, "ab": {"kernel": jnp.ones((2, 3))}}},
                          exact) == ["params/a.b/kernel"]
    with pytest.raises(ValueError, match="unknown LoraConfig fields"):
        jlora.LoraConfig.from_dict({**cfg.to_dict(), "colour": 1})

"""NNX modules through `lora_transform`: the module's own state (dropout RNG counts, BatchNorm statistics) is threaded
through `apply` as the NNX functional API does it, train/eval switch without rebuilding, and merged weights go back
into the module with `nnx.update`. Also the clear errors for the wrong thing passed as the function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

import jlora

CFG = jlora.LoraConfig(rank=7, alpha=5.0, targets=("query",))


class Net(nnx.Module):
    """in=11 -> query (11, 19) -> BatchNorm -> Dropout(0.5) -> out (19, 13)."""

    def __init__(self, rngs):
        self.query = nnx.Linear(11, 19, rngs=rngs)
        self.bn = nnx.BatchNorm(19, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(19, 13, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(self.bn(self.query(x))))


def x_of(*shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def setup(*, perturbed=True, eval_mode=False):
    model = Net(nnx.Rngs(0, dropout=1))
    if eval_mode:
        model.eval()
    x = x_of(5, 11)
    lora = jlora.lora_transform(model, CFG, strict=True)
    frozen, ad = lora.init(nnx.state(model), x, key=jax.random.key(1))
    return model, x, lora, frozen, perturb(ad) if perturbed else ad


def merged_module(model, frozen, ad):
    """The plain NNX module (no LoRA) holding the merged weights and the same RNG / BatchNorm state."""
    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, jlora.merge(frozen, ad, CFG))


def run(lora, jit):
    return jax.jit(lora.apply) if jit else lora.apply


@pytest.mark.parametrize("jit", [False, True])
def test_dropout_mask_fresh_per_call_and_equal_to_the_plain_module(jit):
    model, x, lora, frozen, ad = setup()
    plain = merged_module(model, frozen, ad)
    apply = run(lora, jit)
    y1, frozen = apply(frozen, ad, x)
    y2, frozen = apply(frozen, ad, x)
    assert not np.allclose(y1, y2, atol=1e-3), "the same dropout mask on both calls"
    np.testing.assert_allclose(y1, plain(x), atol=1e-5)
    np.testing.assert_allclose(y2, plain(x), atol=1e-5)
    assert int(frozen["drop"]["rngs"]["count"]) == int(plain.drop.rngs.count[...]) == 2


def test_zero_lora_b_gives_what_the_module_gives_without_lora():
    model, x, lora, frozen, ad = setup(perturbed=False)
    assert not np.any(ad["query"]["kernel"]["lora_b"])
    reference = nnx.clone(model)
    for _ in range(2):
        y, frozen = lora.apply(frozen, ad, x)
        np.testing.assert_allclose(y, reference(x), atol=1e-5)
    np.testing.assert_allclose(frozen["bn"]["mean"], reference.bn.mean[...], atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_batch_stats_after_a_train_call_equal_the_plain_modules(jit):
    model, x, lora, frozen, ad = setup()
    plain = merged_module(model, frozen, ad)
    before = np.asarray(frozen["bn"]["mean"])
    _, frozen = run(lora, jit)(frozen, ad, x)
    plain(x)
    assert not np.allclose(frozen["bn"]["mean"], before, atol=1e-3)
    np.testing.assert_allclose(frozen["bn"]["mean"], plain.bn.mean[...], atol=1e-5)
    np.testing.assert_allclose(frozen["bn"]["var"], plain.bn.var[...], atol=1e-5)
    # written back into the module with the merged weights: nnx.update
    nnx.update(model, jlora.merge(frozen, ad, CFG))
    np.testing.assert_allclose(model.bn.mean[...], plain.bn.mean[...], atol=1e-5)
    np.testing.assert_allclose(model.query.kernel[...], plain.query.kernel[...], atol=1e-6)
    assert int(model.drop.rngs.count[...]) == 1


@pytest.mark.parametrize("jit", [False, True])
def test_eval_uses_running_stats_and_no_dropout_and_train_switches_back(jit):
    model, x, lora, frozen, ad = setup()
    _, frozen = lora.apply(frozen, ad, x)  # one train step moves the running stats off their init
    plain = merged_module(model, frozen, ad)
    plain.eval()
    evaluating = lora.eval()
    y1, state1 = run(evaluating, jit)(frozen, ad, x)
    y2, _ = run(evaluating, jit)(state1, ad, x)
    np.testing.assert_allclose(y1, y2, atol=0)
    np.testing.assert_allclose(y1, plain(x), atol=1e-5)
    np.testing.assert_allclose(state1["bn"]["mean"], frozen["bn"]["mean"], atol=0)
    assert int(state1["drop"]["rngs"]["count"]) == int(frozen["drop"]["rngs"]["count"])
    # the transform it came from is unchanged (no hidden state), and train() switches back
    t1, _ = lora.apply(frozen, ad, x)
    t2, _ = run(evaluating.train(), jit)(frozen, ad, x)
    np.testing.assert_allclose(t1, t2, atol=1e-5)
    assert not np.allclose(t1, y1, atol=1e-3)


def test_module_built_in_eval_mode_switches_to_train():
    model, x, lora, frozen, ad = setup(eval_mode=True)
    y1, frozen1 = lora.apply(frozen, ad, x)
    assert int(frozen1["drop"]["rngs"]["count"]) == 0
    training = lora.train()
    plain = merged_module(model, frozen, ad)
    plain.train()
    y2, frozen2 = training.apply(frozen, ad, x)
    np.testing.assert_allclose(y2, plain(x), atol=1e-5)
    assert int(frozen2["drop"]["rngs"]["count"]) == 1
    assert not np.allclose(y1, y2, atol=1e-3)


def test_view_sets_any_module_attribute_and_rejects_an_unknown_one():
    model, x, lora, frozen, ad = setup()
    y1, _ = lora.view(deterministic=True).apply(frozen, ad, x)  # dropout off, BatchNorm still on batch stats
    plain = merged_module(model, frozen, ad)
    plain.drop.deterministic = True
    np.testing.assert_allclose(y1, plain(x), atol=1e-5)
    with pytest.raises(ValueError, match="determinstic"):
        lora.view(determinstic=True)


def test_gradient_through_adapters_with_state_threaded():
    _, x, lora, frozen, ad = setup()

    def loss(ad, frozen, x):
        y, new = lora.apply(frozen, ad, x)
        return jnp.sum(y**2), new

    (value, new), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(ad, frozen, x)
    assert np.isfinite(value) and int(new["drop"]["rngs"]["count"]) == 1
    assert float(jnp.max(jnp.abs(grads["query"]["kernel"]["lora_b"]))) > 0
    assert jax.tree.structure(new) == jax.tree.structure(frozen)
    closed = jax.make_jaxpr(jax.grad(loss, has_aux=True))(ad, frozen, x)  # the weights are arguments, not constants
    assert all(np.size(c) <= 1 for c in closed.consts), [np.shape(c) for c in closed.consts]
    assert lora.consumers(nnx.state(Net(nnx.Rngs(0))), x) == {"query/kernel": ["dot"]}


def test_nnx_module_without_state_matches_merged():
    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(11, 19, rngs=rngs)
            self.out = nnx.Linear(19, 13, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.query(x)))

    model, x = Plain(nnx.Rngs(0)), x_of(5, 11)
    lora = jlora.lora_transform(model, CFG, strict=True)
    frozen, ad = lora.init(nnx.state(model), x, key=jax.random.key(1))
    assert jax.tree.map(jnp.shape, ad) == {"query": {"kernel": {"lora_a": (11, 7), "lora_b": (7, 19)}}}
    ad = perturb(ad)
    want = merged_module(model, frozen, ad)(x)
    y, state = jax.jit(lora.apply)(frozen, ad, x)
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert not np.allclose(want, model(x), atol=1e-3)
    assert jax.tree.structure(state) == jax.tree.structure(frozen)


# --- the wrong thing passed ------------------------------------------------------------------------------------
def test_linen_module_instead_of_apply_says_pass_model_apply():
    model = nn.Dense(19)
    with pytest.raises(TypeError, match=r"model\.apply"):
        jlora.lora_transform(model, CFG)
    variables = model.init(jax.random.key(0), x_of(5, 11))
    with pytest.raises(TypeError, match=r"unbind"):
        jlora.lora_transform(model.bind(variables), CFG)
    with pytest.raises(TypeError, match=r"model\.apply, not model\.init"):
        jlora.lora_transform(model.init, CFG)


def test_graphdef_or_state_or_variables_instead_of_module():
    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"nnx\.merge\(graphdef, state\)"):
        jlora.lora_transform(graphdef, CFG)
    with pytest.raises(TypeError, match=r"pass the module itself"):
        jlora.lora_transform(state, CFG)
    with pytest.raises(TypeError, match=r"lora_transform\(fn, config\)"):
        jlora.lora_transform({"params": {}}, CFG)


def test_module_or_partial_state_as_variables():
    model, x = Net(nnx.Rngs(0)), x_of(5, 11)
    lora = jlora.lora_transform(model, CFG)
    with pytest.raises(TypeError, match=r"nnx\.state\(model\)"):
        lora.init(model, x, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"drop/rngs/count.*nnx\.state\(model\)"):
        lora.init(nnx.state(model, nnx.Param), x, key=jax.random.key(1))


def test_mode_methods_on_a_plain_function_say_how_to_switch():
    lora = jlora.lora_transform(lambda p, x: x @ p["query"], CFG)
    for method in (lora.train, lora.eval, lora.view):
        with pytest.raises(TypeError, match="NNX"):
            method()


def test_state_created_during_the_call_is_an_error():
    class Sows(nnx.Module):
        def __init__(self, rngs):
            self.query = nnx.Linear(11, 19, rngs=rngs)

        def __call__(self, x):
            h = self.query(x)
            self.h = nnx.Intermediate(h)  # a new Variable, made during the call
            return h

    model, x = Sows(nnx.Rngs(0)), x_of(5, 11)
    lora = jlora.lora_transform(model, CFG)
    with pytest.raises(ValueError, match=r"h.*created during the call"):
        lora.init(nnx.state(model), x, key=jax.random.key(1))


def test_state_update_of_a_leaf_trained_in_full_is_an_error():
    model, x = Net(nnx.Rngs(0)), x_of(5, 11)
    cfg = jlora.LoraConfig(rank=7, alpha=5.0, targets=("query",), modules_to_save=("bn",))
    lora = jlora.lora_transform(model, cfg)
    frozen, ad = lora.init(nnx.state(model), x, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"bn/mean.*modules_to_save"):
        lora.apply(frozen, ad, x)


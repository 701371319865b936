"""Cost of a jlora train step, checked deterministically: XLA FLOP counts, HLO contents, trace counts (no timing).

The steps are those of `benchmarks.flops` on a small `jlora.models.gpt2.GPT2LMHeadModel` with every dense kernel
adapted. Dims are distinct (n_embd 64, batch 2, seq 8, rank 4, vocab 97) so the kernels' 2-D shapes (64, 192),
(64, 64), (64, 256), (256, 64) are produced by no dot other than a weight gradient or a merged delta.
"""

import re

import chex
import jax
import numpy as np
import pytest

from benchmarks import flops  # a top-level folder on pytest's pythonpath (pyproject.toml)

# 2 batch * 8 seq = 16 tokens/step: fewer than in * out / (in + out) >= 32 for every kernel, so jlora's LoRA branch
# (6 T r (in + out)) costs less than merge's factor math (6 r in out) and jlora <= merge - dW holds exactly
SMALL = flops.Config(n_layer=2, n_embd=64, n_head=4, n_positions=8, seq=8, batch=2, vocab_size=97, rank=4)
# 4 batch * 16 seq = 64 tokens/step: the branch now costs more than the factor math, so only
# jlora <= merge - dW + branch holds; the gap is still most of dW
MORE_TOKENS = flops.Config(n_layer=2, n_embd=64, n_head=4, n_positions=16, seq=16, batch=4, vocab_size=97, rank=4)


@pytest.fixture(scope="module")
def small():
    return flops.build(SMALL, abstract=True)


def _step_flops(config):
    steps, args, info = flops.build(config, abstract=True)
    measured = {name: flops.compiled_flops(steps[name], *args[name]) for name in flops.STEPS}
    return measured, flops.analytic(config, info["kernels"], info["variables"], info["adapters"])


def test_jlora_step_saves_the_weight_gradient_flops():
    f, a = _step_flops(SMALL)
    assert a["adapted_kernels"] == 4 * SMALL.n_layer  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    assert a["dW_flops"] == sum(2 * SMALL.tokens * i * o for i, o in [(64, 192), (64, 64), (64, 256), (256, 64)]) * 2
    assert f["jlora"] <= f["merge"] - a["dW_flops"], (f, a)
    assert f["jlora"] < f["full"], (f, a)


def test_jlora_step_flops_with_more_tokens_than_the_factor_math():
    f, a = _step_flops(MORE_TOKENS)
    assert a["lora_branch_flops"] > a["merge_factor_flops"]  # the regime this test is about
    assert f["jlora"] <= f["merge"] - a["dW_flops"] + a["lora_branch_flops"], (f, a)
    assert f["merge"] - f["jlora"] > 0.9 * a["dW_flops"], (f, a)
    assert f["jlora"] < f["full"], (f, a)


_DOT = re.compile(r"dot_general\b.*->\s*tensor<([0-9x]+)xf32>")


def _dot_output_shapes(step, args) -> set[tuple[int, ...]]:
    """The f32 output shapes of every dot_general in the lowered (StableHLO) text of `jax.jit(step)`."""
    text = jax.jit(step).lower(*args).as_text()
    return {tuple(int(n) for n in m.group(1).split("x")) for m in _DOT.finditer(text)}


def test_jlora_step_forms_no_weight_gradient(small):
    steps, args, info = small
    kernels = set(info["kernels"].values())
    assert kernels == {(64, 192), (64, 64), (64, 256), (256, 64)}
    weight_shaped = kernels | {(o, i) for i, o in kernels}  # a gradient may be formed transposed
    assert weight_shaped & _dot_output_shapes(steps["merge"], args["merge"]), "control: merge forms dW, must match"
    formed = weight_shaped & _dot_output_shapes(steps["jlora"], args["jlora"])
    assert not formed, f"the jlora step has dots producing weight-shaped f32 tensors {sorted(formed)}"


def test_jlora_step_does_not_retrace():
    steps, args, _ = flops.build(SMALL, abstract=False)
    frozen, adapters, state, tokens = args["jlora"]
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(steps["jlora"], n=1))
    losses = []
    for seed in range(3):
        batch = jax.random.randint(jax.random.key(10 + seed), tokens.shape, 0, SMALL.vocab_size, tokens.dtype)
        adapters, state, loss = step(frozen, adapters, state, batch)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and len(set(losses)) == 3, losses

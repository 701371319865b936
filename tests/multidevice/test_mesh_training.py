"""A LoRA train step on an 8-device mesh equals the single-device step; the collectives of its compiled HLO.

Two tiny models with dims divisible by the meshes: jlora's GPT-2 (fused c_attn with q,v adapted, the tied wte
embedding, attn/mlp c_proj, c_fc; one block) and an `nn.scan`-stacked block model (kernels (3, in, out),
an embedding). Four layouts of the frozen weights: data parallel (batch over 8, weights replicated), FSDP (batch and
every weight's input axis over 8), Megatron tensor parallel over "model" = 8 (column-parallel kernels split on out,
row-parallel on in, the vocabulary-parallel embedding) and 2-D (data=2 x model=4). Adapters are placed with
`jlora.adapter_shardings`; 3 AdamW steps (jitted with in/out shardings) match the unsharded run in float32.
Run with: XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/multidevice
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import perturb
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from benchmarks import hlo
from jlora.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jlora.paths import named_leaves, path_str

STEPS = 3
TOL = 1e-5
STRATEGIES = ("dp", "fsdp", "tp", "2d")
MODELS = ("gpt2", "scan")
BATCH, SEQ = 8, 8


# --- models ----------------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """One residual MLP block: up (16, 24), gelu, down (24, 16)."""

    @nn.compact
    def __call__(self, h, _):
        u = nn.Dense(24, name="up")(h)
        return h + nn.Dense(16, name="down")(jax.nn.gelu(u)), None


class ScanLM(nn.Module):
    """embed (40, 16) -> 3 `nn.scan`-stacked Blocks (kernels (3, 16, 24), (3, 24, 16)) -> LayerNorm -> head (16, 40)."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(40, 16, name="embed")(ids)
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = stack(name="layers")(h, None)
        return nn.Dense(40, name="head")(nn.LayerNorm(name="ln")(h))


GPT2 = GPT2Config(vocab_size=56, n_positions=24, n_embd=16, n_layer=1, n_head=2, n_inner=40, bos_token_id=None,
                  eos_token_id=None)  # c_attn (16, 48), attn c_proj (16, 16), c_fc (16, 40), mlp c_proj (40, 16)


@functools.cache
def setup(model: str):
    """(apply, config, tx, variables, ids, frozen, adapters): the unsharded model, LoRA r=3, non-zero adapters."""
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 40, (BATCH, SEQ)), jnp.int32)
    if model == "gpt2":
        module = GPT2LMHeadModel(GPT2)
        config = jlora.LoraConfig(rank=3, alpha=6, targets=("c_attn", "c_proj", "c_fc", "wte"),
                                  fused={"c_attn": (True, False, True)})
        tx = jlora.masked_optimizer(optax.adamw(1e-2, eps=1e-6, weight_decay=0.1))
    else:
        module = ScanLM()
        config = jlora.LoraConfig(rank=3, alpha=6, targets=("up", "down", "embed"))
        tx = jlora.masked_optimizer(jlora.loralib_adamw(1e-2, weight_decay=0.1))
    variables = jax.jit(module.init)(jax.random.key(0), ids)
    lora = jlora.lora_transform(module.apply, config)
    frozen, adapters = lora.init(variables, ids, key=jax.random.key(1))
    return lora, tx, variables, ids, frozen, jax.jit(functools.partial(perturb, scale=0.2))(adapters)


def next_token_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def lora_step(lora, tx):
    """(frozen, adapters, opt_state, ids) -> (adapters, opt_state, loss, grads): one AdamW step on the adapters."""

    def step(frozen, adapters, opt_state, ids):
        loss, grads = jax.value_and_grad(lambda a: next_token_loss(lora.apply(frozen, a, ids), ids))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss, grads

    return step


def full_step(apply, tx):
    """Full fine-tuning: the same step with every parameter trainable."""

    def step(variables, opt_state, ids):
        loss, grads = jax.value_and_grad(lambda v: next_token_loss(apply(v, ids), ids))(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    return step


# --- meshes and the frozen weights' layouts ---------------------------------------------------------------------------

def mesh_for(strategy: str) -> Mesh:
    devices = np.array(jax.devices())
    if strategy == "2d":
        return Mesh(devices.reshape(2, 4), ("data", "model"))
    return Mesh(devices, ("model",) if strategy == "tp" else ("data",))


COLUMN = ("c_attn", "c_fc", "up", "head")  # Megatron column-parallel: kernel split on out, bias too
ROW = ("c_proj", "down")  # row-parallel: kernel split on in, bias replicated
VOCAB = ("wte", "embed")  # vocabulary-parallel embedding


def spec_for(path: str, shape: tuple[int, ...], strategy: str) -> P:
    """The PartitionSpec of a frozen weight under `strategy`; scan-stacked leaves (under "layers") keep axis 0."""
    names = path.split("/")
    prefix = (None,) if "layers" in names else ()
    rest = len(shape) - len(prefix)
    if strategy == "dp" or rest == 0:
        return P()
    if strategy == "fsdp":  # the input axis (axis 0 after the stack) over all 8 devices
        return P(*prefix, "data", *(None,) * (rest - 1))
    module, leaf = names[-2], names[-1]
    if module in VOCAB:
        return P("model", None)
    if module in COLUMN:
        return P(*prefix, None, "model") if leaf == "kernel" else P(*prefix, "model")
    if module in ROW and leaf == "kernel":
        return P(*prefix, "model", None)
    return P()


def place(tree, strategy: str, mesh: Mesh):
    """`tree` put on `mesh` with `spec_for` each leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(x, NamedSharding(mesh, spec_for(path_str(p), x.shape, strategy))), tree)


def batch_sharding(strategy: str, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P() if strategy == "tp" else P("data", None))


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def opt_state_shardings(tx, adapters, adapter_sh, mesh):
    """The optimizer state's shardings: each moment like its adapter (optax.tree_map_params), counts replicated."""
    state = jax.eval_shape(tx.init, adapters)
    return optax.tree_utils.tree_map_params(tx, lambda _, sh: sh, state, adapter_sh,
                                            transform_non_params=lambda _: NamedSharding(mesh, P()))


# --- the runs --------------------------------------------------------------------------------------------------------

@functools.cache
def reference(model: str):
    """The unsharded run on one device: [(loss, grads)] per step and the adapters after STEPS steps."""
    lora, tx, _, ids, frozen, adapters = setup(model)
    step = jax.jit(lora_step(lora, tx))
    opt_state = tx.init(adapters)
    history = []
    for _ in range(STEPS):
        adapters, opt_state, loss, grads = step(frozen, adapters, opt_state, ids)
        history.append((loss, grads))
    return history, adapters


@functools.cache
def sharded(model: str, strategy: str):
    """The same run on the mesh, frozen weights placed by `spec_for`, adapters by `adapter_shardings`: a dict of
    the history, the adapters and optimizer state after it, the optimizer state as `tx.init` made it (eagerly, and
    under jit with out_shardings from `opt_state_shardings`), the adapters' shardings and the compiled step."""
    lora, tx, _, ids, frozen, adapters = setup(model)
    mesh = mesh_for(strategy)
    frozen_s = place(frozen, strategy, mesh)
    adapter_sh = jlora.adapter_shardings(frozen_s, adapters, config=lora.config)
    adapters_s = jax.device_put(adapters, adapter_sh)
    opt_state = tx.init(adapters_s)  # eager init: the moments are made like the (sharded) adapters
    opt_sh = opt_state_shardings(tx, adapters, adapter_sh, mesh)
    ids_s = jax.device_put(ids, batch_sharding(strategy, mesh))
    replicated = NamedSharding(mesh, P())
    step = jax.jit(lora_step(lora, tx), in_shardings=(shardings_of(frozen_s), adapter_sh, opt_sh, ids_s.sharding),
                   out_shardings=(adapter_sh, opt_sh, replicated, adapter_sh))
    compiled = step.lower(frozen_s, adapters_s, opt_state, ids_s).compile()
    history, init_state = [], opt_state
    for _ in range(STEPS):
        adapters_s, opt_state, loss, grads = compiled(frozen_s, adapters_s, opt_state, ids_s)
        history.append((loss, grads))
    jit_state = jax.jit(tx.init, out_shardings=opt_sh)(adapters_s)
    return dict(history=history, adapters=adapters_s, init_state=init_state, jit_state=jit_state,
                opt_state=opt_state, adapter_sh=adapter_sh, compiled=compiled, mesh=mesh, frozen=frozen_s, ids=ids_s)


def assert_trees_close(got, want, what):
    for (path, g), (_, w) in zip(named_leaves(got), named_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=TOL, rtol=TOL, err_msg=f"{what} {path}")


def moments(opt_state):
    """The adapter-like trees (mu, nu) inside the masked AdamW state (optax's or loralib's)."""
    inner = opt_state.inner_states["trainable"].inner_state
    inner = inner[0] if isinstance(inner, tuple) else inner
    return inner.mu, inner.nu


# --- HLO analysis, on a known program --------------------------------------------------------------------------------

def test_hlo_reads_the_collectives_of_a_known_program():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.ShapeDtypeStruct((16, 11), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((3, 11, 11), jnp.float32, sharding=NamedSharding(mesh, P()))
    v = jax.ShapeDtypeStruct((8, 19), jnp.float32, sharding=NamedSharding(mesh, P("data")))

    def f(w, v, x):  # a scan over 3 layers, data parallel: one (11, 11) gradient all-reduce per layer
        def loss(w):
            return jnp.sum(jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0])

        return jax.grad(loss)(w), v.sum(0)  # v's sum over its sharded axis: a (19,) all-reduce, once

    compiled = jax.jit(f, out_shardings=NamedSharding(mesh, P())).lower(w, v, x).compile()
    ops = hlo.collectives(compiled)
    by_shape = {op.shapes: op for op in ops}
    assert sorted(by_shape) == [((11, 11),), ((19,),)], ops
    grad, total = by_shape[((11, 11),)], by_shape[((19,),)]
    assert (grad.kind, grad.dtypes, grad.bytes, grad.count, grad.exact) == ("all-reduce", ("f32",), 484, 3, True)
    assert (total.kind, total.bytes, total.count) == ("all-reduce", 76, 1)
    assert hlo.collective_bytes(ops)["all-reduce"] == 3 * 484 + 76 == hlo.collective_bytes(ops)["total"]
    mem = hlo.memory(compiled)  # per device: w (3, 11, 11), v's shard (1, 19), x's shard (2, 11)
    assert mem["argument_bytes"] == 4 * (3 * 11 * 11 + 19 + 2 * 11)
    assert mem["output_bytes"] == 4 * (3 * 11 * 11 + 19) + 2 * 8  # and the output tuple's two pointers


ASYNC_HLO = """HloModule m, entry_computation_layout={(bf16[2,11]{1,0})->f32[11,19]{1,0}}
%body (p: (s32[], f32[3])) -> (s32[], f32[3]) {
  %p = (s32[], f32[3]{0}) parameter(0)
  %g = f32[3]{0} get-tuple-element(%p), index=1
  %cp = (f32[3]{0}, f32[3]{0}, u32[], u32[]) collective-permute-start(%g), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[3]{0} collective-permute-done(%cp)
  ROOT %t = (s32[], f32[3]{0}) tuple(%i, %cpd)
}
ENTRY %main (a: bf16[2,11]) -> f32[11,19] {
  %a = bf16[2,11]{1,0} parameter(0)
  %ags = (bf16[2,11]{1,0}, bf16[16,11]{1,0}) all-gather-start(%a), dimensions={0}
  %agd = bf16[16,11]{1,0} all-gather-done(%ags)
  %ars = f32[11,19]{1,0} all-reduce-start(%x), to_apply=%add
  %ard = f32[11,19]{1,0} all-reduce-done(%ars)
  %rs = (f32[7]{0}, /*index=1*/f32[5]{0}) reduce-scatter(%y, %z), dimensions={0}, to_apply=%add
  %w = (s32[], f32[3]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[11,19]{1,0} copy(%ard)
}
"""


def test_hlo_counts_async_pairs_once_and_flags_unknown_trip_counts():
    ops = hlo.collectives(ASYNC_HLO)
    assert [op.kind for op in ops] == ["collective-permute", "all-gather", "all-reduce", "reduce-scatter"]
    permute, gather, reduce, scatter = ops
    assert permute.shapes == ((3,),) and permute.computation == "body" and not permute.exact
    assert gather.operands == (hlo.Array("bf16", (2, 11)),) and gather.shapes == ((16, 11),)
    assert gather.bytes == 16 * 11 * 2 and gather.touches((2, 11)) and not gather.touches((11, 2))
    assert reduce.shapes == ((11, 19),) and reduce.bytes == 11 * 19 * 4  # %x is not defined: results only
    assert scatter.shapes == ((7,), (5,)) and scatter.dtypes == ("f32", "f32") and scatter.bytes == 48
    assert hlo.collective_bytes(ops)["total"] == 12 + 352 + 836 + 48
    assert hlo.summary(ops)[1] == {"kind": "all-gather", "shapes": [[16, 11]], "dtypes": ["bf16"], "bytes": 352,
                                   "count": 1, "total_bytes": 352, "exact": True}


def test_hlo_refuses_what_is_not_compiled():
    lowered = jax.jit(jnp.sin).lower(1.0)
    with pytest.raises(TypeError, match=r"call \.compile\(\) first"):
        hlo.collectives(lowered)
    with pytest.raises(ValueError, match="starts with 'HloModule'"):
        hlo.collectives(lowered.as_text())  # StableHLO: before SPMD partitioning, no collectives yet
    with pytest.raises(TypeError, match="compiled executable"):
        hlo.memory("HloModule m")

    class NoAnalysis:
        def memory_analysis(self):
            return None

    with pytest.raises(ValueError, match="no memory_analysis"):
        hlo.memory(NoAnalysis())


# --- the train step on a mesh ----------------------------------------------------------------------------------------

# GPT-2 under all four layouts; the scan model under DP, FSDP and 2-D (its "model" axis is tensor parallel, over 4)
RUNS = [("gpt2", s) for s in STRATEGIES] + [("scan", s) for s in ("dp", "fsdp", "2d")]


@pytest.mark.parametrize(("model", "strategy"), RUNS)
def test_train_step_on_mesh_equals_single_device(model, strategy):
    want_history, want_adapters = reference(model)
    run = sharded(model, strategy)
    for k, ((loss, grads), (want_loss, want_grads)) in enumerate(zip(run["history"], want_history)):
        np.testing.assert_allclose(float(loss), float(want_loss), atol=TOL, rtol=TOL, err_msg=f"loss at step {k}")
        assert_trees_close(grads, want_grads, f"adapter gradient at step {k}")
    assert_trees_close(run["adapters"], want_adapters, f"adapters after {STEPS} steps")
    _, _, _, _, _, start = setup(model)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(want_adapters), jax.tree.leaves(start)))
    assert moved > 100 * TOL, "the adapters did not move: the comparison is vacuous"

    adapter_sh = run["adapter_sh"]
    flat_sh = jax.tree.leaves(adapter_sh)
    assert all(isinstance(s, NamedSharding) for s in flat_sh) and len(flat_sh) == len(jax.tree.leaves(start))
    _, _, variables, _, _, _ = setup(model)
    weights = dict(named_leaves(variables))
    for path, sharding in named_leaves(adapter_sh):  # W's entries on the axes each factor shares with W
        target, factor = path.rsplit("/", 1)
        w_spec = list(spec_for(target, weights[target].shape, strategy))
        w_spec += [None] * (len(weights[target].shape) - len(w_spec))
        prefix = w_spec[:1] if "/layers/" in path else []
        want = prefix + ([w_spec[len(prefix)], None] if factor == "lora_a" else [None, w_spec[-1]])
        assert sharding.is_equivalent_to(NamedSharding(run["mesh"], P(*want)), len(want)), (path, sharding, want)
    if strategy != "dp":  # not vacuous: some adapters are sharded
        assert any(any(e is not None for e in s.spec) for s in flat_sh), adapter_sh
    states = ((run["init_state"], "after tx.init"), (run["jit_state"], "after jax.jit(tx.init, out_shardings)"),
              (run["opt_state"], f"after {STEPS} steps"))
    for state, when in states:
        for tree in moments(state):  # the optimizer state follows the adapters' shardings
            got = jax.tree.leaves(shardings_of(tree))
            assert all(g.is_equivalent_to(s, len(x.shape)) for g, s, x in zip(got, flat_sh, jax.tree.leaves(tree))), \
                f"optimizer moments {when}: {got} != {flat_sh}"
    for x, s in zip(jax.tree.leaves(run["adapters"]), flat_sh):
        assert x.sharding.is_equivalent_to(s, x.ndim)


def test_eager_apply_on_mesh_equals_single_device():
    """`lora.apply` outside jit on placed arrays (each primitive dispatched on the 2-D mesh): the logits equal the
    unsharded ones and come back sharded, batch over "data"."""
    lora, _, _, ids, frozen, adapters = setup("scan")
    mesh = mesh_for("2d")
    frozen_s = place(frozen, "2d", mesh)
    adapters_s = jax.device_put(adapters, jlora.adapter_shardings(frozen_s, adapters, config=lora.config))
    got = lora.apply(frozen_s, adapters_s, jax.device_put(ids, batch_sharding("2d", mesh)))
    np.testing.assert_allclose(got, jax.jit(lora.apply)(frozen, adapters, ids), atol=TOL, rtol=TOL)
    assert got.sharding.mesh == mesh and got.sharding.spec[0] == "data"


# --- what the compiled step moves between devices --------------------------------------------------------------------

def product_shapes(model: str) -> set[tuple[int, ...]]:
    """Every targeted weight's shape, its per-layer shape if scan-stacked, and (fused) the enabled slices' shape:
    the shapes a materialised LoRA product `scale * a @ b` (or a full weight gradient) would have."""
    lora, _, variables, _, _, adapters = setup(model)
    weights = dict(named_leaves(variables))
    shapes = set()
    for path in {p.rsplit("/", 1)[0] for p, _ in named_leaves(adapters)}:
        w = weights[path].shape
        n_prefix = 1 if "/layers/" in path else 0
        shapes |= {w, w[n_prefix:]}
        if lora.config.fused_for(path):
            b = dict(named_leaves(adapters))[f"{path}/lora_b"].shape
            shapes |= {w[:-1] + b[-1:], w[n_prefix:-1] + b[-1:]}
    return shapes


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def full_fine_tuning_bytes(model: str, strategy: str) -> tuple[int, list[hlo.Collective]]:
    """Collective bytes and collectives of the full fine-tuning step (every parameter trained by AdamW) on the same
    mesh, the same layout."""
    lora, _, variables, ids, _, _ = setup(model)
    mesh, tx = mesh_for(strategy), optax.adamw(1e-2)
    var_sh = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec_for(path_str(p), x.shape,
                                                                                             strategy)), variables)
    opt_sh = opt_state_shardings(tx, variables, var_sh, mesh)
    step = jax.jit(full_step(lora.fn, tx), in_shardings=(var_sh, opt_sh, batch_sharding(strategy, mesh)),
                   out_shardings=(var_sh, opt_sh, NamedSharding(mesh, P())))
    ops = hlo.collectives(step.lower(variables, jax.eval_shape(tx.init, variables), ids).compile())
    return hlo.collective_bytes(ops)["total"], ops


@pytest.mark.parametrize("model", MODELS)
def test_data_parallel_all_reduces_only_adapter_gradients(model):
    """DP: the compiled LoRA step's only collectives are all-reduces of adapter-sized buffers (the adapter gradients
    and the loss), never a weight- or product-shaped one; full fine-tuning all-reduces every weight's gradient."""
    run = sharded(model, "dp")
    ops = hlo.collectives(run["compiled"])
    adapter_bytes, forbidden = nbytes(run["adapters"]), product_shapes(model)
    assert ops and {op.kind for op in ops} == {"all-reduce"}, hlo.summary(ops)
    assert not [op for op in ops if any(op.touches(s) for s in forbidden)], hlo.summary(ops)
    lora_bytes = hlo.collective_bytes(ops)["total"]
    # at most 2x the adapters: GPT-2's fused c_attn lora_b gradient is reduced in its block form (2r, 3d) (it is
    # (r, 2d)), and the tied wte's two uses (lookup, head) reduce their gradients separately; the scan model: 1x
    assert adapter_bytes <= lora_bytes <= 2 * adapter_bytes, (lora_bytes, adapter_bytes)

    full_bytes, full_ops = full_fine_tuning_bytes(model, "dp")
    _, _, variables, _, _, _ = setup(model)
    assert full_bytes >= nbytes(variables)  # every weight's gradient is all-reduced
    assert any(op.touches(s) for op in full_ops for s in forbidden)  # so the shape check above has teeth
    fraction = adapter_bytes / nbytes(variables)  # 0.22 (GPT-2) and 0.24 (scan) for these tiny models
    assert lora_bytes / full_bytes <= 2 * fraction, (lora_bytes, full_bytes, fraction)


@pytest.mark.parametrize("model", MODELS)
def test_fsdp_moves_no_lora_product(model):
    """FSDP: the frozen weights are all-gathered (expected); no reduction or reshuffle (all-reduce, reduce-scatter,
    all-to-all, collective-permute) carries a buffer shaped like a weight or a LoRA product. (At these tiny sizes
    XLA also moves activations, so the bytes are not bounded by the adapters' here.) The merge-then-apply step,
    which materialises the product (`model.apply(jlora.merge(...))`), on the same mesh does reduce product-shaped
    gradients: the check has teeth (run for GPT-2 only: one more compile)."""
    run = sharded(model, "fsdp")
    forbidden = product_shapes(model)
    ops = hlo.collectives(run["compiled"])
    assert any(op.kind == "all-gather" and op.shapes[0] in forbidden for op in ops), hlo.summary(ops)
    moved = [op for op in ops if op.kind != "all-gather" and any(op.touches(s) for s in forbidden)]
    assert not moved, hlo.summary(moved)
    if model != "gpt2":
        return
    lora, tx, _, _, _, _ = setup(model)

    def merged_step(frozen, adapters, opt_state, ids):
        def loss(a):
            return next_token_loss(lora.fn(jlora.merge(frozen, a, lora.config), ids), ids)

        value, grads = jax.value_and_grad(loss)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, value, grads

    compiled = run["compiled"]
    merged = jax.jit(merged_step, in_shardings=compiled.input_shardings[0],
                     out_shardings=compiled.output_shardings).lower(
        run["frozen"], run["adapters"], run["opt_state"], run["ids"]).compile()
    ops = hlo.collectives(merged)
    assert [op for op in ops if op.kind != "all-gather" and any(op.touches(s) for s in forbidden)], hlo.summary(ops)

"""`jlora.adapter_shardings`: each adapter's sharding derived from its base weight's, for every layout kind, on 8
simulated devices; `lora.init` places the adapters so, eagerly and under jit with `out_shardings`; Flax partitioning
metadata (linen boxes, NNX `out_sharding`) read through; the optimizer state follows."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import meta
from helpers import perturb
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora.paths import named_leaves, path_str

R = 4
AUTO = (AxisType.Auto, AxisType.Auto)
MESH = jax.make_mesh((2, 4), ("data", "model"), axis_types=AUTO)


def f(p, x, ids, img):
    """Every layout kind: dense (16, 24), transposed (out 16, in 24) used as h @ W.T, a scan-stacked (2, 16, 24),
    a fused c_attn (16, 3*8), a half-enabled fused (16, 2*6), a tied embedding (32, 16), a Gemma einsum
    (N=4, D=16, H=6), a conv kernel (3, 3, 4, 8)."""
    h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
    g = h @ p["tr"]["kernel"].T
    ys = lax.scan(lambda c, w: (c, c @ w), g, p["stack"]["kernel"])[1]
    qkv = g @ p["c_attn"]["kernel"]
    half = g @ p["c_half"]["kernel"]
    e = p["wte"]["embedding"][ids]
    logits = e @ p["wte"]["embedding"].T
    q = jnp.einsum("btd,ndh->btnh", e, p["q"]["kernel"])
    c = lax.conv_general_dilated(img, p["conv"]["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return ys.sum() + qkv.sum() + half.sum() + logits.sum() + q.sum() + c.sum()


SHAPES = {"dense/kernel": (16, 24), "dense/bias": (24,), "tr/kernel": (16, 24), "stack/kernel": (2, 16, 24),
          "c_attn/kernel": (16, 24), "c_half/kernel": (16, 12), "wte/embedding": (32, 16), "q/kernel": (4, 16, 6),
          "conv/kernel": (3, 3, 4, 8)}
BASE_SPECS = {"dense/kernel": P("data", "model"), "dense/bias": P("model"), "tr/kernel": P("model", "data"),
              "stack/kernel": P("data", None, "model"), "c_attn/kernel": P(None, "model"),
              "c_half/kernel": P("data", "model"), "wte/embedding": P("model", "data"),
              "q/kernel": P("model", "data", None), "conv/kernel": P(None, None, "data", "model")}
# the README table: W's spec -> lora_a's, lora_b's
EXPECTED = {
    "dense/kernel/lora_a": P("data", None), "dense/kernel/lora_b": P(None, "model"),
    "dense/bias": P("model"),  # trained in full: the base leaf's own
    "tr/kernel/lora_a": P("model", None), "tr/kernel/lora_b": P(None, "data"),  # (out, in): input side on lora_b
    "stack/kernel/lora_a": P("data", None, None), "stack/kernel/lora_b": P("data", None, "model"),
    "c_attn/kernel/lora_a": P(None, None), "c_attn/kernel/lora_b": P(None, "model"),  # (r, 3*8): W's size
    "c_half/kernel/lora_a": P("data", None), "c_half/kernel/lora_b": P(None, None),  # (r, 6): 4 does not divide 6
    "wte/embedding/lora_a": P("model", None), "wte/embedding/lora_b": P(None, "data"),
    "q/kernel/lora_a": P("data", None), "q/kernel/lora_b": P(None, "model", None),  # lora_a (D, r), lora_b (r, N, H)
    "conv/kernel/lora_a": P(None, None, "data", None), "conv/kernel/lora_b": P(None, "model"),
}
CONFIG = jlora.LoraConfig(rank=R, targets=("dense", "tr", "stack", "c_attn", "c_half", "wte", "q", "conv"),
                          fused={"c_attn": (True, True, True), "c_half": (True, False)}, bias="all")
LORA = jlora.lora_transform(f, CONFIG)
ARGS = (jnp.ones((2, 3, 16)), jnp.array([[1, 5, 31], [0, 2, 7]]), jnp.ones((1, 5, 5, 4)))
KEY = jax.random.key(1)


def _nest(flat):
    out = {}
    for path, v in flat.items():
        a, b = path.split("/")
        out.setdefault(a, {})[b] = v
    return out


PARAMS = _nest({p: jax.random.normal(jax.random.key(i), s) for i, (p, s) in enumerate(SHAPES.items())})


def _placed(mesh, specs):
    return _nest({p: jax.device_put(PARAMS[p.split("/")[0]][p.split("/")[1]], NamedSharding(mesh, specs[p]))
                  for p in SHAPES})


def _specs(tree):
    return {p: (s.spec if s is not None else None) for p, s in named_leaves(tree, with_none=True)}


def _array_specs(adapters, mesh):
    out = {}
    for p, x in named_leaves(adapters):
        assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh, (p, x.sharding)
        out[p] = x.sharding.spec
    return out


@functools.cache
def _plain():
    return LORA.init(PARAMS, *ARGS, key=KEY)


@functools.cache
def _sharded():
    variables = _placed(MESH, BASE_SPECS)
    return (variables, *LORA.init(variables, *ARGS, key=KEY))


def test_each_layout_kind_gets_the_base_partitioning_on_the_axes_it_shares():
    variables, _, adapters = _sharded()
    assert _specs(jlora.adapter_shardings(variables, adapters, config=CONFIG)) == EXPECTED
    assert _array_specs(adapters, MESH) == EXPECTED  # lora.init placed them so
    # and the values are those of the unsharded init
    jax.tree.map(np.testing.assert_array_equal, adapters, _plain()[1])


def test_fsdp_mesh_shards_the_input_axis_of_lora_a_only():
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    specs = {p: P(*([None] * (len(s) - 2)), "fsdp", None) if len(s) > 1 else P(None) for p, s in SHAPES.items()}
    specs["conv/kernel"] = P(None, None, None, "fsdp")
    specs["q/kernel"] = P(None, "fsdp", None)
    _, adapters = LORA.init(_placed(mesh, specs), *ARGS, key=KEY)
    got = _array_specs(adapters, mesh)
    assert got["dense/kernel/lora_a"] == P("fsdp", None) and got["dense/kernel/lora_b"] == P(None, None)
    assert got["stack/kernel/lora_a"] == P(None, "fsdp", None) and got["stack/kernel/lora_b"] == P(None, None, None)
    assert got["wte/embedding/lora_a"] == P("fsdp", None) and got["wte/embedding/lora_b"] == P(None, None)
    assert got["q/kernel/lora_a"] == P("fsdp", None) and got["q/kernel/lora_b"] == P(None, None, None)
    assert got["conv/kernel/lora_a"] == P(None, None, None, None) and got["conv/kernel/lora_b"] == P(None, "fsdp")
    # (out 16, in 24) sharded on out: lora_a (out, r) carries it
    assert got["tr/kernel/lora_a"] == P("fsdp", None) and got["tr/kernel/lora_b"] == P(None, None)


def test_unsharded_weights_give_none_and_init_leaves_them_alone():
    adapters = _plain()[1]
    shardings = jlora.adapter_shardings(PARAMS, adapters, config=CONFIG)
    assert set(_specs(shardings).values()) == {None}
    assert jax.tree.structure(shardings, is_leaf=lambda x: x is None) == jax.tree.structure(adapters)


def test_init_under_jit_with_out_shardings_never_materialises_on_one_device():
    variables, _, eager = _sharded()
    abstract_vars = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), variables)
    init = jax.jit(lambda v: LORA.init(v, *ARGS, key=KEY)[1], out_shardings=jlora.adapter_shardings(
        abstract_vars, jax.eval_shape(lambda v: LORA.init(v, *ARGS, key=KEY)[1], abstract_vars), config=CONFIG))
    compiled = init.lower(abstract_vars).compile()
    assert _specs(compiled.output_shardings) == EXPECTED  # each device computes its shard only
    adapters = init(variables)
    assert _array_specs(adapters, MESH) == EXPECTED
    jax.tree.map(np.testing.assert_array_equal, adapters, eager)


def test_explicit_mesh_init_under_jit_places_without_out_shardings():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))
    names = ("dense/kernel", "dense/bias", "stack/kernel", "q/kernel")
    variables = {k: v for k, v in _placed(mesh, BASE_SPECS).items() if k in ("dense", "stack", "q")}

    def g(p, x):
        h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
        return jnp.einsum("btd,ndh->btnh", x, p["q"]["kernel"]).sum() + (x @ p["stack"]["kernel"]).sum() + h.sum()

    lora = jlora.lora_transform(g, jlora.LoraConfig(rank=R, targets=("dense", "stack", "q"), bias="all"))
    expected = {k: v for k, v in EXPECTED.items() if k.startswith(names)}
    with jax.set_mesh(mesh):  # the types carry the shardings: init reshards its adapters inside jit
        adapters = jax.jit(lambda v: lora.init(v, ARGS[0], key=KEY)[1])(variables)
        eager = lora.init(variables, ARGS[0], key=KEY)[1]
    assert _array_specs(adapters, mesh) == expected
    assert _array_specs(eager, mesh) == expected
    jax.tree.map(np.testing.assert_array_equal, adapters, eager)


class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(24, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("data", "model")),
                     bias_init=nn.with_partitioning(nn.initializers.normal(), ("model",)), name="up")(x)
        return nn.Dense(16, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
                        name="down")(jnp.tanh(h))


RULES = (("mlp", "model"), ("embed", "data"))
BOXED_BASE = {"params/up/kernel": P("data", "model"), "params/up/bias": P("model"),
              "params/down/kernel": P("model", "data"), "params/down/bias": P(None)}
BOXED_EXPECTED = {"params/up/kernel/lora_a": P("data", None), "params/up/kernel/lora_b": P(None, "model"),
                  "params/up/bias": P("model"), "params/down/bias": None,
                  "params/down/kernel/lora_a": P("model", None), "params/down/kernel/lora_b": P(None, "data")}


def test_linen_partitioning_boxes_are_read_through_with_a_mesh_and_rules():
    x = jnp.ones((2, 16))
    lora = jlora.lora_transform(Boxed().apply, jlora.LoraConfig(rank=R, targets=("up", "down"), bias="all"))
    abstract = jax.eval_shape(Boxed().init, jax.random.key(0), x)  # boxes of ShapeDtypeStructs, no sharding
    adapters = jax.eval_shape(lambda v: lora.init(v, x, key=KEY)[1], abstract)
    with nn.logical_axis_rules(RULES):
        assert _specs(jlora.adapter_shardings(abstract, adapters, mesh=MESH)) == BOXED_EXPECTED
        no_mesh = r"params/(up|down)/kernel: .*not placed.*nn.(Logically)?Partitioned.*mesh=mesh"
        with pytest.raises(ValueError, match=no_mesh):
            jlora.adapter_shardings(abstract, adapters)
    with pytest.raises(ValueError, match=r"params/down/kernel.*nn.LogicallyPartitioned.*nn.logical_axis_rules"):
        jlora.adapter_shardings(abstract, adapters, mesh=MESH)

    # variables placed as their boxes say: lora.init places the adapters (no mesh needed), apply runs under jit
    variables = Boxed().init(jax.random.key(0), x)

    def put(path, leaf):
        sharding = NamedSharding(MESH, BOXED_BASE[path_str(path)])
        if isinstance(leaf, meta.AxisMetadata):
            return leaf.replace_boxed(jax.device_put(leaf.unbox(), sharding))
        return jax.device_put(leaf, sharding)

    placed = jax.tree_util.tree_map_with_path(put, variables, is_leaf=lambda b: isinstance(b, meta.AxisMetadata))
    frozen, sharded = lora.init(placed, x, key=KEY)
    assert isinstance(frozen["params"]["up"]["kernel"], nn.Partitioned)  # the boxes stay in the frozen tree
    expected = {**BOXED_EXPECTED, "params/down/bias": P(None)}  # placed (replicated) now
    assert _array_specs(sharded, MESH) == expected
    assert _specs(jlora.adapter_shardings(placed, sharded)) == expected
    plain_frozen, plain = lora.init(variables, x, key=KEY)
    want = lora.apply(plain_frozen, perturb(plain), x)
    got = jax.jit(lora.apply)(frozen, perturb(sharded), x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(jnp.max(jnp.abs(want - Boxed().apply(variables, x)))) > 1e-3


class Mlp(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(16, 24, kernel_init=nnx.with_partitioning(init, ("data", "model")), rngs=rngs)
        self.down = nnx.Linear(24, 16, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


NNX_EXPECTED = {"up/kernel/lora_a": P("data", None), "up/kernel/lora_b": P(None, "model"),
                "down/kernel/lora_a": P("model", None), "down/kernel/lora_b": P(None, None)}


def test_nnx_sharding_metadata_placed_eagerly_or_read_with_a_mesh():
    x = jnp.ones((2, 16))
    with jax.set_mesh(MESH):  # NNX's eager sharding places each Param as its out_sharding says
        model = Mlp(nnx.Rngs(0))
    lora = jlora.lora_transform(model, jlora.LoraConfig(rank=R, targets=("up", "down")))
    _, adapters = lora.init(nnx.state(model), x, key=KEY)
    assert _array_specs(adapters, MESH) == NNX_EXPECTED
    assert _specs(jlora.adapter_shardings(nnx.state(model), adapters)) == NNX_EXPECTED

    with nnx.use_eager_sharding(False):  # metadata only, arrays on one device
        lazy = Mlp(nnx.Rngs(0))
    _, adapters = lora.init(nnx.state(lazy), x, key=KEY)
    assert set(_specs(jlora.adapter_shardings(nnx.to_pure_dict(nnx.state(lazy)), adapters)).values()) == {None}
    assert _specs(jlora.adapter_shardings(nnx.state(lazy), adapters, mesh=MESH)) == NNX_EXPECTED
    with pytest.raises(ValueError, match=r"(up|down)/kernel: .*NNX metadata out_sharding=.*mesh=mesh"):
        jlora.adapter_shardings(nnx.state(lazy), adapters)
    with pytest.raises(TypeError, match=r"nnx.Module.*nnx.state\(model\)"):
        jlora.adapter_shardings(lazy, adapters)


def test_optimizer_state_follows_the_adapters():
    variables, _, adapters = _sharded()
    tx = jlora.masked_optimizer(optax.adamw(1e-3), CONFIG)
    shardings = jlora.adapter_shardings(variables, adapters, config=CONFIG)

    def moments(state):
        (adam, *_) = state.inner_states["trainable"].inner_state
        return adam.mu, adam.nu

    for mu in moments(tx.init(adapters)):  # eager: zeros_like keeps each leaf's sharding
        assert _array_specs(mu, MESH) == EXPECTED
    # under jit (Auto mesh) give the state's shardings as out_shardings, mapped from the adapters' by optax
    state_shardings = jlora.optimizer_shardings(tx, adapters, shardings)
    state = jax.jit(tx.init, out_shardings=state_shardings)(adapters)
    for mu in moments(state):
        assert _array_specs(mu, MESH) == EXPECTED
    counts = [x for x in jax.tree.leaves(state) if x.ndim == 0]
    assert counts and all(x.sharding.spec == P() and x.sharding.mesh == MESH for x in counts)
    for mu in moments(jax.jit(tx.init)(adapters)):  # without out_shardings the zeros land on one device
        assert not isinstance(jax.tree.leaves(mu)[0].sharding, NamedSharding) or _array_specs(mu, MESH) != EXPECTED
    assert jax.tree.leaves(jlora.optimizer_shardings(tx, adapters, jax.tree.map(lambda _: None, adapters))) == []
    other = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    mixed = jax.tree.map(lambda s: s, shardings)
    mixed["dense"]["bias"] = NamedSharding(other, P())
    with pytest.raises(ValueError, match="different meshes"):
        jlora.optimizer_shardings(tx, adapters, mixed)


def test_frozen_tree_or_abstract_values_give_the_same_shardings():
    variables, frozen, adapters = _sharded()
    assert frozen["dense"]["bias"] is None
    assert _specs(jlora.adapter_shardings(frozen, adapters, config=LORA)) == EXPECTED  # a LoraTransform as config
    abstract = jax.eval_shape(lambda: adapters)
    assert _specs(jlora.adapter_shardings(variables, abstract, config=CONFIG)) == EXPECTED


def _pair(a, b):
    return {"lora_a": jax.ShapeDtypeStruct(a, jnp.float32), "lora_b": jax.ShapeDtypeStruct(b, jnp.float32)}


def _sds(shape, spec, mesh=MESH):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))


@pytest.mark.parametrize("variables, adapters, kwargs, error, match", [
    ({"w": {"kernel": _sds((16, 24), P("data"))}}, {"v": {"kernel": _pair((16, R), (R, 24))}}, {}, ValueError,
     r"v/kernel: the adapters hold a lora pair there, but the variables have no leaf at that path.*in that order"),
    ({"w": {"kernel": None}}, {"w": {"kernel": _pair((16, R), (R, 24))}}, {}, ValueError,
     r"w/kernel: the variables hold None where the adapters hold a lora pair"),
    ({"w": {"kernel": _sds((16, 24), P("data"))}}, {"w": {"kernel": _pair((11, R), (R, 24))}}, {}, ValueError,
     r"w/kernel: adapter shapes lora_a \(11, 4\).*do not fit the weight \(16, 24\).*pass config="),
    ({"w": {"kernel": _sds((16, 24), P("data"))}}, {"w": {"kernel": _pair((16, 3 * R), (R, 24))}}, {}, ValueError,
     r"w/kernel: .*fused projection, pass config="),
    ({"w": {"bias": _sds((24,), P("model"))}}, {"w": {"bias": _sds((19,), P("model"))}}, {}, ValueError,
     r"w/bias: the adapters hold an array of shape \(19,\) where the variables hold \(24,\)"),
    ({"w": {"kernel": nn.Partitioned(jax.ShapeDtypeStruct((16, 24), jnp.float32), ("embed", "mlp"))}},
     {"w": {"kernel": _pair((16, R), (R, 24))}}, {"mesh": MESH}, ValueError,
     r"w/kernel: its sharding nn.Partitioned\('embed', 'mlp'\).*\['embed', 'mlp'\], which are not axes of the mesh "
     r"\('data', 'model'\).*logical_axis_rules"),
    ({"w": {"kernel": nn.Partitioned(jax.ShapeDtypeStruct((16, 24), jnp.float32), ("data", "model", None))}},
     {"w": {"kernel": _pair((16, R), (R, 24))}}, {"mesh": MESH}, ValueError,
     r"w/kernel: the weight has 2 axes but its PartitionSpec .* has 3 entries"),
    ({"w": {"kernel": _sds((16, 24), P("data"))}}, {"w": {"kernel": _pair((16, R), (R, 24))}},
     {"mesh": ("data", "model")}, TypeError, r"mesh must be a jax.sharding.Mesh \(or AbstractMesh\), got tuple"),
    ({"w": {"kernel": _sds((16, 24), P("data"))}}, [_pair((16, R), (R, 24))], {}, TypeError,
     r"adapters must be the nested dict lora.init returns.*got list"),
    ({"w": {"kernel": _sds((16, 24), P("data"))}}, {"w": {"kernel": _pair((16, R), (R, 24))}},
     {"config": {"fused": {"w": (True, True)}}}, TypeError, r"config must be the jlora.LoraConfig .*got dict"),
], ids=["no-weight-there", "none-there", "shapes", "fused-without-config", "full-leaf-shape", "names-not-in-mesh",
        "spec-too-long", "mesh-type", "adapters-type",
        "config-type"])
def test_bad_input_names_the_path_and_the_fix(variables, adapters, kwargs, error, match):
    with pytest.raises(error, match=match):
        jlora.adapter_shardings(variables, adapters, **kwargs)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(24, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")), name="up")(c)
        out = nn.Dense(16, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")), name="down")(jnp.tanh(h))
        return c + out, None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=2,
                       metadata_params={nn.PARTITION_NAME: "layers"})(name="blocks")(x, None)[0]


def test_nn_scan_stacked_boxes_give_stacked_adapter_specs_of_the_adapters_rank():
    """nn.scan adds the 'layers' name to each box (3 names for a (2, in, out) kernel): the 3-D adapters take it
    on their stacked axis (the scanned-layer partition spec vs 2-D adapter rank mismatch of tunix #1186)."""
    x = jnp.ones((2, 16))
    abstract = jax.eval_shape(Scanned().init, jax.random.key(0), x)
    assert abstract["params"]["blocks"]["up"]["kernel"].names == ("layers", "embed", "mlp")
    lora = jlora.lora_transform(Scanned().apply, jlora.LoraConfig(rank=R, targets=("up", "down")))
    adapters = jax.eval_shape(lambda v: lora.init(v, x, key=KEY)[1], abstract)
    with nn.logical_axis_rules((("layers", "data"), ("embed", None), ("mlp", "model"))):
        got = _specs(jlora.adapter_shardings(abstract, adapters, mesh=MESH))
    assert got == {"params/blocks/down/kernel/lora_a": P("data", "model", None),
                   "params/blocks/down/kernel/lora_b": P("data", None, None),
                   "params/blocks/up/kernel/lora_a": P("data", None, None),
                   "params/blocks/up/kernel/lora_b": P("data", None, "model")}

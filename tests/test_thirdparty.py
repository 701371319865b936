"""Models written by others (dm-haiku, equinox, penzai, keras 3 on JAX): LoRA on their own layers.

For each model: `lora.apply` equals the model run on merged weights (strict; jit, and eager for one model of each
library, here or in a README block; lora_b perturbed non-zero, the check not vacuous), the gradients w.r.t. the
adapters equal those of merge-then-apply (d loss(merge(frozen, a)) / da), and every adapter's update `merged W - W`
has matrix rank r as a map from the axes the library contracts (stated here from the library's own conventions, not
read from jlora) to the rest. Each library is skipped if not installed (`pip install -e ".[test]"` installs them)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.paths import flatten_adapters, named_leaves

pytestmark = pytest.mark.thirdparty

R = 7  # the rank; every weight below has both sides larger, and sizes pairwise distinct where it matters


def perturb(adapters, seed=3, scale=0.3):
    """Noise added on the host (no XLA compile per leaf shape), so lora_b (zero at init) is non-zero."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype),
                        adapters)


def host_init(shapes, seed=0):
    """Arrays for a tree of `jax.ShapeDtypeStruct`s (from `jax.eval_shape` of a model's own init), drawn on the
    host: the libraries' initialisers compile one XLA program per shape, seconds for a small model on 2 cores.
    Other leaves stay as they are. Vectors (biases, norm scales) ~ 1 + N(0, 0.1^2), the rest N(0, 1) / sqrt(axis 0)."""
    rng = np.random.default_rng(seed)

    def draw(s):
        if not isinstance(s, jax.ShapeDtypeStruct):
            return s  # a Python number in the model (equinox keeps some as leaves)
        x = rng.standard_normal(s.shape)
        return jnp.asarray(1 + 0.1 * x if x.ndim < 2 else x / math.sqrt(s.shape[0]), s.dtype)

    return jax.tree.map(draw, shapes)


def update_rank(w, merged, contracted, n_prefix=0) -> list[int]:
    """Ranks of `merged - w` (per slice of the `n_prefix` stacked axes) as a matrix (prod(contracted), prod(rest)).

    `contracted` are axes of one slice. A singular value counts when above 1e-4 of the largest: float32 rounding
    of `W + delta - W` leaves noise near 1e-7, far below an update's own singular values."""
    d = np.asarray(merged, np.float64) - np.asarray(w, np.float64)
    slices = d.reshape((-1,) + d.shape[n_prefix:])
    ranks = []
    for m in slices:
        rest = [k for k in range(m.ndim) if k not in contracted]
        rows = math.prod(m.shape[k] for k in contracted)
        s = np.linalg.svd(np.transpose(m, list(contracted) + rest).reshape(rows, -1), compute_uv=False)
        ranks.append(int(np.sum(s > 1e-4 * s[0])))
    return ranks


def check_model(fn, variables, args, config, contracted, *, n_prefix=None, eager=False, atol=1e-6):
    """factored == merged (jit, and `eager`; strict, so nothing falls back), the adapters' gradients ==
    merge-then-apply's, and each update of rank exactly R from the `contracted` axes ({target path: axes of one
    stacked slice}) to the rest. It all runs in one jit: eager, each op compiles on its own (seconds per model on
    2 cores), so `eager` is set for one model of each library whose README block does not already run `lora.apply`
    eagerly (tests/test_readme.py does for haiku, equinox and keras). Returns (frozen, adapters, merged)."""
    lora = jlora.lora_transform(fn, config, strict=True)
    frozen, adapters = lora.init(variables, *args, key=jax.random.key(1))
    adapters = perturb(adapters)
    pairs, _ = flatten_adapters(adapters)
    assert sorted(pairs) == sorted(contracted), "every adapter must have its contracted axes stated"
    merged = jlora.merge(frozen, adapters, config)
    weights = np.random.default_rng(9).standard_normal(jax.eval_shape(fn, variables, *args).shape)

    def loss(y):
        return jnp.sum(jnp.sin(y) * weights), y

    @jax.jit  # one compile for everything the model runs under jit
    def run(adapters, variables):
        factored = jax.grad(lambda a: loss(lora.apply(frozen, a, *args)), has_aux=True)(adapters)
        reference = jax.grad(lambda a: loss(fn(jlora.merge(frozen, a, config), *args)), has_aux=True)(adapters)
        return factored, reference, fn(variables, *args)

    (grads, jitted), (want_grads, want), base = run(adapters, variables)
    assert float(jnp.max(jnp.abs(want - base))) > 0.01 * float(jnp.max(jnp.abs(base))), "the adapters changed nothing"
    for y in [jitted] + ([lora.apply(frozen, adapters, *args)] if eager else []):
        np.testing.assert_allclose(y, want, atol=atol * (1 + float(np.max(np.abs(want)))), rtol=1e-5)
    for (path, g), (_, h) in zip(named_leaves(grads), named_leaves(want_grads)):
        scale = float(np.max(np.abs(h)))
        assert scale > 1e-6, f"{path}: zero gradient, the check is vacuous"
        np.testing.assert_allclose(g, h, atol=1e-4 * (1 + scale), rtol=1e-4, err_msg=path)

    base, new = dict(named_leaves(variables)), dict(named_leaves(merged))
    for path, axes in contracted.items():
        ranks = update_rank(base[path], new[path], axes, (n_prefix or {}).get(path, 0))
        assert ranks == [config.rank] * len(ranks), f"{path}: update ranks {ranks} from axes {axes}, want {R}"
    return frozen, adapters, merged


def test_haiku_attention_block_with_dropout_rng_through_args():
    hk = pytest.importorskip("haiku")

    class Block(hk.Module):
        def __init__(self, name=None):
            super().__init__(name=name)
            init = hk.initializers.VarianceScaling(1.0)
            self.attn = hk.MultiHeadAttention(num_heads=3, key_size=5, model_size=11, w_init=init)
            self.mlp = hk.nets.MLP([19, 11])

        def __call__(self, x):
            h = x + self.attn(x, x, x)
            h = hk.dropout(hk.next_rng_key(), 0.25, h)  # the rng argument of apply matters
            return h + self.mlp(h)

    model = hk.transform(lambda x: Block()(x))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 11)), jnp.float32)
    params = host_init(jax.eval_shape(model.init, jax.random.key(1), x))
    config = jlora.LoraConfig(rank=R, alpha=14, targets=("query", "value", "multi_head_attention/linear",
                                                         "mlp/~/linear_0"))
    rng = jax.random.key(5)
    a = "block/~/multi_head_attention/"  # haiku's w is (in, out): axis 0 is contracted
    contracted = {a + "query/w": (0,), a + "value/w": (0,), a + "linear/w": (0,), "block/~/mlp/~/linear_0/w": (0,)}
    frozen, adapters, _ = check_model(model.apply, params, (rng, x), config, contracted)
    assert adapters["block"]["~"]["multi_head_attention"]["query"]["w"]["lora_a"].shape == (11, R)
    assert jax.tree.structure(frozen) == jax.tree.structure(params)  # haiku's own params dict, what apply takes


def _equinox_model(eqx):
    class Model(eqx.Module):
        emb: eqx.nn.Embedding
        conv: eqx.nn.Conv1d
        attn: eqx.nn.MultiheadAttention
        mlp: eqx.nn.MLP

        def __init__(self, key):
            k = jax.random.split(key, 4)
            self.emb = eqx.nn.Embedding(23, 11, key=k[0])
            self.conv = eqx.nn.Conv1d(11, 13, 3, padding=1, key=k[1])
            self.attn = eqx.nn.MultiheadAttention(3, 13, qk_size=5, vo_size=4, output_size=11, key=k[2])
            self.mlp = eqx.nn.MLP(11, 17, 19, 1, key=k[3])

        def __call__(self, ids):  # one sequence (T,) -> (T, 17)
            h = jax.vmap(self.emb)(ids)  # equinox's idiom: the per-token layer vmapped
            h = self.conv(h.T).T
            return jax.vmap(self.mlp)(self.attn(h, h, h))

    return Model(jax.random.key(0))


def test_equinox_partition_combine_embedding_conv_attention_mlp():
    eqx = pytest.importorskip("equinox")
    params, static = eqx.partition(host_init(eqx.filter_eval_shape(_equinox_model, eqx)), eqx.is_array)

    def fn(params, ids):
        return jax.vmap(eqx.combine(params, static))(ids)

    ids = jnp.array([[1, 5, 22, 3, 0], [7, 7, 13, 2, 21]])
    config = jlora.LoraConfig(rank=R, alpha=14, targets=("emb", "conv", "query_proj", "value_proj", "output_proj",
                                                         "layers/0"))
    # equinox's Linear weight is (out, in), used as W @ x: axis 1 is contracted; Conv1d's (out, in, k): axes 1, 2;
    # the embedding's update is a map from the looked-up rows (axis 0)
    contracted = {"emb/weight": (0,), "conv/weight": (1, 2), "attn/query_proj/weight": (1,),
                  "attn/value_proj/weight": (1,), "attn/output_proj/weight": (1,), "mlp/layers/0/weight": (1,)}
    _, adapters, merged = check_model(fn, params, (ids,), config, contracted)
    assert type(merged) is type(params)  # still an equinox module: eqx.combine(merged, static) runs it
    assert adapters["attn"]["query_proj"]["weight"]["lora_b"].shape == (R, 13)


def test_equinox_embedding_of_one_token_in_a_decoding_loop():
    """`embedding(token)` on one scalar token, as a per-token decoding loop calls it (a dynamic_slice of a row)."""
    eqx = pytest.importorskip("equinox")
    emb = host_init(eqx.filter_eval_shape(eqx.nn.Embedding, 23, 11, key=jax.random.key(0)))
    params, static = eqx.partition(emb, eqx.is_array)

    def fn(params, tokens):
        layer = eqx.combine(params, static)
        return jax.lax.scan(lambda c, t: (c, jnp.tanh(layer(t))), 0.0, tokens)[1]

    config = jlora.LoraConfig(rank=R, alpha=14, targets=("weight",))
    check_model(fn, params, (jnp.array([3, 22, 0, 3, 9]),), config, {"weight": (0,)})


def penzai_model(pz, build):
    """`pz.freeze_params(build(key))` with the parameters drawn by `host_init` (bound by label, so a table two
    layers share stays one parameter until frozen). The frozen model is a pytree whose leaves are the weights'
    arrays (`.../value/data_array`)."""
    shaped = jax.eval_shape(lambda k: pz.freeze_params(build(k)), jax.random.key(0))
    values = {v.label: v.value for v in jax.tree.leaves(shaped, is_leaf=lambda x: isinstance(x, pz.ParameterValue))
              if isinstance(v, pz.ParameterValue)}
    params = [pz.Parameter(label=k, value=v) for k, v in host_init(values).items()]
    return pz.freeze_params(pz.bind_variables(build(None), params))


def _penzai_layers(pz, key):
    table = pz.nn.EmbeddingTable.from_config(name="embed", init_base_rng=key, vocab_size=23,
                                             embedding_axes={"embedding": 11})
    return pz.nn.Sequential([
        pz.nn.EmbeddingLookup(table),
        pz.nn.Affine.from_config(name="up", init_base_rng=key, input_axes={"embedding": 11},
                                 output_axes={"neurons": 19}),
        pz.nn.Elementwise(jax.nn.gelu),
        pz.nn.Linear.from_config(name="mid", init_base_rng=key, input_axes={"neurons": 19},
                                 output_axes={"heads": 3, "head_dim": 5}),
        pz.nn.Linear.from_config(name="down", init_base_rng=key, input_axes={"heads": 3, "head_dim": 5},
                                 output_axes={"embedding": 11}),
        pz.nn.EmbeddingDecode(table),  # the table tied: looked up, then contracted on its embedding axis
    ])


def test_penzai_named_axis_layers_with_a_middle_contracted_axis_and_a_tied_table():
    pz = pytest.importorskip("penzai.pz")
    model = penzai_model(pz, lambda key: _penzai_layers(pz, key))
    # penzai contracts by axis name, not position: store "mid" as (heads, neurons, head_dim), Gemma's q_einsum
    # (N, D, H) layout, and its Linear contracts the middle axis
    mid = np.transpose(np.asarray(model.sublayers[3].weights.value.data_array), (1, 0, 2))
    model = pz.select(model).at(lambda m: m.sublayers[3].weights.value).set(
        pz.nx.wrap(jnp.asarray(mid)).tag("heads", "neurons", "head_dim"))
    ids = pz.nx.wrap(jnp.array([[1, 5, 22, 4], [3, 0, 7, 9]])).tag("batch", "seq")

    def fn(model, ids):
        return model(ids).unwrap("batch", "seq", "vocabulary")

    # penzai paths are structural (sublayers/<i>/...); a predicate picks every weight of 2 axes or more
    config = jlora.LoraConfig(rank=R, alpha=14, targets=lambda path, x: path.endswith("data_array") and x.ndim >= 2)
    p = "sublayers/{}/value/data_array".format
    # freezing copies the tied table into both layers that share it: two leaves, each with its own adapter; the
    # lookup's update maps the looked-up rows (axis 0), the decoding's contracts the embedding axis (1)
    contracted = {p("0/table/embeddings"): (0,), p("1/sublayers/0/weights"): (0,), p("3/weights"): (1,),
                  p("4/weights"): (0, 1), p("5/table/embeddings"): (1,)}
    _, adapters, _ = check_model(fn, model, (ids,), config, contracted, eager=True)
    mid = adapters["sublayers"]["3"]["weights"]["value"]["data_array"]
    assert (mid["lora_a"].shape, mid["lora_b"].shape) == ((19, R), (R, 3, 5))  # gemma.peft's layout


def test_penzai_gemma_style_transformer_with_a_layer_stack():
    pz = pytest.importorskip("penzai.pz")
    from penzai.models.transformer.variants import llamalike_common

    spec = llamalike_common.LlamalikeTransformerConfig(
        num_kv_heads=1, query_head_multiplier=3, embedding_dim=11, projection_dim=8, mlp_hidden_dim=13,
        num_decoder_blocks=2, vocab_size=23, mlp_variant="geglu_approx", tie_embedder_and_logits=True,
        use_layer_stack=True)  # Gemma's shape of model (tied table, GeGLU), the blocks stacked and scanned
    model = penzai_model(pz, lambda key: llamalike_common.build_llamalike_transformer(spec, init_base_rng=key))
    ids = pz.nx.wrap(jnp.array([[1, 5, 22], [3, 0, 7]])).tag("batch", "seq")

    def fn(model, ids):
        return model(ids).unwrap("batch", "seq", "vocabulary")

    blk = "body/sublayers/2/stacked_sublayers/sublayers/"
    paths = {"query": blk + "0/delta/sublayers/1/input_to_query/sublayers/0/weights/value/data_array",
             "out": blk + "0/delta/sublayers/1/attn_value_to_output/sublayers/1/weights/value/data_array"}
    config = jlora.LoraConfig(rank=R, alpha=14, targets="|".join(paths.values()))
    # stacked weights: (blocks, embedding, heads, projection) and (blocks, heads, projection, embedding)
    contracted = {paths["query"]: (0,), paths["out"]: (0, 1)}
    _, adapters, _ = check_model(fn, model, (ids,), config, contracted, n_prefix=dict.fromkeys(paths.values(), 1))
    q = dict(named_leaves(adapters))
    assert q[paths["query"] + "/lora_a"].shape == (2, 11, R)  # one pair per stacked block


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras runs on {keras.backend.backend()}, not jax (set KERAS_BACKEND=jax)")
    return keras


def test_keras_stateless_call_with_named_variables_and_a_gemma_style_einsum_dense():
    keras = _keras()
    zeros = {"kernel_initializer": "zeros"}  # the weights come from host_init, in the variables dict
    inputs = keras.Input((4, 11))
    h = keras.layers.MultiHeadAttention(num_heads=3, key_dim=5, name="attention", **zeros)(inputs, inputs)
    h = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 3, 8), name="gemma_query", **zeros)(h)
    outputs = keras.layers.Dense(13, name="head", **zeros)(keras.layers.Reshape((4, 24))(h))
    model = keras.Model(inputs, outputs)
    names = [v.path for v in model.trainable_variables]
    variables = host_init({v.path: jax.ShapeDtypeStruct(v.shape, v.dtype) for v in model.trainable_variables})
    non_trainable = [v.value for v in model.non_trainable_variables]

    def fn(variables, x):
        return model.stateless_call([variables[n] for n in names], non_trainable, x)[0]

    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 11)), jnp.float32)
    config = jlora.LoraConfig(rank=R, alpha=14, targets=("query", "value", "attention_output", "gemma_query", "head"))
    # keras' kernels are (in..., out...); the EinsumDense kernel is (N, D, H), contracted on D as Gemma's q_einsum
    contracted = {"attention/query/kernel": (0,), "attention/value/kernel": (0,),
                  "attention/attention_output/kernel": (0, 1), "gemma_query/kernel": (1,), "head/kernel": (0,)}
    _, adapters, _ = check_model(fn, variables, (x,), config, contracted)
    q = adapters["gemma_query"]["kernel"]
    assert (q["lora_a"].shape, q["lora_b"].shape) == ((11, R), (R, 3, 8))

"""`jlora.models.from_pretrained(path, mesh=mesh, rules=...)`: each safetensors tensor is read by slices inside
`jax.make_array_from_callback`, so each of the 8 simulated devices receives only its shard. Tiny GPT-2, BERT and
Llama checkpoints written with the safetensors numpy API (no torch); every sharded dim divisible by 8.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from jlora import models
from jlora.models import bert, gpt2, hf, llama, partitioning, shards
from jlora.paths import named_leaves

IDS = jnp.array([[3, 1, 4, 1, 5, 9, 2], [6, 5, 3, 5, 8, 9, 7]], jnp.int32)  # (2, 7)
# distinct dims; embed 16, vocab 40, GPT-2 qkv 48 / mlp 64, Llama q 16 / kv 8 / mlp 24, BERT mlp 24: all divide by 8
GPT2 = dict(model_type="gpt2", vocab_size=40, n_positions=12, n_embd=16, n_layer=2, n_head=2)
LLAMA = dict(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=12)
BERT = dict(model_type="bert", vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=24, max_position_embeddings=12, type_vocab_size=3)
CONFIGS = {"gpt2": GPT2, "llama": LLAMA, "bert": BERT}
KWARGS = {"bert": dict(num_labels=3, key=jax.random.key(5))}  # the classifier head is fresh: initialised sharded


def auto_mesh(shape, names):
    return Mesh(np.array(jax.devices()).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


MESHES = {"fsdp": lambda: auto_mesh((8,), ("data",)), "tp": lambda: auto_mesh((8,), ("model",)),
          "fsdp_tp": lambda: auto_mesh((2, 4), ("data", "model"))}
# what each preset gives some weights, written out here (not derived with jlora's tables)
EXPECTED = {
    "gpt2": {"transformer/wte/embedding": dict(fsdp=P(None, "data"), tp=P("model", None),
                                               fsdp_tp=P("model", "data")),
             "h/0/attn/c_attn/kernel": dict(fsdp=P("data", None), tp=P(None, "model"), fsdp_tp=P("data", "model")),
             "h/1/attn/c_attn/bias": dict(fsdp=P(None), tp=P("model"), fsdp_tp=P("model")),
             "h/1/attn/c_proj/kernel": dict(fsdp=P(None, "data"), tp=P("model", None), fsdp_tp=P("model", "data")),
             "h/0/mlp/c_proj/kernel": dict(fsdp=P(None, "data"), tp=P("model", None), fsdp_tp=P("model", "data")),
             "h/0/ln_1/scale": dict(fsdp=P(None), tp=P(None), fsdp_tp=P(None))},
    "llama": {"model/embed_tokens/embedding": dict(fsdp=P(None, "data"), tp=P("model", None),
                                                   fsdp_tp=P("model", "data")),
              "layers/1/self_attn/k_proj/kernel": dict(fsdp=P("data", None), tp=P(None, "model"),
                                                       fsdp_tp=P("data", "model")),
              "layers/0/self_attn/o_proj/kernel": dict(fsdp=P(None, "data"), tp=P("model", None),
                                                       fsdp_tp=P("model", "data")),
              "layers/0/mlp/down_proj/kernel": dict(fsdp=P(None, "data"), tp=P("model", None),
                                                    fsdp_tp=P("model", "data")),
              "lm_head/kernel": dict(fsdp=P("data", None), tp=P(None, "model"), fsdp_tp=P("data", "model"))},
    "bert": {"layer/0/attention/self/query/kernel": dict(fsdp=P("data", None), tp=P(None, "model"),
                                                         fsdp_tp=P("data", "model")),
             "layer/1/intermediate/dense/kernel": dict(fsdp=P("data", None), tp=P(None, "model"),
                                                       fsdp_tp=P("data", "model")),
             "layer/1/output/dense/kernel": dict(fsdp=P(None, "data"), tp=P("model", None),
                                                 fsdp_tp=P("model", "data")),
             "params/classifier/kernel": dict(fsdp=P("data", None), tp=P(None, None), fsdp_tp=P("data", None))},
}


def write(directory, config, tensors, dtype=np.float32):
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v).astype(dtype) for k, v in tensors.items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def tensors_of(arch, config):
    """{hf name: numpy array} of a randomly initialised tiny model: torch Linear layout (out, in) for BERT and
    Llama kernels, GPT-2's Conv1D (in, out) as is, an untied GPT-2 head (vocab, d)."""
    if arch == "gpt2":
        module = gpt2.GPT2LMHeadModel(gpt2.GPT2Config.from_hf(config))
        flip = lambda p: p.endswith("lm_head/kernel")  # noqa: E731
    elif arch == "llama":
        module, flip = llama.Llama(llama.LlamaConfig.from_hf(config)), lambda p: p.endswith("/kernel")
    else:
        module, flip = bert.BertModel(bert.BertConfig.from_hf(config)), lambda p: p.endswith("/kernel")
    variables = module.init(jax.random.key(1), IDS)
    return {hf.default_key(p): np.asarray(x).T if flip(p) else np.asarray(x) for p, x in named_leaves(variables)}


def checkpoint(tmp_path, arch, dtype=np.float32, **overrides):
    config = {**CONFIGS[arch], **overrides}
    return write(tmp_path / arch, config, tensors_of(arch, config), dtype)


def outputs(module, variables):
    out = jax.jit(module.apply)(variables, IDS)
    return np.asarray(out[0] if isinstance(out, tuple) else out)


def assert_same_values(sharded, unsharded):
    a, b = dict(named_leaves(sharded)), dict(named_leaves(unsharded))
    assert a.keys() == b.keys()
    for path, x in a.items():
        assert x.dtype == b[path].dtype and x.shape == b[path].shape, path
        assert np.array_equal(np.asarray(x), np.asarray(b[path])), path


@pytest.mark.parametrize("rules", ["fsdp", "tp", "fsdp_tp"])
@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_sharded_load_places_shards_and_equals_the_unsharded_load(tmp_path, arch, rules):
    directory = checkpoint(tmp_path, arch)
    mesh = MESHES[rules]()
    module, unsharded = models.from_pretrained(directory, **KWARGS.get(arch, {}))
    module2, sharded = models.from_pretrained(directory, mesh=mesh, rules=rules, **KWARGS.get(arch, {}))
    assert module2 == module
    assert_same_values(sharded, unsharded)
    leaves = dict(named_leaves(sharded))
    for suffix, specs in EXPECTED[arch].items():
        path = next(p for p in leaves if p.endswith(suffix))
        assert leaves[path].sharding == NamedSharding(mesh, specs[rules]), (path, leaves[path].sharding)
    split = 0
    for path, x in leaves.items():
        assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh, path
        assert len(x.addressable_shards) == 8
        shard = x.sharding.shard_shape(x.shape)
        assert all(s.data.shape == shard for s in x.addressable_shards), path
        split += shard != x.shape
    assert split >= 8  # most weights are split
    if rules == "fsdp_tp":  # one compiled forward per model (the 2-D mesh uses both presets' placements)
        np.testing.assert_allclose(outputs(module2, sharded), outputs(module, unsharded), rtol=2e-5, atol=2e-6)


def test_rules_none_follows_the_mesh_axis_names(tmp_path):
    directory = checkpoint(tmp_path, "llama")
    for rules, mesh in MESHES.items():
        _, by_default = llama.from_pretrained(directory, mesh=mesh())
        _, by_name = llama.from_pretrained(directory, mesh=mesh(), rules=rules)
        assert jax.tree.map(lambda x: x.sharding, by_default) == jax.tree.map(lambda x: x.sharding, by_name)


@pytest.mark.parametrize(("stored", "load"), [(np.float32, jnp.bfloat16), (ml_dtypes.bfloat16, jnp.float32)])
def test_each_slice_is_cast_as_the_whole_tensor_would_be(tmp_path, stored, load):
    directory = checkpoint(tmp_path, "gpt2", stored)
    _, unsharded = gpt2.from_pretrained(directory, dtype=load)
    _, sharded = gpt2.from_pretrained(directory, dtype=load, mesh=MESHES["fsdp_tp"](), rules="fsdp_tp")
    assert_same_values(sharded, unsharded)
    assert {x.dtype for x in jax.tree.leaves(sharded)} == {jnp.dtype(load)}


@pytest.mark.parametrize("rules", ["fsdp", "tp"])
def test_the_callbacks_read_only_shard_sized_slices(tmp_path, monkeypatch, rules):
    directory = checkpoint(tmp_path, "llama")
    reads = []
    real = shards.read_slice

    def recording(file, name, index):
        block = real(file, name, index)
        reads.append((name, block.shape))
        return block

    monkeypatch.setattr(shards, "read_slice", recording)
    _, variables = llama.from_pretrained(directory, mesh=MESHES[rules](), rules=rules)
    full = {hf.default_key(p): x for p, x in named_leaves(variables)}
    for name, x in full.items():
        sizes = [int(np.prod(shape)) for n, shape in reads if n == name]
        split = int(np.prod(x.sharding.shard_shape(x.shape)))
        assert sizes and all(s == split for s in sizes), (name, sizes, split)
        assert sum(sizes) == x.size, (name, sizes)  # each element read once: replicated shards read once, not 8x
        if x.ndim == 2:
            assert max(sizes) == x.size // 8, name  # every matrix split 8 ways: no read of a whole weight
    assert {n for n, _ in reads} == set(full)


def test_without_a_mesh_nothing_is_read_lazily(tmp_path, monkeypatch):
    directory = checkpoint(tmp_path, "gpt2")
    monkeypatch.setattr(shards, "read_slice", lambda *a: pytest.fail("read by slices without a mesh"))
    _, variables = gpt2.from_pretrained(directory)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(variables))


def test_tied_heads_sharded(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "EQUAL_BLOCK_BYTES", 3 * 16 * 4)  # the tied check compares 3 rows at a time
    mesh = MESHES["tp"]()
    config = {**GPT2, "tie_word_embeddings": True}
    tensors = tensors_of("gpt2", config)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]  # a stored head equal to wte: left out
    module, variables = gpt2.from_pretrained(write(tmp_path / "same", config, tensors), mesh=mesh)
    assert "lm_head" not in variables["params"]
    assert variables["params"]["transformer"]["wte"]["embedding"].sharding.spec == P("model", None)
    _, unsharded = gpt2.from_pretrained(tmp_path / "same")
    np.testing.assert_allclose(outputs(module, variables), outputs(module, unsharded), rtol=2e-5, atol=2e-6)
    tensors["lm_head.weight"] = tensors["lm_head.weight"].copy()
    tensors["lm_head.weight"][37, 5] += 1.0  # differs in the last block of rows only
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        gpt2.from_pretrained(write(tmp_path / "differs", config, tensors), mesh=mesh)
    directory = checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    _, tied = llama.from_pretrained(directory, mesh=mesh)
    assert "lm_head" not in tied["params"]


def test_gguf_style_tensors_in_host_memory_are_placed_by_shards():
    config = {**LLAMA}
    tensors = tensors_of("llama", config)
    _, unsharded = llama.from_tensors(config, tensors)
    _, sharded = llama.from_tensors(config, tensors, mesh=MESHES["fsdp"]())
    assert_same_values(sharded, unsharded)
    assert sharded["params"]["lm_head"]["kernel"].sharding.spec == P("data", None)


def test_regex_rules(tmp_path):
    directory = checkpoint(tmp_path, "llama")
    mesh = auto_mesh((4, 2), ("x", "y"))
    rules = [(r"embed_tokens/embedding$", P("x", "y")), (r"_proj/kernel$", P(None, "x")), (r".*", P())]
    _, variables = llama.from_pretrained(directory, mesh=mesh, rules=rules)
    leaves = dict(named_leaves(variables))
    assert leaves["params/model/embed_tokens/embedding"].sharding.spec == P("x", "y")
    assert leaves["params/model/layers/0/mlp/up_proj/kernel"].sharding.spec == P(None, "x")
    assert leaves["params/model/norm/scale"].sharding.spec == P()
    _, unsharded = llama.from_pretrained(directory)
    assert_same_values(variables, unsharded)


def test_an_explicit_mesh_works(tmp_path):
    directory = checkpoint(tmp_path, "gpt2")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    _, variables = gpt2.from_pretrained(directory, mesh=mesh)
    kernel = variables["params"]["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh, P("data", None))


def error(fn, *parts, kind=ValueError):
    with pytest.raises(kind) as info:
        fn()
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


def test_errors(tmp_path):
    directory = checkpoint(tmp_path, "gpt2", vocab_size=23)
    tp = MESHES["tp"]()
    error(lambda: gpt2.from_pretrained(directory, mesh=tp, rules="tp"), "params/transformer/wte/embedding",
          "(23, 16)", "'vocab'", "'model'", "8", "{**jlora.models.partitioning.TP, 'vocab': None}")
    error(lambda: gpt2.from_pretrained(directory, rules="fsdp"), "rules=", "mesh=")
    error(lambda: gpt2.from_pretrained(directory, mesh="data"), "jax.sharding.Mesh", kind=TypeError)
    error(lambda: gpt2.from_pretrained(directory, mesh=tp, rules="zero3"), "'zero3'", "fsdp", "fsdp_tp")
    error(lambda: gpt2.from_pretrained(directory, mesh=tp, rules={"embd": "model"}), "'embd'", "'embed'")
    error(lambda: gpt2.from_pretrained(directory, mesh=tp, rules="fsdp"), "'data'", "('model',)",
          "rules={'embed': 'model'}")
    error(lambda: gpt2.from_pretrained(directory, mesh=auto_mesh((8,), ("x",))), "('x',)", "'data'", "'model'")
    error(lambda: gpt2.from_pretrained(directory, mesh=MESHES["fsdp"](), rules={"embed": "data", "mlp": "data"}),
          "c_fc/kernel", "'data'", "twice")
    error(lambda: gpt2.from_pretrained(directory, mesh=tp, rules=[(r"c_attn/kernel$", P("model"))]),
          "params/transformer/h/0/attn/c_attn/bias", "(r'.*', PartitionSpec())")
    error(lambda: gpt2.from_pretrained(directory, mesh=tp, rules=[(r".*", P(None, None, "model"))]),
          "params/transformer/h/0/attn/c_attn/bias", "3 entries", "(48,)")
    _, variables = gpt2.from_pretrained(directory, mesh=tp, rules={**partitioning.TP, "vocab": None})  # the fix
    assert variables["params"]["transformer"]["wte"]["embedding"].sharding.spec == P(None, None)


def test_shardings_tree_for_a_random_init_created_sharded():
    module = gpt2.GPT2LMHeadModel(gpt2.GPT2Config.from_hf(GPT2))
    template = jax.eval_shape(module.init, jax.random.key(0), IDS)
    abstract = partitioning.partition_specs(template, jax.sharding.AbstractMesh((2, 4), ("data", "model")),
                                            architecture="gpt2")
    assert dict(abstract)["params/transformer/h/0/mlp/c_fc/kernel"] == P("data", "model")
    mesh = MESHES["fsdp_tp"]()
    out = partitioning.shardings(template, mesh, architecture="gpt2")
    assert jax.tree.structure(out) == jax.tree.structure(template)
    variables = jax.jit(module.init, out_shardings=out)(jax.random.key(0), IDS)  # no device holds it all
    assert variables["params"]["transformer"]["h"]["1"]["mlp"]["c_fc"]["kernel"].sharding.spec == P("data", "model")


def test_partition_specs_errors():
    template = {"params": {"h": {"c_attn": {"kernel": jax.ShapeDtypeStruct((16, 48), jnp.float32)}},
                           "extra": {"kernel": jax.ShapeDtypeStruct((16, 16), jnp.float32)}}}
    mesh = MESHES["tp"]()
    error(lambda: partitioning.partition_specs(template, mesh, "tp", architecture="t5"), "'t5'", "'gpt2'",
          "(regex, PartitionSpec)")
    error(lambda: partitioning.partition_specs(template, mesh, "tp", architecture="gpt2"), "params/extra/kernel",
          "(16, 16)", "LOGICAL_AXES")
    error(lambda: partitioning.partition_specs(template, mesh, [("kernel",)]), "(regex, PartitionSpec)",
          kind=TypeError)
    error(lambda: partitioning.partition_specs(template, mesh, 42), "int", kind=TypeError)
    error(lambda: partitioning.partition_specs(template, mesh, [(r".*", P("data"))]), "['data']",
          "('model',)")

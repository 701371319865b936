"""jlora.interop.peft against Hugging Face PEFT: files jlora writes load in `PeftModel.from_pretrained`, files PEFT's
`save_pretrained` writes load in jlora, and both give the same outputs.

    python -m pytest -q tests/test_interop_peft.py

A tiny model with Hugging Face module names (an embedding, query/value Linears, a LayerNorm, a plain Linear, a
Conv2d and a `classifier` head) exists twice: a torch module and a plain jax function of a params tree with the same
paths. Dims are pairwise distinct, alpha != r, every lora_B is non-zero, and rank/alpha patterns differ from the
defaults. The transformer cases (GPT-2 with a fused c_attn, BERT, Llama) run when jlora.models has them.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturb
from jax import lax
from torch_oracles import container, to_np, to_torch

import jlora
from jlora.interop import load_peft, save_peft
from jlora.interop.peft import full_to_torch
from jlora.models.hf import default_key
from jlora.paths import named_leaves, select_targets, trained_in_full

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = [
    pytest.mark.reference,
    # peft 0.21 reads transformers 5's deprecated alias when wrapping a PreTrainedModel; not ours to fix
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

VOCAB, DIM, Q, C_IN, C_OUT, N_LABELS = 23, 13, 11, 5, 7, 3
KH, KW, BATCH, SEQ, H, W = 3, 2, 4, 6, 9, 10
R, ALPHA = 4, 3.0
TARGETS = ("query", "value", "word_embeddings", "conv")
PATTERNS = dict(rank_pattern={"value": 6, "word_embeddings": 2}, alpha_pattern={"value": 5.0})
TOL = dict(rtol=1e-5, atol=1e-5)



class TorchTiny(torch.nn.Module):
    """Module names as a Hugging Face model's: `encoder.layer.0.attention.self.query` etc."""

    def __init__(self):
        super().__init__()
        self.embeddings = container(word_embeddings=torch.nn.Embedding(VOCAB, DIM))
        attention = container(self=container(query=torch.nn.Linear(DIM, Q), value=torch.nn.Linear(DIM, Q)))
        layer = container(attention=attention, LayerNorm=torch.nn.LayerNorm(Q, eps=1e-5),
                           output=container(dense=torch.nn.Linear(Q, Q)))
        self.encoder = container(layer=torch.nn.ModuleList([layer]))
        self.vision = container(conv=torch.nn.Conv2d(C_IN, C_OUT, (KH, KW)))
        self.classifier = torch.nn.Linear(Q + C_OUT, N_LABELS)

    def forward(self, ids, img):  # ids (batch, seq) int; img (batch, C_IN, H, W) -> logits (batch, N_LABELS)
        layer = self.encoder.layer[0]
        h = self.embeddings.word_embeddings(ids)
        att = layer.attention.self
        z = layer.LayerNorm(att.query(h) * torch.tanh(att.value(h)))
        pooled = torch.tanh(layer.output.dense(z)).mean(1)
        c = self.vision.conv(img).mean((2, 3))
        return self.classifier(torch.cat([pooled, c], -1))


def jax_tiny(variables, ids, img):
    """TorchTiny on a params tree with the same paths; img is NHWC, kernels (in, out) / HWIO."""
    p = variables["params"]
    layer = p["encoder"]["layer"]["0"]
    att = layer["attention"]["self"]
    h = jnp.take(p["embeddings"]["word_embeddings"]["embedding"], ids, axis=0)
    q = h @ att["query"]["kernel"] + att["query"]["bias"]
    v = h @ att["value"]["kernel"] + att["value"]["bias"]
    z = q * jnp.tanh(v)
    mean, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    z = (z - mean) * lax.rsqrt(var + 1e-5) * layer["LayerNorm"]["scale"] + layer["LayerNorm"]["bias"]
    pooled = jnp.tanh(z @ layer["output"]["dense"]["kernel"] + layer["output"]["dense"]["bias"]).mean(1)
    conv = p["vision"]["conv"]
    c = lax.conv_general_dilated(img, conv["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    c = (c + conv["bias"]).mean((1, 2))
    head = p["classifier"]
    return jnp.concatenate([pooled, c], -1) @ head["kernel"] + head["bias"]


def tiny_variables(seed=0):
    rng = np.random.default_rng(seed)

    def rand(*shape, scale):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    dense = lambda i, o: {"kernel": rand(i, o, scale=i**-0.5), "bias": rand(o, scale=0.1)}  # noqa: E731
    return {"params": {
        "embeddings": {"word_embeddings": {"embedding": rand(VOCAB, DIM, scale=1.0)}},
        "encoder": {"layer": {"0": {"attention": {"self": {"query": dense(DIM, Q), "value": dense(DIM, Q)}},
                                    "LayerNorm": {"scale": 1 + rand(Q, scale=0.1), "bias": rand(Q, scale=0.1)},
                                    "output": {"dense": dense(Q, Q)}}}},
        "vision": {"conv": {"kernel": rand(KH, KW, C_IN, C_OUT, scale=(KH * KW * C_IN) ** -0.5),
                            "bias": rand(C_OUT, scale=0.1)}},
        "classifier": dense(Q + C_OUT, N_LABELS),
    }}


def tiny_inputs(seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (BATCH, SEQ))
    img = rng.standard_normal((BATCH, H, W, C_IN)).astype(np.float32)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(img)


def torch_tiny(variables) -> torch.nn.Module:
    """A TorchTiny holding `variables` (each leaf at its Hugging Face name, in torch layout)."""
    model = TorchTiny()
    state = {default_key(p): to_torch(full_to_torch(p, x)) for p, x in named_leaves(variables)}
    model.load_state_dict(state, strict=True)
    return model.eval()


def torch_forward(model, ids, img) -> np.ndarray:
    with torch.no_grad():
        return to_np(model(torch.from_numpy(np.asarray(ids, np.int64)), to_torch(img).permute(0, 3, 1, 2)))


def assert_equivalent(c1: jlora.LoraConfig, c2: jlora.LoraConfig, variables):
    """Same targets, ranks, alphas, scales, fused masks, bias mode, scaling, dropout and full-trained leaves."""
    t1, t2 = select_targets(variables, c1), select_targets(variables, c2)
    assert sorted(t1) == sorted(t2)
    for p in t1:
        assert (c1.rank_for(p), c1.alpha_for(p), c1.scale_for(p), c1.fused_for(p)) == (
            c2.rank_for(p), c2.alpha_for(p), c2.scale_for(p), c2.fused_for(p)), p
    assert (c1.bias, c1.scaling, c1.dropout) == (c2.bias, c2.scaling, c2.dropout)
    assert sorted(trained_in_full(variables, c1, t1)) == sorted(trained_in_full(variables, c2, t2))


def assert_trees_equal(a, b):
    fa, fb = dict(named_leaves(a)), dict(named_leaves(b))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].shape == fb[k].shape and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


CASES = {  # (bias, scaling, modules_to_save)
    "bias_all-modules_to_save": ("all", "alpha_over_r", ("classifier",)),
    "lora_only-rslora": ("lora_only", "rslora", ()),
    "none-rslora-modules_to_save": ("none", "rslora", ("classifier",)),
}


def _config(case):
    bias, scaling, to_save = CASES[case]
    return jlora.LoraConfig(rank=R, alpha=ALPHA, targets=TARGETS, bias=bias, scaling=scaling,
                            modules_to_save=to_save, **PATTERNS)


@pytest.mark.parametrize("case", list(CASES))
def test_jlora_adapters_load_in_peft(case, tmp_path):
    """(a) random non-zero jlora adapters -> save_peft -> PeftModel.from_pretrained gives lora.apply's outputs;
    (c) load_peft of the same directory gives the adapters and config back exactly."""
    variables, (ids, img), config = tiny_variables(), tiny_inputs(), _config(case)
    lora = jlora.lora_transform(jax_tiny, config, strict=True)
    frozen, adapters = lora.init(variables, ids, img, key=jax.random.key(2))
    adapters = perturb(adapters, scale=0.3)
    want = np.asarray(lora.apply(frozen, adapters, ids, img))
    base = np.asarray(jax_tiny(variables, ids, img))
    assert np.abs(want - base).max() > 1e-2  # the adapters matter

    save_peft(tmp_path, adapters, config, base_model_name_or_path="tiny", variables=frozen)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["embeddings.word_embeddings", "encoder.layer.0.attention.self.query",
                                       "encoder.layer.0.attention.self.value", "vision.conv"]
    assert saved["rank_pattern"] == {"embeddings.word_embeddings": 2, "encoder.layer.0.attention.self.value": 6}
    peft_model = peft.PeftModel.from_pretrained(torch_tiny(variables), str(tmp_path)).eval()
    got = torch_forward(peft_model, ids, img)
    print(f"{case}: jlora -> PEFT max |diff| {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, **TOL)

    loaded, loaded_config = load_peft(tmp_path, frozen)
    assert_trees_equal(loaded, adapters)
    assert_equivalent(loaded_config, config, variables)


def _perturb_torch(model, seed=0):
    """`model` (PEFT-wrapped) in eval mode with every trainable tensor moved by N(0, 0.3^2): lora_B non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "original_module" not in name:
                param.copy_(param + 0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_trained_adapters_load_in_jlora(case, tmp_path):
    """(b) PEFT's save_pretrained -> load_peft -> lora.apply gives PEFT's outputs; saving back gives PEFT's
    tensors (less its duplicate .modules_to_save / .original_module keys)."""
    bias, scaling, to_save = CASES[case]
    variables, (ids, img) = tiny_variables(), tiny_inputs()
    model = _perturb_torch(peft.get_peft_model(torch_tiny(variables), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), bias=bias, use_rslora=scaling == "rslora",
        modules_to_save=list(to_save) or None, **PATTERNS)))
    model.save_pretrained(tmp_path / "peft")
    want = torch_forward(model, ids, img)

    adapters, config = load_peft(tmp_path / "peft", variables)
    assert_equivalent(config, _config(case), variables)
    lora = jlora.lora_transform(jax_tiny, config, strict=True)
    frozen, _ = jlora.split(variables, config)
    got = np.asarray(lora.apply(frozen, adapters, ids, img))
    print(f"{case}: PEFT -> jlora max |diff| {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, **TOL)

    save_peft(tmp_path / "again", adapters, config, base_model_name_or_path="tiny")
    theirs = safetensors_torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = safetensors_torch.load_file(tmp_path / "again" / "adapter_model.safetensors")
    theirs = {k: v for k, v in theirs.items() if ".modules_to_save." not in k and ".original_module." not in k}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def _saved(tmp_path):
    variables, (ids, img), config = tiny_variables(), tiny_inputs(), _config("bias_all-modules_to_save")
    lora = jlora.lora_transform(jax_tiny, config)
    _, adapters = lora.init(variables, ids, img, key=jax.random.key(2))
    save_peft(tmp_path, perturb(adapters), config, base_model_name_or_path="tiny", overwrite=True)
    return variables


def _edit_config(tmp_path, **changes):
    file = tmp_path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _edit_tensors(tmp_path, edit):
    file = tmp_path / "adapter_model.safetensors"
    tensors = safetensors_torch.load_file(file)
    safetensors_torch.save_file({k: v.contiguous() for k, v in edit(tensors).items()}, file)


def test_errors(tmp_path):
    """(d) each failure is a ValueError naming what is wrong."""
    variables = _saved(tmp_path)
    for changes, match in [({"peft_type": "IA3"}, "peft_type is 'IA3'"), ({"use_dora": True}, "lora_magnitude_vector"),
                           ({"lora_bias": True}, "lora_bias")]:
        _saved(tmp_path)
        _edit_config(tmp_path, **changes)
        with pytest.raises(ValueError, match=match):
            load_peft(tmp_path, variables)

    _saved(tmp_path)
    query = "base_model.model.encoder.layer.0.attention.self.query"
    _edit_tensors(tmp_path, lambda t: {k.replace(".self.query.", ".self.qeury."): v for k, v in t.items()})
    with pytest.raises(ValueError, match=r"qeury.*close candidates.*attention\.self\.query\.weight"):
        load_peft(tmp_path, variables)

    _saved(tmp_path)
    _edit_tensors(tmp_path, lambda t: {**t, f"{query}.lora_A.weight": t[f"{query}.lora_A.weight"][:, :-1]})
    with pytest.raises(ValueError, match=rf"{query}.lora_A.weight has shape \(4, 12\).*\(13, 11\) needs \(4, 13\)"):
        load_peft(tmp_path, variables)

    _saved(tmp_path)
    _edit_tensors(tmp_path, lambda t: {**t, f"{query}.lora_magnitude_vector": t[f"{query}.base_layer.bias"].clone()})
    with pytest.raises(ValueError, match=r"use_dora=False in adapter_config.json\), found .*lora_magnitude_vector"):
        load_peft(tmp_path, variables)

    _saved(tmp_path)
    _edit_tensors(tmp_path, lambda t: {k: v for k, v in t.items() if not k.endswith("output.dense.bias")})
    with pytest.raises(ValueError, match="trained in full"):
        load_peft(tmp_path, variables)

    _saved(tmp_path)
    _edit_tensors(tmp_path, lambda t: {k.replace("attention.self.query.lora", "LayerNorm.lora"): v
                                       for k, v in t.items()})
    with pytest.raises(ValueError, match=r"LayerNorm/scale \(layer -> flax 'scale'\) has no jlora equivalent"):
        load_peft(tmp_path, variables)

    stacked = {"params": {"layers": {"query": {"kernel": {"lora_a": jnp.ones((2, 5, 3)),
                                                          "lora_b": jnp.ones((2, 3, 7))}}}}}
    with pytest.raises(ValueError, match="no PEFT equivalent"):
        save_peft(tmp_path / "x", stacked, jlora.LoraConfig(rank=3, targets=("query",)), base_model_name_or_path="")


def test_bfloat16_round_trip(tmp_path):
    """bfloat16 adapters are written as bfloat16 and read back exactly; `dtype=` casts on reading."""
    variables, (ids, img), config = tiny_variables(), tiny_inputs(), _config("bias_all-modules_to_save")
    frozen, adapters = jlora.lora_transform(jax_tiny, config).init(variables, ids, img, key=jax.random.key(2))
    adapters = jax.tree.map(lambda x: x.astype(jnp.bfloat16), perturb(adapters))
    save_peft(tmp_path, adapters, config, base_model_name_or_path="tiny", variables=frozen)
    loaded, _ = load_peft(tmp_path, frozen)
    assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}
    assert_trees_equal(loaded, adapters)
    as_f32, _ = load_peft(tmp_path, frozen, dtype=jnp.float32)
    assert_trees_equal(as_f32, jax.tree.map(lambda x: x.astype(jnp.float32), adapters))


# --- Hugging Face transformers through jlora.models (skipped where jlora.models lacks the model) -------------------


def _hf_base(tmp_path, name: str, config):
    """A tiny random transformers model saved to tmp_path/name; returns (its class, the directory)."""
    import transformers

    torch.manual_seed(0)
    cls = getattr(transformers, name)
    cls(config).save_pretrained(tmp_path / "base")
    return cls, tmp_path / "base"


def _both_ways(tmp_path, cls, base_dir, module, variables, args, torch_kwargs, config, peft_config, *,
               fan_in_fan_out: bool, task_type: str, out=lambda o: o.logits):
    """jlora -> save_peft -> PEFT, load_peft round trip, and PEFT-trained -> load_peft -> jlora; returns the
    max |diff| of both directions."""
    lora = jlora.lora_transform(module.apply, config)
    frozen, adapters = lora.init(variables, *args, key=jax.random.key(2))
    adapters = perturb(adapters, scale=0.3)
    want = np.asarray(lora.apply(frozen, adapters, *args))
    assert np.abs(want - np.asarray(module.apply(variables, *args))).max() > 1e-2
    save_peft(tmp_path / "jlora", adapters, config, base_model_name_or_path=str(base_dir), variables=frozen,
              task_type=task_type, fan_in_fan_out=fan_in_fan_out)
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(base_dir), str(tmp_path / "jlora")).eval()
    with torch.no_grad():
        got = to_np(out(model(**torch_kwargs)))
    np.testing.assert_allclose(got, want, **TOL)
    diffs = [np.abs(got - want).max()]
    loaded, loaded_config = load_peft(tmp_path / "jlora", frozen)
    assert_trees_equal(loaded, adapters)
    assert_equivalent(loaded_config, config, variables)

    trained = _perturb_torch(peft.get_peft_model(cls.from_pretrained(base_dir), peft_config))
    trained.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = to_np(out(trained(**torch_kwargs)))
    adapters, config = load_peft(tmp_path / "peft", variables)
    lora = jlora.lora_transform(module.apply, config)
    got = np.asarray(lora.apply(jlora.split(variables, config)[0], adapters, *args))
    np.testing.assert_allclose(got, want, **TOL)
    return diffs + [np.abs(got - want).max()]


def _ids(vocab, shape=(2, 7), seed=4):
    return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.mark.parametrize("scaling", ["alpha_over_r", "rslora"])
def test_gpt2_fused_c_attn(scaling, tmp_path):
    """GPT-2's c_attn as loralib's MergedLinear (q and v, not k) goes to PEFT as a rank-2r LoRA with a
    block-structured B, comes back fused, and a PEFT-trained c_attn / c_fc LoRA loads (fan_in_fan_out)."""
    pytest.importorskip("jlora.models.gpt2")
    import transformers

    from jlora.models import gpt2

    cfg = transformers.GPT2Config(vocab_size=41, n_embd=24, n_layer=2, n_head=2, n_positions=16, n_inner=36,
                                 bos_token_id=0, eos_token_id=0)
    cls, base = _hf_base(tmp_path, "GPT2LMHeadModel", cfg)
    module, variables = gpt2.from_pretrained(base)
    ids = _ids(41)
    config = jlora.LoraConfig(rank=3, alpha=5.0, targets=("c_attn", "c_fc"), scaling=scaling, bias="lora_only",
                              fused={"c_attn": (True, False, True)})
    peft_config = peft.LoraConfig(r=3, lora_alpha=5.0, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                  use_rslora=scaling == "rslora", bias="lora_only", task_type="CAUSAL_LM")
    diffs = _both_ways(tmp_path, cls, base, module, variables, (jnp.asarray(ids, jnp.int32),),
                       {"input_ids": torch.from_numpy(ids)}, config, peft_config, fan_in_fan_out=True,
                       task_type="CAUSAL_LM")
    saved = json.loads((tmp_path / "jlora" / "adapter_config.json").read_text())
    e = 2
    assert saved["rank_pattern"] == {f"transformer.h.{i}.attn.c_attn": 3 * e for i in range(2)}
    assert saved["alpha_pattern"] == {f"transformer.h.{i}.attn.c_attn": 5.0 * (e**0.5 if scaling == "rslora" else e)
                                      for i in range(2)}
    print(f"gpt2 {scaling}: jlora -> PEFT {diffs[0]:.2e}, PEFT -> jlora {diffs[1]:.2e}")


def test_bert_query_value_classifier(tmp_path):
    """BertForSequenceClassification: LoRA on query/value, the classifier trained in full (modules_to_save)."""
    pytest.importorskip("jlora.models.bert")
    import transformers

    from jlora.models import bert

    cfg = transformers.BertConfig(vocab_size=53, hidden_size=20, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=36, max_position_embeddings=32, num_labels=3)
    cls, base = _hf_base(tmp_path, "BertForSequenceClassification", cfg)
    module, variables = bert.from_pretrained(base)
    ids, mask = _ids(53), np.ones((2, 7), np.int64)
    mask[1, 5:] = 0
    config = jlora.LoraConfig(rank=4, alpha=6.0, targets=("query", "value"), modules_to_save=("classifier",))
    peft_config = peft.LoraConfig(r=4, lora_alpha=6.0, target_modules=["query", "value"],
                                  modules_to_save=["classifier"], task_type="SEQ_CLS")
    diffs = _both_ways(tmp_path, cls, base, module, variables, (jnp.asarray(ids, jnp.int32), jnp.asarray(mask)),
                       {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}, config,
                       peft_config, fan_in_fan_out=False, task_type="SEQ_CLS")
    print(f"bert: jlora -> PEFT {diffs[0]:.2e}, PEFT -> jlora {diffs[1]:.2e}")


def test_llama_q_v(tmp_path):
    """LlamaForCausalLM with LoRA on q_proj / v_proj (GQA, untied head)."""
    pytest.importorskip("jlora.models.llama")
    import transformers

    from jlora.models import llama

    cfg = transformers.LlamaConfig(vocab_size=47, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    cls, base = _hf_base(tmp_path, "LlamaForCausalLM", cfg)
    module, variables = llama.from_pretrained(base)
    ids = _ids(47)
    config = jlora.LoraConfig(rank=4, alpha=7.0, targets=("q_proj", "v_proj"), rank_pattern={"v_proj": 2})
    peft_config = peft.LoraConfig(r=4, lora_alpha=7.0, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                  task_type="CAUSAL_LM")
    diffs = _both_ways(tmp_path, cls, base, module, variables, (jnp.asarray(ids, jnp.int32),),
                       {"input_ids": torch.from_numpy(ids)}, config, peft_config, fan_in_fan_out=False,
                       task_type="CAUSAL_LM")
    print(f"llama: jlora -> PEFT {diffs[0]:.2e}, PEFT -> jlora {diffs[1]:.2e}")


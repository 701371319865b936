"""jlora.models.bert: parity with transformers' Bert/Roberta (tiny random models and the real all-MiniLM-L6-v2),
checkpoint loading and its errors, and LoRA on the classifier."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_factored_equals_merged, save_checkpoint

import jlora
from jlora.models import bert, hf
from jlora.paths import named_leaves

# distinct dims: batch 3, seq 9, hidden 48, heads 4 (head_dim 12), intermediate 80, vocab 101, labels 3
TINY = {
    "bert": dict(model_type="bert", vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=80, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0,
                 layer_norm_eps=1e-12),
    "roberta": dict(model_type="roberta", vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=80, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                    layer_norm_eps=1e-5),
}
NUM_LABELS = 3


def inputs(kind):
    """(input_ids, attention_mask, token_type_ids), each (3, 9): row 1 padded after 6 tokens, row 2 after 3."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 101, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = mask[2, 3:] = 0
    ids[mask == 0] = TINY[kind]["pad_token_id"]
    types = np.zeros_like(ids) if kind == "roberta" else np.broadcast_to(np.arange(9) >= 4, ids.shape).astype(np.int64)
    return ids, mask, types



@pytest.fixture
def bare_bert(tmp_path):
    """A random bare BertModel checkpoint (keys `embeddings.*`, `pooler.*`, as all-MiniLM-L6-v2) and its variables."""
    model = bert.BertModel(bert.BertConfig.from_hf(TINY["bert"]))
    variables = model.init(jax.random.key(0), jnp.asarray(inputs("bert")[0]))
    return save_checkpoint(tmp_path / "bare", TINY["bert"], variables), variables


def test_paths_mirror_hugging_face_and_bare_checkpoint_loads(bare_bert):
    directory, variables = bare_bert
    model, loaded = bert.from_pretrained(directory)
    assert isinstance(model, bert.BertModel)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    paths = dict(named_leaves(loaded))
    for path in ("params/embeddings/word_embeddings/embedding", "params/encoder/layer/1/attention/self/query/kernel",
                 "params/encoder/layer/0/attention/output/LayerNorm/scale", "params/encoder/layer/0/output/dense/bias",
                 "params/encoder/layer/0/intermediate/dense/kernel", "params/pooler/dense/kernel"):
        assert path in paths, path
    assert paths["params/encoder/layer/0/intermediate/dense/kernel"].shape == (48, 80)


def test_fresh_classifier_head_on_bare_checkpoint(bare_bert):
    directory, variables = bare_bert
    with pytest.raises(ValueError, match="classifier.*key="):
        bert.from_pretrained(directory, num_labels=NUM_LABELS)
    model, loaded = bert.from_pretrained(directory, num_labels=NUM_LABELS, key=jax.random.key(5))
    jax.tree.map(np.testing.assert_array_equal, loaded["params"]["bert"], variables["params"])
    head = loaded["params"]["classifier"]
    assert head["kernel"].shape == (48, NUM_LABELS) and not head["bias"].any()
    assert 0.01 < float(head["kernel"].std()) < 0.03  # N(0, initializer_range 0.02)
    ids, mask, types = inputs("bert")
    logits = model.apply(loaded, ids, mask, types)
    assert logits.shape == (3, NUM_LABELS)
    # dropout: active only with deterministic=False and a 'dropout' key
    train = model.apply(loaded, ids, mask, types, deterministic=False, rngs={"dropout": jax.random.key(6)})
    assert not np.allclose(train, logits)


def test_errors(bare_bert, tmp_path):
    directory, _ = bare_bert
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        bert.from_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(config | {"hidden_size": 64}))
    with pytest.raises(ValueError, match=r"embeddings.word_embeddings.weight: checkpoint \(101, 48\), model expects "
                                         r"\(101, 64\)"):
        bert.from_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(config | {"hidden_size": 50}))
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        bert.from_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        bert.from_pretrained(directory)
    with pytest.raises(FileNotFoundError, match="config.json"):
        bert.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="exceeds the 64 positions"):
        model = bert.BertModel(bert.BertConfig.from_hf(TINY["bert"]))
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 65), jnp.int32))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_lora_on_classifier(kind, tmp_path):
    base = bert.BertModel(bert.BertConfig.from_hf(TINY[kind]))
    directory = save_checkpoint(tmp_path, TINY[kind], base.init(jax.random.key(0), jnp.asarray(inputs(kind)[0])))
    if kind == "roberta":  # RobertaForSequenceClassification has no pooler: its weights are skipped, with a warning
        with pytest.warns(hf.UnusedTensorsWarning, match=r"2 tensors of heads.*'pooler\.dense\.bias'"):
            model, variables = bert.from_pretrained(directory, num_labels=NUM_LABELS, key=jax.random.key(1))
    else:
        model, variables = bert.from_pretrained(directory, num_labels=NUM_LABELS, key=jax.random.key(1))
    ids, mask, types = map(jnp.asarray, inputs(kind))
    config = jlora.LoraConfig(rank=8, alpha=16, targets=("query", "value"), modules_to_save=("classifier",))
    lora, frozen, adapters = assert_factored_equals_merged(model.apply, variables, (ids, mask, types), config)
    assert adapters["params"][kind]["encoder"]["layer"]["1"]["attention"]["self"]["query"]["kernel"]["lora_a"].shape \
        == (48, 8)

    labels = jnp.array([0, 2, 1])
    tx = jlora.masked_optimizer(optax.adamw(1e-2), config)

    @jax.jit
    def step(adapters, opt_state):
        loss_fn = lambda a: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            lora.apply(frozen, a, ids, mask, types), labels).mean()
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    opt_state, losses = tx.init(adapters), []
    for _ in range(8):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------- reference: transformers


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """{kind: (directory, logits (3, 3))}: random Bert/RobertaForSequenceClassification saved by save_pretrained."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = {}
    for kind, cls in (("bert", "Bert"), ("roberta", "Roberta")):
        torch.manual_seed(0)
        config = getattr(transformers, f"{cls}Config")(**TINY[kind], num_labels=NUM_LABELS)
        model = getattr(transformers, f"{cls}ForSequenceClassification")(config).eval()
        with torch.no_grad():  # non-trivial LayerNorms and biases
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            ids, mask, types = (torch.as_tensor(a) for a in inputs(kind))
            logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
        directory = tmp_path_factory.mktemp(kind)
        model.save_pretrained(directory)
        out[kind] = directory, logits
    return out


@pytest.mark.reference
@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_sequence_classification_matches_transformers(hf_tiny, kind, dtype, atol):
    directory, want = hf_tiny[kind]
    model, variables = bert.from_pretrained(directory, dtype=dtype)
    assert isinstance(model, bert.BertForSequenceClassification) and model.config.num_labels == NUM_LABELS
    assert ("pooler" in variables["params"][kind]) == (kind == "bert")
    logits = jax.jit(model.apply)(variables, *map(jnp.asarray, inputs(kind)))
    assert logits.dtype == dtype
    np.testing.assert_allclose(np.asarray(logits, np.float32), want, atol=atol, rtol=0)


@pytest.mark.reference
@pytest.mark.assets
def test_minilm_matches_transformers(minilm_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest, not tokenizer.json's fixed 128
    sentences = ["A man is eating food.", "The quick brown fox jumps over the lazy dog by the river bank.", "Hi",
                 "LoRA adapts large pretrained models with few trainable parameters."]
    enc = tokenizer.encode_batch(sentences)
    ids, mask, types = (np.array([getattr(e, f) for e in enc]) for f in ("ids", "attention_mask", "type_ids"))
    assert mask.sum(1).min() < ids.shape[1]  # padding is exercised
    reference = transformers.AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(*(torch.as_tensor(a) for a in (ids, mask, types))).last_hidden_state.numpy()
    want_pooled = (want * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)

    model, variables = bert.from_pretrained(minilm_dir)
    hidden, pooled = jax.jit(model.apply)(variables, ids, mask, types)
    assert hidden.shape == (4, ids.shape[1], 384) and pooled.shape == (4, 384)
    np.testing.assert_allclose(hidden, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(bert.mean_pool(hidden, mask), want_pooled, atol=1e-4, rtol=0)

    model, variables = bert.from_pretrained(minilm_dir, dtype=jnp.bfloat16)  # measured cosine >= 0.9999
    got = np.asarray(bert.mean_pool(jax.jit(model.apply)(variables, ids, mask, types)[0], mask), np.float32)
    cosine = (got * want_pooled).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want_pooled, axis=1)
    assert cosine.min() > 0.999, cosine

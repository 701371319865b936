"""BERT and RoBERTa encoders in flax.linen, equivalent to transformers' BertModel / BertForSequenceClassification
(and the Roberta* ones), with parameter paths that mirror the Hugging Face names ('.' -> '/'):
`params/bert/encoder/layer/0/attention/self/query/kernel` is `bert.encoder.layer.0.attention.self.query.weight`
(transposed), so PEFT-style targets `("query", "value")` work unchanged with jlora.

    model, variables = from_pretrained(directory, num_labels=2, key=jax.random.key(0))
    logits = model.apply(variables, input_ids, attention_mask)  # (batch, 2)

RoBERTa differs from BERT in three places, all driven by `model_type`: position ids count from pad_token_id + 1 over
the non-pad tokens (pads get pad_token_id), the parameters live under `roberta`, and the classification head is
`classifier/dense` + tanh + `classifier/out_proj` on the first token instead of BERT's pooler + `classifier`.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models import hf, shards
from jlora.paths import named_leaves, nest

_TANH_GELU = partial(jax.nn.gelu, approximate=True)
ACTIVATIONS = {"gelu": partial(jax.nn.gelu, approximate=False), "gelu_new": _TANH_GELU, "gelu_pytorch_tanh": _TANH_GELU,
               "relu": jax.nn.relu, "silu": jax.nn.silu}
MODEL_TYPES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT/RoBERTa encoder, named as in the Hugging Face config.json."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # exact (erf) gelu, as Hugging Face's "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # RoBERTa: 1
    layer_norm_eps: float = 1e-12  # RoBERTa: 1e-5
    pad_token_id: int = 0  # RoBERTa: 1; its positions start at pad_token_id + 1
    model_type: str = "bert"
    num_labels: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None: hidden_dropout_prob
    initializer_range: float = 0.02  # std of the normal init of fresh weights

    def __post_init__(self):
        for f in dataclasses.fields(self):  # config.json's ints and floats (not bools, not strings)
            if type(f.default) in (int, float) and type(getattr(self, f.name)) not in (int, type(f.default)):
                raise ValueError(f"{f.name} must be a {type(f.default).__name__}, got {getattr(self, f.name)!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {list(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_hf(cls, config: dict) -> BertConfig:
        """From a Hugging Face config.json dict; unknown keys are ignored, num_labels falls back to len(id2label)."""
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type={config['position_embedding_type']!r} is not supported; "
                             f"only 'absolute'")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields} | {"model_type": config.get("model_type")}
        if "num_labels" not in kwargs and "id2label" in config:
            kwargs["num_labels"] = len(config["id2label"])
        return cls(**kwargs)


def _dense(config: BertConfig, features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=dtype, name=name,
                    kernel_init=nn.initializers.normal(config.initializer_range))


def _norm(config: BertConfig, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(config.layer_norm_eps, dtype=dtype, param_dtype=dtype, name="LayerNorm")


class _Block(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32  # of the parameters and the computation (softmax and LayerNorm statistics in f32)


class BertEmbeddings(_Block):
    @nn.compact
    def __call__(self, input_ids, token_type_ids, *, deterministic: bool):
        """input_ids, token_type_ids: (batch, seq) ints -> (batch, seq, hidden)."""
        c = self.config
        if c.model_type == "roberta":  # fairseq's make_positions: pads keep pad_token_id, tokens count from it + 1
            not_pad = (input_ids != c.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(not_pad, axis=1) * not_pad + c.pad_token_id
        else:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        embed = partial(nn.Embed, features=c.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                        embedding_init=nn.initializers.normal(c.initializer_range))
        x = (embed(c.vocab_size, name="word_embeddings")(input_ids)
             + embed(c.type_vocab_size, name="token_type_embeddings")(token_type_ids)
             + embed(c.max_position_embeddings, name="position_embeddings")(positions))
        x = _norm(c, self.dtype)(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(_Block):
    @nn.compact
    def __call__(self, x, bias, *, deterministic: bool):
        """x: (batch, seq, hidden); bias: (batch, 1, 1, seq) added to the scores -> (batch, seq, hidden)."""
        c = self.config
        heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))  # noqa: E731
        q, k, v = (split(_dense(c, c.hidden_size, n, self.dtype)(x)) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim) + bias
        probs = nn.Dropout(c.attention_probs_dropout_prob)(jax.nn.softmax(scores, axis=-1).astype(self.dtype),
                                                           deterministic=deterministic)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)


class BertAddNorm(_Block):
    """Hugging Face's BertSelfOutput / BertOutput: LayerNorm(dropout(dense(h)) + residual)."""

    @nn.compact
    def __call__(self, h, residual, *, deterministic: bool):
        """h: (batch, seq, any); residual: (batch, seq, hidden) -> (batch, seq, hidden)."""
        c = self.config
        h = nn.Dropout(c.hidden_dropout_prob)(_dense(c, c.hidden_size, "dense", self.dtype)(h),
                                              deterministic=deterministic)
        return _norm(c, self.dtype)(h + residual)


class BertAttention(_Block):
    @nn.compact
    def __call__(self, x, bias, *, deterministic: bool):
        """x: (batch, seq, hidden); bias: (batch, 1, 1, seq) -> (batch, seq, hidden)."""
        h = BertSelfAttention(self.config, self.dtype, name="self")(x, bias, deterministic=deterministic)
        return BertAddNorm(self.config, self.dtype, name="output")(h, x, deterministic=deterministic)


class BertIntermediate(_Block):
    @nn.compact
    def __call__(self, x):
        """x: (batch, seq, hidden) -> (batch, seq, intermediate)."""
        c = self.config
        return ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "dense", self.dtype)(x))


class BertLayer(_Block):
    @nn.compact
    def __call__(self, x, bias, *, deterministic: bool):
        """x: (batch, seq, hidden); bias: (batch, 1, 1, seq) -> (batch, seq, hidden)."""
        c, d = self.config, self.dtype
        h = BertAttention(c, d, name="attention")(x, bias, deterministic=deterministic)
        inner = BertIntermediate(c, d, name="intermediate")(h)
        return BertAddNorm(c, d, name="output")(inner, h, deterministic=deterministic)


class BertLayers(_Block):
    """Hugging Face's `encoder.layer` list: submodules named "0", "1", ... (BertModel nests it in `encoder`)."""

    @nn.compact
    def __call__(self, x, bias, *, deterministic: bool):
        """x: (batch, seq, hidden); bias: (batch, 1, 1, seq) -> (batch, seq, hidden)."""
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, self.dtype, name=str(i))(x, bias, deterministic=deterministic)
        return x


class BertEncoder(_Block):
    @nn.compact
    def __call__(self, x, bias, *, deterministic: bool):
        """x: (batch, seq, hidden); bias: (batch, 1, 1, seq) -> (batch, seq, hidden)."""
        return BertLayers(self.config, self.dtype, name="layer")(x, bias, deterministic=deterministic)


class BertPooler(_Block):
    @nn.compact
    def __call__(self, hidden):
        """hidden: (batch, seq, hidden) -> tanh(dense(hidden[:, 0])): (batch, hidden)."""
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense", self.dtype)(hidden[:, 0]))


class BertModel(_Block):
    """transformers' BertModel / RobertaModel. `add_pooling_layer=False` leaves out the pooler (as Hugging Face's
    RobertaForSequenceClassification does)."""

    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic: bool = True):
        """input_ids: (batch, seq) ints; attention_mask: (batch, seq), 1 for tokens, 0 for padding (default all 1);
        token_type_ids: (batch, seq) ints (default 0). Returns (last hidden state (batch, seq, hidden), pooled
        output (batch, hidden) or None without the pooler). Dropout needs `rngs={"dropout": key}` when
        `deterministic=False`."""
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
        limit = c.max_position_embeddings - (c.pad_token_id + 1 if c.model_type == "roberta" else 0)
        if input_ids.shape[1] > limit:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the {limit} positions the model has")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        x = BertEmbeddings(c, self.dtype, name="embeddings")(input_ids, token_type_ids, deterministic=deterministic)
        x = BertEncoder(c, self.dtype, name="encoder")(x, bias, deterministic=deterministic)
        pooled = BertPooler(c, self.dtype, name="pooler")(x) if self.add_pooling_layer else None
        return x, pooled


class BertForSequenceClassification(_Block):
    """transformers' BertForSequenceClassification (pooler -> dropout -> `classifier`) or, for model_type "roberta",
    RobertaForSequenceClassification (first token -> dropout -> `classifier/dense` -> tanh -> dropout ->
    `classifier/out_proj`; no pooler). Parameters under `bert` or `roberta`."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic: bool = True):
        """input_ids, attention_mask, token_type_ids: (batch, seq), as BertModel -> logits (batch, num_labels)."""
        c, d = self.config, self.dtype
        roberta = c.model_type == "roberta"
        hidden, pooled = BertModel(c, d, add_pooling_layer=not roberta, name=c.model_type)(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        drop = partial(nn.Dropout(c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout),
                       deterministic=deterministic)
        if not roberta:
            return _dense(c, c.num_labels, "classifier", d)(drop(pooled))
        return RobertaClassificationHead(c, d, name="classifier")(hidden, drop)


class RobertaClassificationHead(_Block):
    @nn.compact
    def __call__(self, hidden, drop):
        """hidden: (batch, seq, hidden); drop: the classifier dropout -> logits (batch, num_labels)."""
        c = self.config
        x = jnp.tanh(_dense(c, c.hidden_size, "dense", self.dtype)(drop(hidden[:, 0])))
        return _dense(c, c.num_labels, "out_proj", self.dtype)(drop(x))


def mean_pool(hidden, attention_mask):
    """sentence-transformers' mean pooling (all-MiniLM-L6-v2's): the mean of the token states where
    attention_mask is 1. hidden: (batch, seq, hidden); attention_mask: (batch, seq) -> (batch, hidden)."""
    mask = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)


def from_pretrained(path_or_dir: str | os.PathLike, *, dtype=jnp.float32, num_labels: int | None = None,
                    key: jax.Array | None = None, strict: bool = True, mesh=None, rules=None) -> tuple[nn.Module, dict]:
    """(module, variables) from a Hugging Face directory (config.json + safetensors) or hub id: a
    BertForSequenceClassification when `num_labels` is given or the checkpoint holds `classifier.*`, else a BertModel.
    Bare (`embeddings.*`, as all-MiniLM-L6-v2) and prefixed (`bert.*` / `roberta.*`) checkpoints load into either.
    Weights the checkpoint lacks (the classifier head, the pooler of a BERT classifier) are initialised as Hugging Face
    does (kernels ~ N(0, initializer_range), biases 0) from `key`, then required. Heads of other tasks (`cls.*`,
    `lm_head.*`, a pooler the module lacks) are skipped with an UnusedTensorsWarning, `position_ids` silently; other
    unused tensors (e.g. layers beyond `num_hidden_layers`) are a ValueError naming them, or with `strict=False` an
    UnusedTensorsWarning. `mesh`, `rules`: see `models.from_pretrained` (fresh weights: made, then placed)."""
    directory = hf.resolve(path_or_dir)
    config = hf.parse_config(BertConfig.from_hf, hf.read_config(directory), source=directory / "config.json")
    tensors = hf.read_safetensors(directory, lazy=mesh is not None)
    prefix = config.model_type + "."
    prefixed = any(k.startswith(prefix) for k in tensors)
    if num_labels is not None or any(k.startswith("classifier.") for k in tensors):
        config = dataclasses.replace(config, num_labels=config.num_labels if num_labels is None else num_labels)
        module = BertForSequenceClassification(config, dtype)
    else:
        pooler = any(k.removeprefix(prefix).startswith("pooler.") for k in tensors)
        module = BertModel(config, dtype, add_pooling_layer=pooler)
    classifier = isinstance(module, BertForSequenceClassification)
    template = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    shardings = shards.placement(template, mesh, rules, "bert")

    def key_of(path: str) -> str | None:  # None: absent, initialised fresh below
        name = hf.default_key(path)  # params/bert/pooler/dense/kernel -> bert.pooler.dense.weight
        if classifier and not prefixed:
            name = name.removeprefix(prefix)
        elif prefixed and not classifier:
            name = prefix + name
        fresh = name.startswith(("classifier.", prefix + "pooler.", "pooler."))
        return None if fresh and name not in tensors else name

    variables = hf.convert(template, tensors, key_of=key_of, transpose=hf.TRANSPOSED[config.model_type], dtype=dtype,
                           source=str(directory), strict=strict, buffers=(r"(?:^|\.)(?:position|token_type)_ids$",),
                           heads=(r"^cls\.", r"^lm_head\.", r"^(?:bert\.|roberta\.)?pooler\."),
                           layers=("num_hidden_layers", config.num_hidden_layers), shardings=shardings)
    fresh = [(p, x.shape) for p, x in named_leaves(template) if key_of(p) is None]
    if fresh and key is None:
        missing = sorted({hf.default_key(p).rsplit(".", 1)[0] for p, _ in fresh})
        raise ValueError(f"{directory} has no weights for {missing}; pass key=jax.random.key(...) to initialise them")
    flat, normal = dict(named_leaves(variables)), nn.initializers.normal(config.initializer_range)
    for i, (path, shape) in enumerate(fresh):  # with a mesh, then placed by its sharding
        init = nn.initializers.zeros if path.endswith("/bias") else normal
        flat[path] = shards.create(partial(init, jax.random.fold_in(key, i), shape, dtype), (shardings or {}).get(path))
    return module, nest(flat)

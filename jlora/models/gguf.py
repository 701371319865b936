"""GGUF (llama.cpp) Llama files read into Hugging Face form: a config dict, tensors under HF names, and the
byte-level BPE tokenizer stored in the metadata; and Llama variables written back as GGUF (`write_gguf`).

    hf_config, tensors, tokenizer = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    module, variables = jlora.models.llama.from_tensors(hf_config, tensors)
    module, variables = jlora.models.from_pretrained("x.gguf", quantized=True)   # the file's blocks, undequantized
    written = write_gguf("merged.gguf", variables, like="x.gguf")                # {tensor: (type, how)}

Quantized tensors are dequantized by the `gguf` package (`gguf.quants.dequantize`), or with `quantized=True` kept
as `jlora.qarray.QuantizedArray`s of the file's blocks (`jlora.quant_gguf` decodes them in JAX). llama.cpp's
converter permutes the rows of attn_q / attn_k from HF's rotate-half RoPE layout to its interleaved one; `unpermute`
undoes that (on float rows, or on rows of blocks).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) whose split is GPT-2's regex, optionally after isolating
# every digit (llama-vocab.cpp: "\p{N}" then the GPT-2 regex).
GPT2_PRE = {"gpt-2", "gpt2", "mpt", "olmo", "jais"}
DIGITS_GPT2_PRE = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"}
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # gguf.TokenType


def hf_name(name: str) -> str:
    """GGUF tensor name -> HF name (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m is None or m.group(2) not in BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {name!r} has no Llama counterpart in Hugging Face naming")
    return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.weight"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)`: rows (n_head * head_dim, in) from the interleaved RoPE order
    (pairs 2j, 2j+1) back to HF's rotate-half order (j, j + head_dim / 2), per head."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot undo the RoPE permutation: {rows} rows is not a multiple of 2 * {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute(w, n_head)` (convert_hf_to_gguf.py), the inverse of `unpermute`: rows from HF's
    rotate-half order to the interleaved one. Any trailing axes (rows of float weights, or of blocks)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot apply the RoPE permutation: {rows} rows is not a multiple of 2 * {n_head} heads")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def build_tokenizer(meta: dict, *, source: str = ""):
    """A `tokenizers.Tokenizer` byte-level BPE from tokenizer.ggml.{tokens, merges, token_type, pre}; control tokens
    (type 3) become special added tokens, user-defined ones (type 4) added tokens."""
    from tokenizers import AddedToken, processors

    from jlora.tokenizers import bpe_from_vocab_merges

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    if pre not in GPT2_PRE | DIGITS_GPT2_PRE:
        raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; known: "
                         f"{sorted(GPT2_PRE | DIGITS_GPT2_PRE)}")
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta.get("tokenizer.ggml.token_type", []))
    tokenizer = bpe_from_vocab_merges(
        {t: i for i, t in enumerate(tokens)}, list(meta.get("tokenizer.ggml.merges", [])),
        add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        split_digits=pre in DIGITS_GPT2_PRE,
        special_tokens=[t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])
    return tokenizer


def _n_head(name: str, heads: int, kv_heads: int) -> int | None:
    """The head count llama.cpp permuted the rows of tensor `name` by (attn_q: heads, attn_k: kv heads), or None."""
    return heads if name.endswith(".attn_q.weight") else kv_heads if name.endswith(".attn_k.weight") else None


def _tensor(t, quantized: bool, heads: int, kv_heads: int):
    """One ReaderTensor in torch layout: float32, or (`quantized` and a format jlora decodes) a QuantizedArray."""
    import gguf

    from jlora import quant_gguf
    from jlora.qarray import QuantizedArray

    shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne is (in, out); numpy / torch is (out, in)
    n_head = _n_head(t.name, heads, kv_heads)
    qtype = quant_gguf.qtype_of(t.tensor_type)
    if quantized and qtype is not None:
        _, size, nbytes = quant_gguf.FORMATS[qtype]
        blocks = np.asarray(t.data, dtype=np.uint8).reshape(-1, nbytes)
        if n_head is not None:  # each row of (out, in) is a whole number of blocks: permute rows of blocks
            blocks = unpermute(blocks.reshape(shape[0], -1), n_head).reshape(-1, nbytes)
        return QuantizedArray(jnp.asarray(blocks), None, shape=shape, dtype="float32", qtype=qtype, block_size=size)
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    return w if n_head is None else unpermute(w, n_head)


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); is it complete?") from e


def read_tokenizer(path: str | os.PathLike):
    """The GGUF file's own tokenizer, without reading (dequantising) its tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    return build_tokenizer(_metadata(_reader(path)), source=str(path))


def read_gguf(path: str | os.PathLike, *, quantized: bool = False) -> tuple[dict, dict, object]:
    """(HF LlamaForCausalLM config dict, {hf_name: array in torch layout, Linear (out, in)}, tokenizer).

    The arrays are float32, dequantized by `gguf.quants.dequantize`. With `quantized=True`, each tensor stored in a
    block format jlora decodes in JAX (`jlora.quant_gguf.FORMATS`: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k ... q6_k) is
    instead a `jlora.qarray.QuantizedArray` holding the file's raw blocks, uint8 (n_blocks, bytes per block), of
    logical shape (out, in) float32 (`.dequantize()` gives exactly the float32 array); attn_q / attn_k rows are
    un-permuted as whole rows of blocks. Tensors in F32 / F16 / BF16 (the norms) and in a block format jlora does
    not decode (the IQ* types, TQ*, ...) are dequantized to float32 arrays either way (`gguf.GGUFReader(path)
    .tensors` tells each tensor's `tensor_type`).

    Raises FileNotFoundError for a missing file and ValueError for an architecture other than llama, a tensor
    without a Llama counterpart, or an unsupported tokenizer (or `quantized=True` for a path not ending in .gguf).
    """
    path = Path(path).expanduser()
    if quantized and path.suffix != ".gguf":
        raise ValueError(f"quantized=True keeps a GGUF file's blocks, but {path} is not a .gguf file; load it in float "
                         f"and call jlora.quantize(variables, qtype=...) for a quantized frozen tree")
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    reader = _reader(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    heads = int(meta["llama.attention.head_count"])
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    tensors = {hf_name(t.name): _tensor(t, quantized, heads, kv_heads) for t in reader.tensors}
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor")
    hidden = int(meta["llama.embedding_length"])
    scaling = meta.get("llama.rope.scaling.type", "none")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0], "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": int(meta.get("llama.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None if scaling == "none" else {
            "rope_type": scaling, "factor": float(meta.get("llama.rope.scaling.factor", 1.0))},
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    return config, tensors, build_tokenizer(meta, source=str(path))


def write_gguf(path: str | os.PathLike, variables, *, like: str | os.PathLike, qtype: str | None = None) -> dict:
    """Llama `variables` written as a GGUF file with the metadata and tokenizer of `like`; see
    `jlora.models.gguf_write.write_gguf` (its own module: one concept per module)."""
    from jlora.models.gguf_write import write_gguf as write

    return write(path, variables, like=like, qtype=qtype)

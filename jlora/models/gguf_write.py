"""Llama variables (a merged model, float or quantized) written as a GGUF file for llama.cpp / ollama, with the
architecture metadata, tokenizer and tensor types of the GGUF file they were loaded from.

    module, variables = jlora.models.from_pretrained("x.Q4_1.gguf", quantized=True)
    ...                                                      # train adapters, merge them
    written = write_gguf("merged.gguf", merged, like="x.Q4_1.gguf")   # {"blk.0.attn_q.weight": ("q4_1", "..."), ...}

The file is written by the `gguf` package's GGUFWriter beside `path` and moved into place with `os.replace`, so a
crash never leaves a partial file at `path`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jlora import quant_gguf
from jlora.models.gguf import _n_head, _reader, hf_name, permute
from jlora.models.hf import default_key
from jlora.paths import named_leaves
from jlora.qarray import is_quantized

FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}
FILE_TYPES = {"q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
              "q8_0": "MOSTLY_Q8_0", "q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_M", "q4_k": "MOSTLY_Q4_K_M",
              "q5_k": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}


def write_gguf(path: str | os.PathLike, variables, *, like: str | os.PathLike,
               qtype: str | None = None) -> dict[str, tuple[str, str]]:
    """Write Llama `variables` (as `jlora.models.from_pretrained(like)` returns them: {"params": ...}, float arrays
    and/or QuantizedArrays) as a GGUF file at `path` with every metadata key of the GGUF file `like` (architecture,
    tokenizer, chat template; `general.file_type` follows the block type most tensors get when that changes), its
    tensors in its order.

    Each tensor's type:
      * a QuantizedArray of a GGUF qtype (`jlora.quant_gguf.FORMATS`) laid out as the file stores it (what
        `from_pretrained(..., quantized=True)` or `merge_requantized` gives): its raw blocks, no requantization
        (unless `qtype` names another type: then dequantized and encoded as `qtype`);
      * a float array (or a QuantizedArray of a jlora qtype, nf4 ..., dequantized first): `like`'s type for that
        tensor, or `qtype` for every tensor `like` stores in a block format; F32 / F16 / BF16 stay as they are. The
        `gguf` package quantizes q4_0, q4_1, q5_0, q5_1 and q8_0 only, so a K-quant falls back to
        `jlora.quant_gguf.FALLBACK` (q2_k -> q4_1, q3_k -> q4_0, q4_k -> q4_1, q5_k -> q5_1, q6_k -> q8_0) and a type
        jlora does not decode (IQ*, TQ*) to q8_0 (all of them 32-element blocks, so every row fits).
    attn_q / attn_k rows are permuted back to llama.cpp's interleaved RoPE order (rows of blocks for raw blocks).

    Returns {GGUF tensor name: (type written, how)}, how one of "raw blocks", "quantized", "float" or
    "fallback: <reason>" (nothing is changed silently). Raises ValueError for an unknown `qtype`, a `like` that is
    not a llama GGUF file, and a `variables` tree that is not that model's (a tensor missing, extra, or of another
    shape), each naming the file or path; FileNotFoundError for a missing `like`."""
    if qtype is not None and qtype not in quant_gguf.FORMATS:
        raise ValueError(f"write_gguf: unknown qtype {qtype!r}; choose one of {sorted(quant_gguf.FORMATS)} (or None "
                         f"to keep each tensor's type in {like})")
    like = Path(like).expanduser()
    if not like.is_file():
        raise FileNotFoundError(f"write_gguf: no such GGUF file like={like}; pass the .gguf file the variables were "
                                f"loaded from")
    reader = _reader(like)
    meta = {name: f.contents() for name, f in reader.fields.items()}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"write_gguf: like={like} is a GGUF file of architecture {meta.get('general.architecture')!r}"
                         f"; only 'llama' is written: pass the llama GGUF file the variables were loaded from")
    heads = int(meta["llama.attention.head_count"])
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    leaves = _by_hf_name(variables, reader.tensors, like)
    tensors, report = [], {}
    for t in reader.tensors:
        where, leaf = leaves[hf_name(t.name)]
        data, ggml, how = _tensor(leaf, t, qtype, _n_head(t.name, heads, kv_heads), where)
        tensors.append((t.name, data, ggml))
        report[t.name] = (ggml.name.lower(), how)
    before = [k for t in reader.tensors if (k := quant_gguf.qtype_of(t.tensor_type)) in FILE_TYPES]
    after = [kind for kind, _ in report.values() if kind in FILE_TYPES]
    file_type = None if _most(after) in (None, _most(before)) else FILE_TYPES[_most(after)]
    _write(Path(path).expanduser(), reader, tensors, file_type)
    return report


def _most(kinds: list[str]) -> str | None:
    return max(sorted(set(kinds)), key=kinds.count) if kinds else None


def _by_hf_name(variables, source_tensors, like: Path) -> dict[str, tuple[str, object]]:
    """{HF tensor name: (flax path, leaf)} for the tensors of `like`; a ValueError when the trees differ."""
    leaves = {}
    for where, leaf in named_leaves(variables):
        leaves[default_key(where) if "/" in where else where] = (where, leaf)
    wanted = {hf_name(t.name): tuple(int(n) for n in reversed(t.shape)) for t in source_tensors}
    missing = [k for k in wanted if k not in leaves]
    extra = [where for k, (where, _) in leaves.items() if k not in wanted]
    if missing or extra:
        raise ValueError(f"write_gguf: the variables are not those of the model in {like}: "
                         + (f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}; " if missing else "")
                         + (f"not in the file: {extra[:4]}{' ...' if len(extra) > 4 else ''}; " if extra else "")
                         + "pass the {'params': ...} tree from_pretrained(like) returns, adapters merged "
                           "(jlora.merge), no LoRA leaves")
    bad = []
    for k, shape in wanted.items():
        where, leaf = leaves[k]
        want = shape[::-1] if where.endswith("/kernel") else shape
        if tuple(leaf.shape) != want:
            bad.append(f"{where} has shape {tuple(leaf.shape)}, the file's tensor needs {want}")
    if bad:
        raise ValueError(f"write_gguf: the variables do not match the model in {like}: {'; '.join(bad[:4])}; pass "
                         f"the variables of this model (from_pretrained(like)), not of another size")
    return leaves


def _tensor(leaf, t, qtype: str | None, n_head: int | None, where: str):
    """(array for GGUFWriter.add_tensor in (out, in) rows, its GGMLQuantizationType, how) for one tensor."""
    import gguf

    kernel, shape = where.endswith("/kernel"), tuple(int(n) for n in reversed(t.shape))
    T = gguf.GGMLQuantizationType
    if is_quantized(leaf) and leaf.qtype in quant_gguf.FORMATS and qtype in (None, leaf.qtype) and (
            leaf.stored_shape == shape and leaf.perm == ((1, 0) if kernel else None)
            and shape[-1] % leaf.block_size == 0):
        rows = np.asarray(leaf.values, dtype=np.uint8).reshape(*shape[:-1], -1)
        return (rows if n_head is None else permute(rows, n_head)), quant_gguf.ggml_type(leaf.qtype), "raw blocks"
    w = leaf.dequantize(jnp.float32) if is_quantized(leaf) else jnp.asarray(leaf, jnp.float32)
    w = np.asarray(w.T if kernel else w, dtype=np.float32)
    if n_head is not None:
        w = permute(w, n_head)
    source = T(int(t.tensor_type))
    if source.name in FLOAT_TYPES:
        return w.astype(FLOAT_TYPES[source.name]), source, "float"
    if source == T.BF16:
        return gguf.quants.quantize(w, T.BF16), T.BF16, "float"
    if gguf.GGML_QUANT_SIZES[source][0] == 1:  # F64, I8 ...: not a type a Llama weight is read from
        return w, T.F32, f"fallback: {source.name} written as F32"
    want, how = qtype or quant_gguf.qtype_of(source), "quantized"
    if want is None:
        want, how = "q8_0", f"fallback: jlora does not decode {source.name}"
    if want not in quant_gguf.ENCODABLE:
        want, how = quant_gguf.FALLBACK[want], f"fallback: the gguf package cannot quantize {want}"
    blocks = quant_gguf.encode(w.reshape(-1, 32), want)  # every ggml block size is a multiple of 32, so rows fit
    return blocks.reshape(*w.shape[:-1], -1), quant_gguf.ggml_type(want), how


def _write(path: Path, reader, tensors, file_type: str | None) -> None:
    """GGUFWriter into a temporary file beside `path`, fsync, then `os.replace` (a crash leaves `path` as it was);
    `reader`'s metadata copied, `general.file_type` replaced by `file_type` (a gguf.LlamaFileType name) if given."""
    import gguf

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            value = field.contents()
            if name == "general.alignment":
                writer.add_custom_alignment(int(value))
            elif name == "general.file_type" and file_type is not None:
                writer.add_uint32(name, int(gguf.LlamaFileType[file_type]))
            elif field.types[0] != gguf.GGUFValueType.ARRAY:
                writer.add_key_value(name, value, field.types[0])
            elif len(value):  # the writer cannot store an empty array (nothing is lost)
                writer.add_key_value(name, value, field.types[0], sub_type=field.types[-1])
        for name, data, ggml in tensors:
            writer.add_tensor(name, data, raw_dtype=None if data.dtype != np.uint8 else ggml)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise

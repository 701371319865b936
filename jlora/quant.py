"""Quantized frozen trees: `quantize` replaces chosen weights by `QuantizedArray` pytree nodes, `dequantize` undoes it.

    frozen_q = jlora.quantize(frozen, qtype="nf4", block_size=64, double_quant=True)
    w = frozen_q["params"]["dense"]["kernel"].dequantize()   # inside jit too
    frozen_f = jlora.dequantize(frozen_q)                    # every QuantizedArray back to its float array

Layout (bitsandbytes'): the weight is flattened row-major and cut into contiguous blocks of `block_size` elements;
each block is scaled by its absmax (float32). 4-bit codes are packed two per uint8 byte, the first element of each
pair in the high nibble. qtypes:
  nf4   the QLoRA NormalFloat4 table (`quant_codes.NF4_TABLE`, bitsandbytes' values), code of x / absmax;
  int4  symmetric: round(x / (absmax / 7)) in -7..7 (stored as code + 8; -8 is never used, so 0 maps to 0);
  int8  symmetric: round(x / (absmax / 127)) in -127..127, one int8 per element;
  fp8   float8_e4m3fn of x / (absmax / 448), one byte per element (only where JAX has the dtype).
`double_quant=True` (QLoRA) stores the block scales themselves in 8 bits: minus their mean, int8 absmax/127 per
group of 256 blocks, with one float32 scale per group and the float32 mean.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from jlora import quant_codes as qc
from jlora.config import path_matches
from jlora.paths import path_str
from jlora.qarray import QuantizedArray, is_quantized

DEFAULT_NAMES = ("kernel", "weight", "embedding")


_is_q = is_quantized


def _check_options(qtype, block_size):
    if qtype not in qc.available_qtypes():
        extra = " (this JAX has no float8_e4m3fn, so no fp8)" if qtype == "fp8" else ""
        raise ValueError(f"quantize: unknown qtype {qtype!r}{extra}; choose one of {list(qc.available_qtypes())}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"quantize: block_size must be a positive int, got {block_size!r}; e.g. block_size=64")
    if qc.QTYPES[qtype][0] == 4 and block_size % 2:
        raise ValueError(f"quantize: qtype={qtype!r} packs two 4-bit codes per byte, so block_size must be even, "
                         f"got {block_size}; e.g. block_size=64 (the default)")


def _default_target(path: str, leaf) -> bool:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    return (shape is not None and len(shape) >= 2 and jnp.issubdtype(dtype, jnp.floating)
            and path.rsplit("/", 1)[-1] in DEFAULT_NAMES)


def _chooser(targets, leaves):
    """(path, leaf) -> bool for `targets`: None (the default), a tuple of names/regexes, a regex string, or a
    predicate; a tuple entry that matches no leaf is a ValueError."""
    if targets is None:
        return _default_target
    if callable(targets):
        return targets
    if isinstance(targets, str):
        return lambda p, _: re.fullmatch(targets, p) is not None
    if isinstance(targets, (tuple, list)) and all(isinstance(t, str) and t for t in targets):
        missing = [t for t in targets if not any(path_matches(p, t) for p, _ in leaves)]
        if missing:
            listed = ", ".join(p for p, _ in leaves[:40])
            raise ValueError(f"quantize: targets {missing} match no leaf (a name matches a '/'-suffix of the leaf "
                             f"or module path, or is a regex fully matching it); the leaves are: {listed}")
        return lambda p, _: any(path_matches(p, t) for t in targets)
    raise TypeError(f"quantize: targets must be None, a tuple of names/regexes, a regex string or a predicate "
                    f"(path, leaf) -> bool, got {targets!r}")


def _quantize_array(x, qtype: str, block_size: int, double_quant: bool) -> QuantizedArray:
    shape, dtype = tuple(x.shape), jnp.dtype(x.dtype).name
    blocks = jnp.asarray(x, jnp.float32).reshape(-1, block_size)
    absmax = qc.absmax_scales(blocks)
    values = qc.store(qc.encode(blocks, absmax, qtype), qtype).reshape(-1)
    scale_scales = scale_offset = None
    scales = absmax
    if double_quant:
        scales, scale_scales, scale_offset = qc.double_quantize(absmax)
    return QuantizedArray(values, scales, scale_scales, scale_offset, shape=shape, dtype=dtype, qtype=qtype,
                          block_size=block_size)


_quantize_jit = jax.jit(_quantize_array, static_argnums=(1, 2, 3))


def _check_leaf(path: str, leaf, qtype: str, block_size: int):
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"quantize: targets selected {path!r} ({type(leaf).__name__}, dtype {dtype}), which is not a "
                        f"floating array; only float weights can be quantized: leave {path!r} out of targets")
    n = math.prod(shape)
    if n == 0 or n % block_size:
        even = qc.QTYPES[qtype][0] == 4
        fits = [d for d in range(block_size, 0, -1) if n % d == 0 and not (even and d % 2)]
        fix = (f"pass a block_size that divides {n} (e.g. {fits[0]})" if fits else
               f"it has no even block size for qtype={qtype!r}: quantize it as int8/fp8")
        raise ValueError(f"quantize: {path!r} has shape {tuple(shape)} ({n} elements), which block_size={block_size} "
                         f"does not divide (blocks run over the row-major flattened weight); {fix} or leave {path!r} "
                         f"out of targets")
    concrete = not isinstance(leaf, jax.core.Tracer) and isinstance(leaf, (np.ndarray, jax.Array))
    if concrete and not bool(jnp.all(jnp.isfinite(leaf))):
        raise ValueError(f"quantize: {path!r} holds inf or NaN, whose block scale would corrupt every value of "
                             f"the block; fix the weight or leave {path!r} out of targets")


def quantize(variables, *, qtype: str = "nf4", block_size: int = 64, targets=None, double_quant: bool = False):
    """`variables` with the chosen weights replaced by `QuantizedArray`s (other leaves untouched).

    Args:
      variables: any pytree of arrays (or `jax.ShapeDtypeStruct`s, e.g. under `jax.eval_shape`); leaves that are
        already `QuantizedArray`s are kept as they are.
      qtype: "nf4", "int4", "int8" or "fp8" (see the module docstring).
      block_size: elements per scale block, over the row-major flattened weight; must divide each chosen weight's
        size (even for the 4-bit qtypes).
      targets: None (default): every floating leaf of at least 2 dims whose name is "kernel", "weight" or
        "embedding" (the weights jlora can adapt; biases, norms and scalars stay float). Otherwise, as
        `LoraConfig.targets`: a tuple of names (a '/'-suffix of the leaf or module path) or regexes (fully matching
        either), a regex string fully matching the leaf path, or a predicate `(path, leaf) -> bool`.
      double_quant: also quantize the per-block scales to 8 bits (QLoRA's double quantization).

    Raises ValueError for an unknown qtype, a bad block_size, a block_size not dividing a chosen weight, a tuple
    target matching nothing, or non-finite values; TypeError when a chosen leaf is not a floating array.
    """
    _check_options(qtype, block_size)
    leaves = [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(variables, is_leaf=_is_q)[0]]
    choose = _chooser(targets, [(p, x) for p, x in leaves if not _is_q(x)])

    def one(path, leaf):
        p = path_str(path)
        if _is_q(leaf) or not choose(p, leaf):
            return leaf
        _check_leaf(p, leaf, qtype, block_size)
        if isinstance(leaf, jax.ShapeDtypeStruct):  # abstract in, abstract out
            return jax.eval_shape(lambda w: _quantize_array(w, qtype, block_size, bool(double_quant)), leaf)
        return _quantize_jit(leaf, qtype, block_size, bool(double_quant))

    return jax.tree_util.tree_map_with_path(one, variables, is_leaf=_is_q)


def dequantize(tree, dtype=None):
    """`tree` with every `QuantizedArray` replaced by its float array (its original dtype, or `dtype`)."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if _is_q(x) else x, tree, is_leaf=_is_q)


def requantize_like(q: QuantizedArray, x) -> QuantizedArray:
    """`x` (a float array of `q.shape`) quantized as `q` is: same qtype, block size, double quantization, layout.
    GGUF qtypes are encoded on the host by the `gguf` package (`jlora.quant_gguf.encode`), which cannot write the
    K-quants: those become `quant_gguf.FALLBACK[qtype]` (q4_k -> q4_1, q6_k -> q8_0, ...; check `.qtype`)."""
    if tuple(x.shape) != tuple(q.shape):
        raise ValueError(f"requantize_like: an array of shape {tuple(x.shape)} cannot take the place of a "
                         f"QuantizedArray of shape {q.shape}")
    stored = x if q.perm is None else jnp.transpose(x, np.argsort(q.perm))
    if q.qtype in qc.QTYPES:
        out = _quantize_jit(stored, q.qtype, q.block_size, q.double_quant)
    else:
        from jlora import quant_gguf

        qtype = q.qtype if q.qtype in quant_gguf.ENCODABLE else quant_gguf.FALLBACK[q.qtype]
        size = quant_gguf.block_size(qtype)
        blocks = np.asarray(stored, np.float32).reshape(-1, size)
        out = QuantizedArray(jnp.asarray(quant_gguf.encode(blocks, qtype)), None, qtype=qtype, block_size=size)
    return dataclasses.replace(out, shape=tuple(q.shape), dtype=q.dtype, perm=q.perm)

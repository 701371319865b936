"""llama.cpp's GGUF block formats decoded in JAX (traceable: the frozen tree keeps the file's bytes and each weight
is dequantized at its use inside jit), and encoded on the host by the `gguf` package.

    w = decode(blocks, "q4_1")          # uint8 (n_blocks, 20) -> float32 (n_blocks, 32), == gguf.quants.dequantize
    blocks = encode(w, "q4_1")          # float32 (n_blocks, 32) numpy -> uint8 (n_blocks, 20), gguf.quants.quantize

qtypes are the ggml type names in lower case. `decode` mirrors the `gguf` package's numpy `dequantize_blocks`
operation by operation in float32 (f16 fields read with `lax.bitcast_convert_type`), so it equals it bitwise
(tests/test_quant_gguf.py). The K-quants (256-element super-blocks) live in `jlora.quant_gguf_k`. The `gguf`
package quantizes q4_0, q4_1, q5_0, q5_1 and q8_0 only; `encode` raises a ValueError for the K-quants, and
`FALLBACK` names the nearest type it can write instead (used by `jlora.models.gguf.write_gguf`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import quant_gguf_k as qk

# qtype: (ggml type enum, elements per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES
FORMATS = {
    "q4_0": (2, 32, 18), "q4_1": (3, 32, 20), "q5_0": (6, 32, 22), "q5_1": (7, 32, 24), "q8_0": (8, 32, 34),
    "q2_k": (10, 256, 84), "q3_k": (11, 256, 110), "q4_k": (12, 256, 144), "q5_k": (13, 256, 176),
    "q6_k": (14, 256, 210),
}
ENCODABLE = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")  # what gguf.quants.quantize implements
# the type written in place of one the gguf package cannot quantize: the same kind (with or without a per-block
# minimum) at no fewer bits per weight
FALLBACK = {"q2_k": "q4_1", "q3_k": "q4_0", "q4_k": "q4_1", "q5_k": "q5_1", "q6_k": "q8_0"}


def _check(qtype: str) -> None:
    if qtype not in FORMATS:
        raise ValueError(f"unknown GGUF qtype {qtype!r}; jlora decodes {sorted(FORMATS)} (ggml type names in lower "
                         f"case); dequantize other types with gguf.quants.dequantize")


def block_size(qtype: str) -> int:
    """Elements per block of `qtype` (32, or 256 for the K-quants)."""
    _check(qtype)
    return FORMATS[qtype][1]


def block_bytes(qtype: str) -> int:
    """Bytes per block of `qtype` (e.g. 20 for q4_1)."""
    _check(qtype)
    return FORMATS[qtype][2]


def qtype_of(ggml_type) -> str | None:
    """The qtype name of a `gguf.GGMLQuantizationType` (or its int), or None when jlora does not decode it."""
    return next((name for name, (enum, _, _) in FORMATS.items() if enum == int(ggml_type)), None)


def ggml_type(qtype: str):
    """The `gguf.GGMLQuantizationType` of a qtype name ("q4_1" -> GGMLQuantizationType.Q4_1)."""
    import gguf

    _check(qtype)
    return gguf.GGMLQuantizationType(FORMATS[qtype][0])


def f16(b):
    """uint8 (..., 2) little-endian float16 bytes -> float32 (..., 1)."""
    return lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)[..., None]


def nibbles(b):
    """uint8 (n, k) -> (n, 2k): the low nibbles of the k bytes, then their high nibbles (ggml's order)."""
    return jnp.concatenate([b & jnp.uint8(0x0F), b >> jnp.uint8(4)], axis=-1)


def bits(b, count: int = 8):
    """uint8 (n, k) -> (n, 8k) bit j of the little-endian bit string (bit j % 8 of byte j // 8), as uint8 0/1."""
    shifts = jnp.arange(count, dtype=jnp.uint8)
    return ((b[..., :, None] >> shifts) & jnp.uint8(1)).reshape(*b.shape[:-1], -1)


def _q4_0(v):
    q = nibbles(v[:, 2:]).astype(jnp.int8) - jnp.int8(8)
    return f16(v[:, 0:2]) * q.astype(jnp.float32)


def _q4_1(v):
    q = nibbles(v[:, 4:]).astype(jnp.float32)
    return (f16(v[:, 0:2]) * q) + f16(v[:, 2:4])


def _q5_0(v):
    q = (nibbles(v[:, 6:]) | (bits(v[:, 2:6]) << jnp.uint8(4))).astype(jnp.int8) - jnp.int8(16)
    return f16(v[:, 0:2]) * q.astype(jnp.float32)


def _q5_1(v):
    q = (nibbles(v[:, 8:]) | (bits(v[:, 4:8]) << jnp.uint8(4))).astype(jnp.float32)
    return (f16(v[:, 0:2]) * q) + f16(v[:, 2:4])


def _q8_0(v):
    return lax.bitcast_convert_type(v[:, 2:], jnp.int8).astype(jnp.float32) * f16(v[:, 0:2])


_DECODERS = {"q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1, "q8_0": _q8_0, "q2_k": qk.q2_k,
             "q3_k": qk.q3_k, "q4_k": qk.q4_k, "q5_k": qk.q5_k, "q6_k": qk.q6_k}


def decode(values, qtype: str):
    """GGUF blocks uint8 (n_blocks, bytes per block) -> float32 (n_blocks, block size), bitwise equal to
    `gguf.quants.dequantize`. Traceable (jit, vmap, eval_shape); raises a ValueError for an unknown qtype or blocks
    of the wrong width."""
    _check(qtype)
    _, size, nbytes = FORMATS[qtype]
    if values.ndim != 2 or values.shape[1] != nbytes or values.dtype != jnp.uint8:
        raise ValueError(f"decode({qtype!r}) takes uint8 blocks (n_blocks, {nbytes}), got {values.dtype} "
                         f"{tuple(values.shape)}; reshape the tensor's bytes to (-1, {nbytes})")
    out = _DECODERS[qtype](jnp.asarray(values))
    return out.reshape(values.shape[0], size)


def encode(x, qtype: str) -> np.ndarray:
    """float (n_blocks, block size) -> uint8 GGUF blocks (n_blocks, bytes per block), by `gguf.quants.quantize`
    on the host (numpy; not traceable). Raises a ValueError for a qtype the gguf package cannot quantize (the
    K-quants: use `FALLBACK[qtype]`, or llama.cpp's `llama-quantize` on a file written in f32/q8_0) or a wrong
    width."""
    import gguf

    _check(qtype)
    if qtype not in ENCODABLE:
        raise ValueError(f"the gguf package cannot quantize {qtype!r} (it quantizes {list(ENCODABLE)}); write "
                         f"{FALLBACK[qtype]!r} instead, or write q8_0 / f32 and run llama.cpp's llama-quantize")
    size = FORMATS[qtype][1]
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != size:
        raise ValueError(f"encode({qtype!r}) takes float blocks (n_blocks, {size}), got {x.shape}; reshape the "
                         f"weight (row-major, rows a multiple of {size} long) to (-1, {size})")
    return np.asarray(gguf.quants.quantize(x, ggml_type(qtype)), dtype=np.uint8).reshape(x.shape[0], -1)

"""llama.cpp's K-quant block decoders in JAX (256-element super-blocks of 16 or 8 sub-blocks with their own 4-8 bit
scales), each uint8 (n_blocks, bytes per block) -> float32 (n_blocks, 256), bitwise equal to the `gguf` package's
numpy `dequantize_blocks` (the same float32 operations in the same order). Used through `jlora.quant_gguf.decode`.

Byte layouts (ggml-common.h, QK_K = 256):
  q2_k  scales[16] (low nibble scale, high nibble min), qs[64] (2 bits), d f16, dmin f16            84 bytes
  q3_k  hmask[32] (high bit, inverted), qs[64] (low 2 bits), scales[12] (6-bit, signed - 32), d f16 110 bytes
  q4_k  d f16, dmin f16, scales[12] (6-bit scales and mins of 8 sub-blocks), qs[128] (4 bits)    144 bytes
  q5_k  d f16, dmin f16, scales[12], qh[32] (5th bit), qs[128]                                   176 bytes
  q6_k  ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d f16                       210 bytes
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _f16(b):
    return lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)[..., None]


def _shift(x, shifts, mask: int, groups: int):
    """uint8 (n, k) viewed as (n, k // groups, 1, groups) shifted right by each of `shifts` and masked:
    -> (n, k // groups, len(shifts), groups), the layout of gguf's `>> np.array(shifts).reshape(1, 1, -1, 1)`."""
    n = x.shape[0]
    s = jnp.asarray(shifts, dtype=jnp.uint8).reshape(1, 1, -1, 1)
    return (x.reshape(n, -1, 1, groups) >> s) & jnp.uint8(mask)


def scale_min_k4(scales):
    """The 12 packed bytes of q4_k / q5_k (n, 12) -> (scales, mins), uint8 (n, 8) each, 6 bits."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0:1], s[:, 1:2], s[:, 2:3]
    sc = jnp.concatenate([d & jnp.uint8(0x3F), (m_d & jnp.uint8(0x0F)) | ((d >> jnp.uint8(2)) & jnp.uint8(0x30))], -1)
    mn = jnp.concatenate([m & jnp.uint8(0x3F), (m_d >> jnp.uint8(4)) | ((m >> jnp.uint8(2)) & jnp.uint8(0x30))], -1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def q2_k(v):
    n = v.shape[0]
    scales, qs, d, dmin = v[:, 0:16], v[:, 16:80], _f16(v[:, 80:82]), _f16(v[:, 82:84])
    dl = (d * (scales & jnp.uint8(0xF)).astype(jnp.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> jnp.uint8(4)).astype(jnp.float32)).reshape(n, 16, 1)
    q = _shift(qs, (0, 2, 4, 6), 3, 32).reshape(n, 16, 16).astype(jnp.float32)
    return (dl * q - ml).reshape(n, 256)


def q3_k(v):
    n = v.shape[0]
    hmask, qs, scales, d = v[:, 0:32], v[:, 32:96], v[:, 96:108], _f16(v[:, 108:110])
    low = (scales[:, 0:8].reshape(n, 1, 8) >> jnp.asarray([0, 4], jnp.uint8).reshape(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:12].reshape(n, 1, 4) >> jnp.asarray([0, 2, 4, 6], jnp.uint8).reshape(1, 4, 1)).reshape(n, 16)
    sc = (low & jnp.uint8(0x0F)) | ((high & jnp.uint8(0x03)) << jnp.uint8(4))
    sc = (sc.astype(jnp.int8) - jnp.int8(32)).astype(jnp.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = _shift(qs, (0, 2, 4, 6), 3, 32).reshape(n, 16, 16)
    qh = _shift(hmask, tuple(range(8)), 1, 32).reshape(n, 16, 16) ^ jnp.uint8(1)
    q = (ql.astype(jnp.int8) - (qh << jnp.uint8(2)).astype(jnp.int8)).astype(jnp.float32)
    return (dl * q).reshape(n, 256)


def _k_scales(v):
    n = v.shape[0]
    d, dmin = _f16(v[:, 0:2]), _f16(v[:, 2:4])
    sc, mn = scale_min_k4(v[:, 4:16])
    return (d * sc.astype(jnp.float32)).reshape(n, -1, 1), (dmin * mn.astype(jnp.float32)).reshape(n, -1, 1)


def q4_k(v):
    n = v.shape[0]
    d, dm = _k_scales(v)
    q = _shift(v[:, 16:144], (0, 4), 0x0F, 32).reshape(n, -1, 32).astype(jnp.float32)
    return (d * q - dm).reshape(n, 256)


def q5_k(v):
    n = v.shape[0]
    d, dm = _k_scales(v)
    ql = _shift(v[:, 48:176], (0, 4), 0x0F, 32).reshape(n, -1, 32)
    qh = _shift(v[:, 16:48], tuple(range(8)), 1, 32).reshape(n, -1, 32)
    q = (ql | (qh << jnp.uint8(4))).astype(jnp.float32)
    return (d * q - dm).reshape(n, 256)


def q6_k(v):
    n = v.shape[0]
    ql, qh, scales, d = v[:, 0:128], v[:, 128:192], v[:, 192:208], _f16(v[:, 208:210])
    d = (d * lax.bitcast_convert_type(scales, jnp.int8).astype(jnp.float32)).reshape(n, 16, 1)
    ql = _shift(ql, (0, 4), 0x0F, 64).reshape(n, -1, 32)
    qh = _shift(qh, (0, 2, 4, 6), 3, 32).reshape(n, -1, 32)
    q = ((ql | (qh << jnp.uint8(4))).astype(jnp.int8) - jnp.int8(32)).reshape(n, 16, -1).astype(jnp.float32)
    return (d * q).reshape(n, 256)

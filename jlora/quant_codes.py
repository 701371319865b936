"""Blockwise quantization codes: NF4, int4, int8 and fp8 encode/decode of flat float32 blocks, 4-bit packing.

Everything here works on a 2-D float32 array `x` of shape (num_blocks, block_size) (the row-major flattened weight
cut into contiguous blocks, as bitsandbytes does) and one float32 scale per block; `jlora.quant` builds the
public `QuantizedArray` on top.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# NF4 (NormalFloat4), Dettmers et al. 2023, "QLoRA", Appendix E; the same 16 float32 values as bitsandbytes'
# `bitsandbytes/functional.py::get_4bit_type("nf4")` (bitsandbytes-foundation/bitsandbytes, v0.50.2), which
# generates them with `create_normal_map(offset=0.9677083, use_extra_value=True)`. Code i (0..15) is NF4_TABLE[i].
NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# Decision boundaries between neighbouring codes, computed in float32 as bitsandbytes' CPU/default kernel does
# (`_get_4bit_quantize_bounds`); a value exactly on a boundary takes the lower code (`torch.bucketize`).
NF4_MIDPOINTS = ((NF4_TABLE[:-1] + NF4_TABLE[1:]) / np.float32(2)).astype(np.float32)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# bits per stored value, the largest code magnitude the scale maps absmax to
QTYPES = {"nf4": (4, 1.0), "int4": (4, 7.0), "int8": (8, 127.0), "fp8": (8, FP8_MAX)}
DOUBLE_QUANT_GROUP = 256  # blocks per second-level scale (QLoRA's double quantization)


def fp8_dtype():
    """`jnp.float8_e4m3fn`, or None where this JAX has no such dtype."""
    return getattr(jnp, "float8_e4m3fn", None)


def available_qtypes() -> tuple[str, ...]:
    return tuple(q for q in QTYPES if q != "fp8" or fp8_dtype() is not None)


def absmax_scales(x):
    """(num_blocks, block_size) float32 -> (num_blocks,) float32 scales: absmax / largest code magnitude."""
    return jnp.max(jnp.abs(x), axis=-1)


def encode(x, absmax, qtype: str):
    """Codes of `x` (num_blocks, block_size) float32 given each block's absmax (num_blocks,).

    nf4: uint8 code 0..15 of the nearest NF4_TABLE value to x / absmax (bitsandbytes' rounding);
    int4: int8 round(x / (absmax / 7)) in -7..7; int8: int8 round(x / (absmax / 127)) in -127..127;
    fp8: float8_e4m3fn of x / (absmax / 448)."""
    if qtype == "nf4":
        # bitsandbytes: clamp(x * (1 / max(absmax, 1e-38)), -1, 1), then bucketize against the midpoints
        scaled = jnp.clip(x * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0)
        codes = jnp.zeros(x.shape, jnp.uint8)
        for mid in NF4_MIDPOINTS:  # count the boundaries strictly below: 15 cheap elementwise passes
            codes = codes + (scaled > mid).astype(jnp.uint8)
        return codes
    top = QTYPES[qtype][1]
    scale = jnp.where(absmax > 0, absmax / top, 1.0)[:, None]
    if qtype == "fp8":
        return jnp.clip(x / scale, -FP8_MAX, FP8_MAX).astype(fp8_dtype())
    return jnp.clip(jnp.round(x / scale), -top, top).astype(jnp.int8)


def decode(codes, absmax, qtype: str):
    """Inverse of `encode` up to rounding: float32 (num_blocks, block_size)."""
    if qtype == "nf4":
        return jnp.asarray(NF4_TABLE)[codes.astype(jnp.int32)] * absmax[:, None]
    return codes.astype(jnp.float32) * (absmax / QTYPES[qtype][1])[:, None]


def pack4(codes):
    """(..., 2k) 4-bit codes (uint8 0..15) -> (..., k) uint8, the first of each pair in the high nibble
    (bitsandbytes' layout)."""
    c = codes.astype(jnp.uint8)
    return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack4(packed):
    """(..., k) uint8 -> (..., 2k) uint8 codes 0..15; inverse of `pack4`."""
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def store(codes, qtype: str):
    """Codes -> stored values: 4-bit codes packed two per uint8 (int4 stored as code + 8, so 1..15); 8-bit as is."""
    if qtype == "int4":
        codes = (codes + 8).astype(jnp.uint8)
    return pack4(codes) if QTYPES[qtype][0] == 4 else codes


def load(values, qtype: str):
    """Inverse of `store`."""
    if QTYPES[qtype][0] != 4:
        return values
    codes = unpack4(values)
    return codes.astype(jnp.int8) - 8 if qtype == "int4" else codes


def double_quantize(scales):
    """QLoRA's double quantization of the per-block scales (num_blocks,) float32.

    Returns (codes int8 (num_blocks,), group scales float32 (ceil(num_blocks / 256),), offset float32 ()):
    scales - mean(scales), then int8 absmax/127 over groups of 256 consecutive blocks (the last group may be short).
    bitsandbytes also subtracts the mean and uses groups of 256, but its 8-bit code is its dynamic-tree map rather
    than linear int8, so double-quantized scales differ from bitsandbytes' by a fraction of a percent."""
    n = scales.shape[0]
    groups = -(-n // DOUBLE_QUANT_GROUP)
    offset = jnp.mean(scales)
    centred = jnp.pad(scales - offset, (0, groups * DOUBLE_QUANT_GROUP - n)).reshape(groups, DOUBLE_QUANT_GROUP)
    group_absmax = absmax_scales(centred)
    codes = encode(centred, group_absmax, "int8").reshape(-1)[:n]
    return codes, group_absmax / 127.0, offset


def double_dequantize(codes, group_scales, offset):
    """Inverse of `double_quantize` up to rounding: float32 (num_blocks,)."""
    per_block = jnp.repeat(group_scales, DOUBLE_QUANT_GROUP, total_repeat_length=group_scales.shape[0]
                           * DOUBLE_QUANT_GROUP)[: codes.shape[0]]
    return codes.astype(jnp.float32) * per_block + offset

"""`QuantizedArray`: a blockwise-quantized weight as a pytree node (packed codes, per-block scales, static shape).

Two families of qtype share it:
  nf4, int4, int8, fp8   jlora's own (bitsandbytes' layout; `jlora.quant` makes them, `jlora.quant_codes` decodes);
  q4_0, q4_1, q8_0, ...  llama.cpp's GGUF block formats, kept as the file's bytes (`jlora.quant_gguf` decodes).
Blocks always run over the row-major flattened *stored* array; `perm` (static) says how the logical array is
the stored one transposed (a GGUF Linear weight is stored (out, in) and used as a flax kernel (in, out)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora import quant_codes as qc


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A blockwise-quantized array; a pytree node, so it lives inside frozen trees, jit and eval_shape.

    Children (leaves): `values`, the stored codes: for nf4/int4 uint8 (size // 2,) (two per byte), for int8 int8
    (size,), for fp8 float8_e4m3fn (size,), for a GGUF qtype uint8 (size // block_size, bytes per block), the
    file's blocks; `scales`, float32 (size // block_size,) per-block absmax, or with double quantization int8 codes
    of them, with `scale_scales` float32 (ceil(num_blocks / 256),) and `scale_offset` float32 () (both None without
    double quantization; `scales` is None for GGUF qtypes, whose scales live inside the blocks).
    Static aux data: the logical `shape` and `dtype` (name) of the float array it stands for, `qtype`, `block_size`
    (elements per block), `perm` (None, or the permutation taking the stored array to the logical one)."""

    values: Any
    scales: Any
    scale_scales: Any = None
    scale_offset: Any = None
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    dtype: str = dataclasses.field(default="float32", metadata={"static": True})
    qtype: str = dataclasses.field(default="nf4", metadata={"static": True})
    block_size: int = dataclasses.field(default=64, metadata={"static": True})
    perm: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"static": True})

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the array the blocks run over: `shape` with `perm` undone."""
        if self.perm is None:
            return self.shape
        out = [0] * self.ndim
        for i, p in enumerate(self.perm):
            out[p] = self.shape[i]
        return tuple(out)

    @property
    def double_quant(self) -> bool:
        return self.scale_scales is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored children (works when they are `jax.ShapeDtypeStruct`s, e.g. under eval_shape)."""
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

    def check(self, path: str = "") -> None:
        """Raises a ValueError naming `path` where the children do not fit the static fields (a QuantizedArray put
        together by hand, or one whose shape was edited): values and scales of the sizes `shape`, `qtype` and
        `block_size` imply. Shapes only, so it runs on tracers too."""
        where = f"{path}: " if path else ""
        n, bs = self.size, self.block_size
        if self.perm is not None and sorted(self.perm) != list(range(self.ndim)):
            raise ValueError(f"{where}QuantizedArray perm {self.perm} is not a permutation of its {self.ndim} axes")
        if n % bs:
            raise ValueError(f"{where}QuantizedArray of shape {self.shape} ({n} elements) is not a whole number of "
                             f"blocks of {bs}; re-quantize the float weight with jlora.quantize")
        if self.qtype in qc.QTYPES:
            per_byte = 2 if qc.QTYPES[self.qtype][0] == 4 else 1
            want = {"values": (n // per_byte,), "scales": (n // bs,)}
        else:
            from jlora import quant_gguf

            want = {"values": (n // bs, quant_gguf.block_bytes(self.qtype))}
        got = {"values": self.values, "scales": self.scales}
        for name, shape in want.items():
            have = getattr(got[name], "shape", None)
            if have is None or tuple(have) != shape:
                raise ValueError(f"{where}QuantizedArray({self.qtype}, shape={self.shape}, block_size={bs}) needs "
                                 f"{name} of shape {shape}, got {None if have is None else tuple(have)}: it was not "
                                 f"made for this shape; re-quantize the float weight (jlora.quantize) rather than "
                                 f"editing a QuantizedArray's fields")

    def dequantize(self, dtype=None):
        """The float array, shape `self.shape`, dtype `dtype` or the original one; traceable (works inside jit)."""
        if self.qtype in qc.QTYPES:
            absmax = self.scales
            if self.double_quant:
                absmax = qc.double_dequantize(self.scales, self.scale_scales, self.scale_offset)
            codes = qc.load(self.values, self.qtype).reshape(-1, self.block_size)
            out = qc.decode(codes, absmax, self.qtype)
        else:
            from jlora import quant_gguf

            out = quant_gguf.decode(self.values, self.qtype)
        out = out.reshape(self.stored_shape)
        if self.perm is not None:
            out = jnp.transpose(out, self.perm)
        return out.astype(dtype or self.dtype)

    def __repr__(self):
        dq = ", double_quant" if self.double_quant else ""
        perm = f", perm={self.perm}" if self.perm is not None else ""
        return (f"QuantizedArray({self.qtype}, shape={self.shape}, dtype={self.dtype}, "
                f"block_size={self.block_size}{dq}{perm})")


def is_quantized(x) -> bool:
    """True for a `QuantizedArray` (use as `is_leaf=` to keep them whole when flattening a tree)."""
    return isinstance(x, QuantizedArray)

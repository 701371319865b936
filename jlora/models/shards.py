"""Loading onto a mesh: each checkpoint tensor read by slices inside `jax.make_array_from_callback`, so each device
receives only its shard and no device, nor the host beyond one tensor's shards, ever holds the whole model.

    tensors = hf.read_safetensors(directory, lazy=True)        # {name: LazyTensor}: shapes only, nothing read
    shardings = placement(template, mesh, rules, "llama")      # {path: NamedSharding}, checked before any read
    array = place(tensors[name], shardings[path], dtype=jnp.bfloat16, transposed=True)

A `LazyTensor` reads `safetensors.safe_open(file, framework="numpy").get_slice(name)[index]`, opening the file for
each read, so the memory map (whose touched pages count in the process's RSS) lives only as long as one slice. A
transposed tensor (torch Linear (out, in) -> flax (in, out)) is read as the transposed slice; the dtype cast is done
per slice. Numpy arrays (GGUF tensors, dequantized whole in host memory) are placed by the same callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models import partitioning
from jlora.paths import named_leaves

EQUAL_BLOCK_BYTES = 64 << 20  # `array_equal` of lazy tensors compares blocks of rows of at most this size


def read_slice(file: Path, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """`tensor[index]` of the tensor `name` in the safetensors `file`, a numpy array in the stored dtype (bfloat16
    as ml_dtypes'). Only the slice is copied out of the memory map, which is closed again on return."""
    from safetensors import safe_open

    with safe_open(file, framework="numpy") as f:
        return f.get_slice(name)[index]


class LazyTensor:
    """A safetensors tensor not yet read: `shape`, `dtype` (numpy), `ndim`, `size`; `tensor[index]` reads the
    slice (a tuple of slices, one per dim) with `read_slice`."""

    def __init__(self, file: Path, name: str, shape: tuple[int, ...], dtype: np.dtype):
        self.file, self.name, self.shape, self.dtype = Path(file), name, tuple(shape), np.dtype(dtype)

    @classmethod
    def open(cls, handle, file: Path, name: str) -> LazyTensor:
        """From an open `safe_open(file, framework=...)` handle: its shape, and its dtype from an empty slice."""
        view = handle.get_slice(name)
        shape = tuple(view.get_shape())
        dtype = np.asarray(view[:0] if shape else handle.get_tensor(name)).dtype
        return cls(file, name, shape, dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        return read_slice(self.file, self.name, index + (slice(None),) * (self.ndim - len(index)))

    def __repr__(self) -> str:
        return f"LazyTensor({str(self.file)!r}, {self.name!r}, shape={self.shape}, dtype={self.dtype})"


def array_equal(a, b) -> bool:
    """Whether two tensors are equal; `LazyTensor`s are compared `EQUAL_BLOCK_BYTES` of rows at a time, so neither
    is read whole. Other arrays: `jnp.array_equal`."""
    if not isinstance(a, LazyTensor) and not isinstance(b, LazyTensor):
        return bool(jnp.array_equal(a, b))
    if tuple(a.shape) != tuple(b.shape):
        return False
    if not a.shape:
        return bool(np.array_equal(np.asarray(a[()]), np.asarray(b[()])))
    row = max(math.prod(a.shape[1:]) * max(a.dtype.itemsize, b.dtype.itemsize), 1)
    step = max(EQUAL_BLOCK_BYTES // row, 1)
    for start in range(0, a.shape[0], step):
        rows = (slice(start, min(start + step, a.shape[0])),)
        if not np.array_equal(np.asarray(a[rows]), np.asarray(b[rows])):
            return False
    return True


def _key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def place(value, sharding: jax.sharding.Sharding, *, dtype, transposed: bool = False) -> jax.Array:
    """A `jax.Array` of `value` (a `LazyTensor` or a numpy array, stored shape (a, b) or, `transposed`, (b, a) for
    an (a, b) result) cast to `dtype`, laid out by `sharding`: each device's slice is read on its own (each distinct
    slice once, however many devices hold a replica) and cast; no whole tensor is formed unless it is replicated."""
    shape = tuple(value.shape)[::-1] if transposed else tuple(value.shape)
    read: dict[tuple, np.ndarray] = {}

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        key = _key(index)
        if key not in read:
            block = np.asarray(value[tuple(index[::-1]) if transposed else tuple(index)])
            read[key] = np.asarray(block.T if transposed else block, dtype=dtype)
        return read[key]

    out = jax.make_array_from_callback(shape, sharding, callback)
    read.clear()
    return out


def placement(template, mesh, rules, architecture: str) -> dict[str, jax.sharding.NamedSharding] | None:
    """{path: NamedSharding} for `template`'s leaves on `mesh` under `rules` (see `jlora.models.partitioning`);
    None without a mesh. Raises TypeError for a `mesh` that is not a `jax.sharding.Mesh`, ValueError for `rules`
    without a mesh and for rules that do not fit the model (before anything is read)."""
    if mesh is None:
        if rules is not None:
            raise ValueError(f"rules={rules!r} partition parameters over a mesh, and no mesh= was given: pass "
                             f"mesh=jax.make_mesh(...), or leave out rules= to load onto one device")
        return None
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('data',))), got "
                        f"{type(mesh).__name__} {mesh!r}")
    tree = partitioning.shardings(template, mesh, rules, architecture=architecture)
    return dict(named_leaves(tree, with_none=False))


def create(init: Callable[[], jax.Array], sharding: jax.sharding.Sharding | None) -> jax.Array:
    """`init()` (a fresh weight a checkpoint lacks, e.g. a classifier head: small), with a sharding then placed by
    it. Run eagerly, as without a mesh, so that the values are the same bits (under `jax.jit` XLA fuses the scaling
    of the random draw differently, 1 ulp apart)."""
    return init() if sharding is None else jax.device_put(init(), sharding)

"""microsoft/LoRA (`loralib`) state dicts <-> jlora adapters, e.g. the released GPT-2 E2E checkpoints.

    adapters, config = load_loralib("gpt2_md_lora_e2e.pt", variables, rank=4, alpha=32)  # torch needed for a path
    state = to_loralib(adapters, config)  # {key: np.ndarray}; model.load_state_dict(state, strict=False) in torch

Keys are the torch module names (`transformer.h.0.attn.c_attn`), which jlora's models mirror: flax
`params/<module with '/'>/kernel` (or `/embedding`). Layouts, loralib (torch) -> jlora:

- Linear `X.lora_A` (r, in), `X.lora_B` (out, r) -> lora_a = A^T (in, r), lora_b = B^T (r, out);
- MergedLinear (`enable_lora`, n slices, e enabled): `X.lora_A` (e*r, in), `X.lora_B` (e*d, r) with d = out / n ->
  lora_a = A^T (in, e*r), lora_b = B^T (r, e*d) and `config.fused = {X: enable_lora}`;
- Embedding `X.lora_A` (r, vocab), `X.lora_B` (dim, r) -> lora_a = A^T (vocab, r), lora_b = B^T (r, dim).

The scale is loralib's alpha / r. `fan_in_fan_out` (GPT-2's Conv1D) changes only how torch stores the base weight
W ((in, out) rather than (out, in)), never the factors; it is used to check an `X.weight` the dict may also hold.
loralib's ConvLoRA ((r*k, in*k) factors) has no jlora equivalent and raises. Biases trained in full
(`lora_state_dict(model, bias=...)`) are read with `bias='all'` / `'lora_only'`. A whole-model state dict (one
holding weights besides the factors and biases) can be passed: its other keys are ignored.

Missing and unused tensors are an error (`strict=True`, the default) or a warning listing them (`strict=False`,
which loads the rest, as torch's `load_state_dict(strict=False)` does, silently): a module is missing when it is an
adapted module in another layer (the same name, other layer numbers: a state dict for fewer layers than the model);
unused are factors of a module the variables lack, keys of another format (`lora_A.weight`, PEFT's), and, unless
the dict is a whole-model one, biases the `bias` mode does not load.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jlora.config import LoraConfig
from jlora.interop.coverage import layer_modules, report, siblings
from jlora.interop.peft import all_leaves, close_names, lookup_leaf, module_name
from jlora.models.hf import default_key
from jlora.paths import MAGNITUDE, flatten_adapters, nest, trains_in_full


def _numpy(t) -> np.ndarray:
    """A torch tensor or array-like -> numpy (torch bfloat16 -> float32, which numpy lacks)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def read_state_dict(state_dict_or_path) -> dict[str, np.ndarray]:
    """A loralib state dict from a `.pt` / `.bin` path (`torch.load(weights_only=True)`, so torch is needed for
    this path only) or a mapping of numpy / torch tensors, unwrapped from `{"model_state_dict": ...}` and from a
    DistributedDataParallel `module.` prefix."""
    sd = state_dict_or_path
    if isinstance(sd, (str, os.PathLike)):
        try:
            import torch
        except ImportError:
            raise ImportError(f"reading {sd} needs PyTorch (torch.load); pass the state dict as numpy arrays "
                              f"instead") from None
        try:
            sd = torch.load(sd, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # UnpicklingError (garbage, or not weights only), RuntimeError / OSError (truncated)
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ValueError(f"{state_dict_or_path} is not a readable PyTorch checkpoint ({why}): it is truncated, "
                             f"damaged or not a state dict of tensors; copy or save it again") from None
    if isinstance(sd, dict) and set(sd) == {"model_state_dict"}:
        sd = sd["model_state_dict"]
    if not isinstance(sd, dict):
        raise TypeError(f"expected a state dict (a mapping of name -> tensor), got {type(sd).__name__}")
    if sd and all(str(k).startswith("module.") for k in sd):  # saved from a DistributedDataParallel wrapper
        sd = {str(k).removeprefix("module."): v for k, v in sd.items()}
    return {str(k): _numpy(v) for k, v in sd.items()}


def load_loralib(state_dict_or_path, variables, *, rank: int, alpha: float,
                 enable_lora: tuple[bool, ...] = (True, False, True), fan_in_fan_out: bool = True,
                 bias: str = "none", dropout: float = 0.0, strict: bool = True) -> tuple[dict, LoraConfig]:
    """Reads loralib `lora_A` / `lora_B` factors into `(adapters, config)` for `variables` (full, frozen or
    abstract): lora_a = A^T (in, r), lora_b = B^T (r, out), in the dict's dtype (torch bfloat16 is read as
    float32). A kernel whose lora_B has
    `out // len(enable_lora) * sum(enable_lora)` rows is a MergedLinear with that mask. ValueErrors name the key and
    both shapes, a damaged file, or (unless `strict=False`: a warning, and the unused keys are skipped) the modules
    adapted in another layer with no factors and the keys nothing uses (see the module docstring)."""
    sd = read_state_dict(state_dict_or_path)
    leaves = all_leaves(variables)
    index = {default_key(p): (p, w) for p, w in leaves}
    factor_keys = {k for k in sd if k.endswith((".lora_A", ".lora_B"))}
    modules = sorted({k.rsplit(".", 1)[0] for k in factor_keys})
    if not modules:
        raise ValueError(f"no '<module>.lora_A' / '<module>.lora_B' keys in the state dict (keys: {list(sd)[:20]})")
    unused = {f"{m}.lora_A/lora_B": f"{m}.weight is not a parameter of the variables; close candidates: "
                                    f"{close_names(index, f'{m}.weight')}"
              for m in modules if f"{m}.weight" not in index}
    unused |= {k: "not a loralib factor (<module>.lora_A / .lora_B): a state dict of another format?"
               for k in sd if k not in factor_keys and "lora_" in k}
    whole = any(k not in factor_keys and "lora_" not in k and not k.endswith(".bias") for k in sd)
    modules = [m for m in modules if f"{m}.weight" in index]
    flat, fused = {}, {}
    n, e = len(enable_lora), sum(enable_lora)
    for module in modules:
        ka, kb = f"{module}.lora_A", f"{module}.lora_B"
        if ka not in sd or kb not in sd:
            raise ValueError(f"{module}: the state dict has only one of {ka}, {kb}")
        A, B = sd[ka], sd[kb]
        path, w = lookup_leaf(index, f"{module}.weight", "the adapter")
        leaf = path.rsplit("/", 1)[-1]
        if leaf not in ("kernel", "embedding") or A.ndim != 2 or B.ndim != 2 or w is None or w.ndim != 2:
            raise ValueError(f"{ka} {A.shape} / {kb} {B.shape} on {path} {getattr(w, 'shape', None)}: only loralib "
                             f"Linear, MergedLinear and Embedding on a weight in the variables have a jlora "
                             f"equivalent (ConvLoRA does not)")
        out = w.shape[1]
        merged = leaf == "kernel" and out % n == 0 and B.shape[0] == out // n * e != out
        want_a, want_b = ((rank * e if merged else rank), w.shape[0]), (B.shape[0] if merged else out, rank)
        for key, t, want in ((ka, A, want_a), (kb, B, want_b)):
            if t.shape != want:
                raise ValueError(f"{key} has shape {t.shape}, but rank={rank} on {path} of shape {tuple(w.shape)} "
                                 f"needs {want}")
        if f"{module}.weight" in sd:
            stored = sd[f"{module}.weight"].shape
            if stored != (tuple(w.shape) if fan_in_fan_out or leaf == "embedding" else tuple(w.shape)[::-1]):
                raise ValueError(f"{module}.weight has shape {stored}, the variables' {path} {tuple(w.shape)} "
                                 f"(fan_in_fan_out={fan_in_fan_out})")
        flat[path] = {"lora_a": jnp.asarray(A.T), "lora_b": jnp.asarray(B.T)}
        if merged:
            fused[path] = tuple(bool(x) for x in enable_lora)
    config = LoraConfig(rank=rank, alpha=alpha, targets=tuple(flat), bias=bias, dropout=dropout,
                        fused=fused).with_targets(flat)
    lora_modules = {p.rpartition("/")[0] for p in flat}
    needed = {default_key(p): (p, w) for p, w in leaves if bias != "none" and trains_in_full(p, config, lora_modules)}
    fix = "pass bias='all'" if bias == "lora_only" else "pass bias='lora_only' or 'all'"
    for k in sd:
        if k.endswith(".bias") and k not in needed and not whole:
            unused[k] = (f"a bias trained in full that bias={bias!r} does not load: {fix}" if k in index else
                         f"not a parameter of the variables; close candidates: {close_names(index, k)}")
    source = state_dict_or_path if isinstance(state_dict_or_path, (str, os.PathLike)) else "the state dict"
    report(source, missing=siblings({module_name(p) for p in flat}, layer_modules(leaves)), unused=unused,
           strict=strict, missing_why="adapted in another layer",
           fix="Load the state dict trained for these variables (the same model and number of layers)")
    for key, (path, w) in needed.items():
        if key not in sd:
            raise ValueError(f"bias={bias!r} needs {key} (for {path}), which the state dict lacks")
        flat[path] = jnp.asarray(sd[key], w.dtype if w is not None else None)
    return nest(flat), config


def to_loralib(adapters, config: LoraConfig) -> dict[str, np.ndarray]:
    """loralib keys for jlora adapters: `X.lora_A` = lora_a^T, `X.lora_B` = lora_b^T (Linear, MergedLinear with
    `config.fused`, Embedding) and `X.bias` for biases trained in full. Other layouts and modules_to_save leaves
    have no loralib equivalent and raise (save those with `save_peft`)."""
    pairs, full = flatten_adapters(adapters)
    out = {}
    for path, pair in sorted(pairs.items()):
        a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
        if MAGNITUDE in pair:
            raise ValueError(f"{path}: a DoRA adapter (config.dora) has no loralib equivalent; save it with save_peft "
                             f"(PEFT's use_dora)")
        if a.ndim != 2 or b.ndim != 2 or path.rsplit("/", 1)[-1] not in ("kernel", "embedding"):
            raise ValueError(f"{path}: lora_a {a.shape} / lora_b {b.shape} has no loralib equivalent (Linear, "
                             f"MergedLinear and Embedding only)")
        module = module_name(path)
        out[f"{module}.lora_A"], out[f"{module}.lora_B"] = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    for path, x in sorted(full.items()):
        if path.rsplit("/", 1)[-1] != "bias":
            raise ValueError(f"{path}: loralib saves LoRA factors and biases only; this leaf trained in full "
                             f"(modules_to_save) has no loralib key")
        out[default_key(path)] = np.asarray(x)
    return out


_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save before 1.6: pickled magic number first


def is_torch_checkpoint(path) -> bool:
    """True when `path` is a file `torch.save` wrote (its zip archive with a data.pkl, or the legacy format)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return any(name.rsplit("/", 1)[-1] == "data.pkl" for name in z.namelist())
        with open(path, "rb") as f:
            return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
    except OSError:
        return False


def _may_write(path: Path, overwrite: bool) -> None:
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{path} is a {'link' if path.is_symlink() else 'directory'}; pass the path of the "
                         f"checkpoint file to write (e.g. {path / 'lora.pt'})")
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if not is_torch_checkpoint(path):
        raise ValueError(f"{path} exists and is not a PyTorch checkpoint; jlora never replaces what it did not "
                         f"write: choose another path, or move or delete it yourself")


def save_loralib(path, adapters, config: LoraConfig, *, overwrite: bool = False) -> None:
    """`torch.save(to_loralib(adapters, config), path)`, atomically; needs PyTorch.

    The file is written beside `path` and renamed into place only when complete, so an error or a crash during the
    write leaves an existing file as it was. An existing `path` raises FileExistsError unless `overwrite=True`; a
    path holding anything but a PyTorch checkpoint (a directory, another file) raises a ValueError and is kept.
    """
    try:
        import torch
    except ImportError:
        raise ImportError("save_loralib needs PyTorch (torch.save); use to_loralib for numpy arrays") from None
    path = Path(path)
    _may_write(path, overwrite)
    state = {}
    for k, v in to_loralib(adapters, config).items():
        bf16 = v.dtype.name == "bfloat16"
        t = torch.from_numpy(np.array(v, dtype=np.float32) if bf16 else np.array(v))
        state[k] = t.to(torch.bfloat16) if bf16 else t
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _may_write(path, overwrite)  # again: another writer may have put something there meanwhile
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails when path exists: never replaces
            except FileExistsError:
                raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it") from None
            except OSError:  # no hard links on this filesystem
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

"""Helpers for the `reference` tests that run PyTorch loralib / PEFT as oracles for jlora.

torch is imported inside the functions, so importing this module never needs torch: the test modules skip
themselves with `pytest.importorskip("torch")` first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora.paths import path_str

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 rounding on O(1) values; a 0.1% change of the scale fails it


def rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """float32 N(0, scale^2) draws of `shape`."""
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def to_torch(x):
    """numpy -> a torch float32 tensor (a copy: torch never writes into our arrays)."""
    import torch

    return torch.from_numpy(np.array(x, dtype=np.float32))


def to_np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def set_param(param, value):
    """Copies `value` into a torch parameter in place, checking the shape."""
    import torch

    if tuple(param.shape) != np.shape(value):
        raise ValueError(f"torch parameter of shape {tuple(param.shape)} cannot take a value of shape "
                         f"{np.shape(value)}")
    with torch.no_grad():
        param.copy_(to_torch(value))


def torch_out_grads(module, x, probe) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`module(x)` and the grads of `sum(out * probe)` w.r.t. each parameter with requires_grad, by name."""
    module.zero_grad()
    out = module(x)
    (out * to_torch(probe)).sum().backward()
    return to_np(out), {n: to_np(p.grad) for n, p in module.named_parameters() if p.requires_grad}


def jlora_out_grads(lora, frozen, adapters, x, probe, *, jit: bool) -> tuple[np.ndarray, dict]:
    """`lora.apply(frozen, adapters, x)` and the grads of `sum(out * probe)` w.r.t. the adapters (the tree jlora
    trains), eager or under `jax.jit`."""

    def fwd(ad, xx):
        return lora.apply(frozen, ad, xx)

    def loss(ad, xx):
        return jnp.sum(fwd(ad, xx) * probe)

    fwd_fn, grad_fn = (jax.jit(fwd), jax.jit(jax.grad(loss))) if jit else (fwd, jax.grad(loss))
    return np.asarray(fwd_fn(adapters, x)), jax.tree_util.tree_map(np.asarray, grad_fn(adapters, x))


def leaf_paths(tree) -> set[str]:
    """The '/'-joined paths of the (non-None) leaves of `tree`."""
    return {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat(tree) -> dict[str, object]:
    """`{path: leaf}` for the (non-None) leaves of `tree`."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def container(**children):
    """A bare torch.nn.Module holding `children` under their names (to mirror a Hugging Face module tree)."""
    import torch

    module = torch.nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


TINY_GPT2 = dict(n_layer=2, n_embd=48, n_head=4, vocab_size=113, n_positions=64, initializer_range=0.2,
                 bos_token_id=None, eos_token_id=None)


def save_tiny_gpt2(directory, seed=0, **overrides):
    """A random transformers GPT2LMHeadModel (TINY_GPT2 with `overrides`) saved to `directory`; returns it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY_GPT2, **overrides})).eval()
    hf_model.save_pretrained(directory, safe_serialization=True)
    return hf_model

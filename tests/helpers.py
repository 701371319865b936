"""Shared test helpers: non-zero adapters, the factored-vs-merged oracle, writing variables as an HF directory."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

import jlora
from jlora.models import hf
from jlora.paths import named_leaves


def perturb(adapters, seed=3, scale=0.3):
    """Adds noise to every adapter leaf so lora_b (zero at init) is non-zero before an equivalence check."""
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


def assert_factored_equals_merged(fn, variables, args, config, *, atol=1e-5, strict=True, kwargs=None):
    """lora.apply (eager and jit) equals fn(merge(...)) and differs from the base output."""
    kwargs = kwargs or {}
    lora = jlora.lora_transform(fn, config, strict=strict)
    frozen, adapters = lora.init(variables, *args, key=jax.random.key(1), **kwargs)
    adapters = perturb(adapters)
    merged = jlora.merge(frozen, adapters, config)
    want = fn(merged, *args, **kwargs)
    eager = lora.apply(frozen, adapters, *args, **kwargs)
    jitted = jax.jit(lambda f, a, *xs: lora.apply(f, a, *xs, **kwargs))(frozen, adapters, *args)
    np.testing.assert_allclose(eager, want, atol=atol, rtol=1e-5)
    np.testing.assert_allclose(jitted, want, atol=atol, rtol=1e-5)
    base = fn(variables, *args, **kwargs)
    assert float(jnp.max(jnp.abs(base - want))) > 10 * atol, "the adapters changed nothing: the check is vacuous"
    return lora, frozen, adapters


def save_checkpoint(directory, hf_config, variables):
    """Writes jlora variables as a Hugging Face directory (the inverse of from_pretrained), without torch."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {hf.default_key(p): np.ascontiguousarray(np.asarray(x).T if p.endswith("/kernel") else np.asarray(x))
               for p, x in named_leaves(variables)}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config))
    return directory

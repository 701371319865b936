"""combine_adapters against PEFT's `LoraModel.add_weighted_adapter`: the same adapters, exported with save_peft and
loaded into PEFT, combined by every method, give the same update of every adapted weight (f32, 1e-5).

    python -m pytest -q tests/test_combine_peft.py

A torch model of an Embedding (23, 11), Linears 11 -> 19 and 19 -> 13 and a Conv2d 5 -> 7 (3x2), and its params
tree under the same names. Adapter 0: rank 7, alpha 3; adapter 1: rank 5 (3 on the conv), alpha 2, rsLoRA; adapter
2: rank 7, alpha 5, no conv (PEFT skips it there). PEFT's DARE masks come from torch's RNG: the test replaces
torch.bernoulli by the masks jlora draws from its key (its documented scheme), so DARE is compared exactly; and the
signs of torch's singular vectors by jlora's convention (they are arbitrary, and svd_clamp depends on them).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_oracles import to_np, to_torch

import jlora
from jlora.combination import FACTOR_METHODS, combine_adapters
from jlora.interop import save_peft
from jlora.interop.peft import full_to_torch
from jlora.models.hf import default_key

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.reference

VOCAB, DIM, HID, OUT, C_IN, C_OUT, KH, KW = 23, 11, 19, 13, 5, 7, 3, 2
SHAPES = {"emb/embedding": (VOCAB, DIM), "query/kernel": (DIM, HID), "value/kernel": (HID, OUT),
          "conv/kernel": (KH, KW, C_IN, C_OUT)}
MODULES = ("emb", "query", "value", "conv")  # PEFT visits the targets in this (named_modules) order
TOL = dict(rtol=1e-5, atol=1e-5)
CONFIGS = [jlora.LoraConfig(rank=7, alpha=3.0, targets=MODULES),
           jlora.LoraConfig(rank=5, alpha=2.0, targets=MODULES, scaling="rslora", rank_pattern={"conv": 3}),
           jlora.LoraConfig(rank=7, alpha=5.0, targets=("emb", "query", "value"))]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.query = torch.nn.Linear(DIM, HID, bias=False)
        self.value = torch.nn.Linear(HID, OUT, bias=False)
        self.conv = torch.nn.Conv2d(C_IN, C_OUT, (KH, KW), bias=False)


def _variables():
    rng = np.random.default_rng(0)
    flat = {k: jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32) for k, s in SHAPES.items()}
    return {"params": {k.split("/")[0]: {k.split("/")[1]: x} for k, x in flat.items()}}


def _adapters(n):
    rng, config = np.random.default_rng(10 + n), CONFIGS[n]
    pairs = {}
    for key, shape in SHAPES.items():
        module = key.split("/")[0]
        if module in config.targets:
            r = config.rank_for(f"params/{key}")
            pairs[module] = {key.split("/")[1]: {
                "lora_a": jnp.asarray(rng.standard_normal((*shape[:-1], r)) * 0.4, jnp.float32),
                "lora_b": jnp.asarray(rng.standard_normal((r, shape[-1])) * 0.4, jnp.float32)}}
    return {"params": pairs}


VARS = _variables()
ADAPTERS = [_adapters(n) for n in range(3)]


@pytest.fixture(scope="module")
def peft_model(tmp_path_factory):
    model = Tiny()
    state = {default_key(p): to_torch(full_to_torch(p, x)) for p, x in _named(VARS)}
    model.load_state_dict(state, strict=True)
    for n in range(3):
        directory = tmp_path_factory.mktemp(f"a{n}")
        save_peft(directory, ADAPTERS[n], CONFIGS[n], base_model_name_or_path="tiny")
        if n == 0:
            model = peft.PeftModel.from_pretrained(model, str(directory), adapter_name="a0")
        else:
            model.load_adapter(str(directory), adapter_name=f"a{n}")
    return model


def _named(tree):
    from jlora.paths import named_leaves

    return named_leaves(tree)


def _peft_deltas(model, adapter_name) -> dict[str, np.ndarray]:
    """{module: the adapter's update in jlora's layout} for every PEFT LoRA layer that has it."""
    out = {}
    for module in MODULES:
        layer = model.base_model.model.get_submodule(module)
        if adapter_name in layer.lora_A or adapter_name in layer.lora_embedding_A:
            path = "params/" + next(k for k in SHAPES if k.startswith(module + "/"))
            with torch.no_grad():
                out[module] = np.asarray(full_to_torch(path, jnp.asarray(to_np(layer.get_delta_weight(adapter_name))),
                                                       inverse=True))
    return out


def _jlora_deltas(adapters, config) -> dict[str, np.ndarray]:
    merged = jlora.merge(VARS, adapters, config)
    return {m: np.asarray(next(iter(merged["params"][m].values())) - next(iter(VARS["params"][m].values())))
            for m in adapters["params"]}


def test_export_round_trip_gives_peft_the_same_updates(peft_model):
    for n in range(3):
        want = _jlora_deltas(ADAPTERS[n], CONFIGS[n])
        got = _peft_deltas(peft_model, f"a{n}")
        assert set(got) == set(want) == set(CONFIGS[n].targets)
        for m in want:
            assert np.abs(want[m]).max() > 0.1
            np.testing.assert_allclose(got[m], want[m], err_msg=f"a{n} {m}", **TOL)


def _torch_masks(method, ns, density, key):
    """jlora's DARE masks, by its documented scheme, in PEFT's draw order and torch layouts: adapter i's at a target
    is bernoulli(fold_in(fold_in(key, crc32(path)), i), density, (n,)), cut into lora_a then lora_b (factor
    methods) or reshaped to the update (out, in)."""
    masks = []
    for module in MODULES:
        leaf = next(k for k in SHAPES if k.startswith(module + "/"))
        kp = jax.random.fold_in(key, zlib.crc32(f"params/{leaf}".encode()))
        drawn = []
        for n in ns:
            if module in ADAPTERS[n]["params"]:
                a, b = (ADAPTERS[n]["params"][module][leaf.split("/")[1]][k] for k in ("lora_a", "lora_b"))
                shapes = [a.shape, b.shape] if method in FACTOR_METHODS else [(b.shape[-1], a.size // a.shape[-1])]
                flat = np.asarray(jax.random.bernoulli(jax.random.fold_in(kp, ns.index(n)), density,
                                                       (sum(int(np.prod(s)) for s in shapes),)))
                cut = int(np.prod(shapes[0]))
                drawn.append([flat[:cut].reshape(shapes[0])] + ([flat[cut:].reshape(shapes[1])] if len(shapes) > 1
                                                                else []))
        if method in FACTOR_METHODS:  # PEFT prunes every adapter's lora_A, then every lora_B
            masks += [_factor_to_torch(module, "lora_a", d[0]) for d in drawn]
            masks += [_factor_to_torch(module, "lora_b", d[1]) for d in drawn]
        else:
            masks += [_update_to_torch(module, d[0]) for d in drawn]
    return masks


def _factor_to_torch(module, side, m):
    if module == "conv":  # lora_a (kh, kw, in, r) -> (r, in, kh, kw); lora_b (r, out) -> (out, r, 1, 1)
        return m.transpose(3, 2, 0, 1) if side == "lora_a" else m.T[:, :, None, None]
    return m.T


def _update_to_torch(module, m):
    if module == "conv":  # (out, kh*kw*in) -> (out, in, kh, kw)
        return m.reshape(C_OUT, KH, KW, C_IN).transpose(0, 3, 1, 2)
    return m.T if module == "emb" else m  # PEFT's embedding update is (vocab, dim)


def _flipped_svd(svd):
    """torch's SVD with jlora's sign convention (the largest-magnitude entry of each u_i positive): singular vectors
    are defined up to sign, LAPACK builds differ, and svd_clamp's quantile depends on the signs."""

    def flipped(a, *args, **kwargs):
        u, s, vh = svd(a, *args, **kwargs)
        k = min(a.shape)
        sign = torch.sign(u[u[:, :k].abs().argmax(0), torch.arange(k)])
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        u, vh = u.clone(), vh.clone()
        u[:, :k] *= sign
        vh[:k] *= sign[:, None]
        return u, s, vh

    return flipped


CASES = [
    ("cat", [0, 1], [0.7, -0.4], {}),
    ("cat", [2, 0, 1], [0.5, 0.3, 0.9], {}),
    ("svd", [0, 1], [0.7, -0.4], {}),
    ("svd", [0, 1, 2], [0.6, 0.5, -0.3], {"svd_rank": 4, "svd_clamp": 0.9}),
    ("linear", [0, 2], [0.7, -0.4], {}),
    ("ties", [2, 0], [0.8, -0.6], {"density": 0.6}),
    ("magnitude_prune", [0, 2], [0.8, 0.6], {"density": 0.4}),
    ("ties_svd", [0, 1, 2], [0.5, 0.4, 0.3], {"density": 0.5, "svd_rank": 5}),
    ("magnitude_prune_svd", [0, 1], [0.7, -0.4], {"density": 0.3}),
    # DARE, its masks replayed: one method on the factors and one on the updates (dare_linear and dare_ties_svd
    # differ from these only by stages checked above; each DARE case compiles ~10 random generators, ~3 s)
    ("dare_ties", [0, 2], [0.8, -0.6], {"density": 0.7, "majority_sign_method": "frequency"}),
    ("dare_linear_svd", [0, 1, 2], [0.7, 0.4, -0.5], {"density": 0.5, "svd_rank": 6}),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_combination_matches_peft(peft_model, case, monkeypatch):
    method, ns, weights, kw = CASES[case]
    name = f"m{case}"
    jkw = dict(kw)
    if method.startswith("dare"):
        jkw["key"] = jax.random.key(case)
        masks = _torch_masks(method, ns, kw["density"], jkw["key"])

        def bernoulli(p, *args, **kwargs):
            m = masks.pop(0)
            assert tuple(p.shape) == m.shape and bool(torch.all(p == kw["density"]))
            return torch.from_numpy(m.astype(np.float32))

        monkeypatch.setattr(torch, "bernoulli", bernoulli)
    if method.endswith("svd"):
        monkeypatch.setattr(torch.linalg, "svd", _flipped_svd(torch.linalg.svd))
    peft_model.add_weighted_adapter([f"a{n}" for n in ns], weights, name, combination_type=method, **kw)
    if method.startswith("dare"):
        assert masks == [], "PEFT drew fewer masks than jlora"
    combined, config = combine_adapters([ADAPTERS[n] for n in ns], weights, configs=[CONFIGS[n] for n in ns],
                                        method=method, **jkw)
    want, got = _peft_deltas(peft_model, name), _jlora_deltas(combined, config)
    assert set(got) == set(want) == set(MODULES)
    for m in MODULES:
        assert np.abs(want[m]).max() > 1e-2
        np.testing.assert_allclose(got[m], want[m], err_msg=m, **TOL)


def test_dare_at_density_one_matches_peft_without_masks(peft_model):
    """density 1: PEFT warns and prunes nothing, jlora prunes nothing: dare_linear is linear, on both sides."""
    with pytest.warns(UserWarning, match="no pruning will be performed"):
        peft_model.add_weighted_adapter(["a0", "a2"], [0.7, -0.4], "dare1", combination_type="dare_linear",
                                        density=1.0)
    combined, config = combine_adapters([ADAPTERS[0], ADAPTERS[2]], [0.7, -0.4], configs=[CONFIGS[0], CONFIGS[2]],
                                        method="dare_linear", density=1.0, key=jax.random.key(0))
    want, got = _peft_deltas(peft_model, "dare1"), _jlora_deltas(combined, config)
    for m in MODULES:
        np.testing.assert_allclose(got[m], want[m], err_msg=m, **TOL)


def test_the_combined_adapter_exports_to_peft(peft_model, tmp_path):
    """cat of ranks 7 + 5 (3 on the conv): ranks 12 and 10, so the combined config has a rank_pattern; save_peft
    writes it and PEFT loads it with the updates jlora merges."""
    combined, config = combine_adapters(ADAPTERS[:2], [0.7, -0.4], configs=CONFIGS[:2], method="cat")
    assert config.rank == 12 and config.rank_for("params/conv/kernel") == 10
    save_peft(tmp_path / "combined", combined, config, base_model_name_or_path="tiny")
    peft_model.load_adapter(str(tmp_path / "combined"), adapter_name="exported")
    want, got = _peft_deltas(peft_model, "exported"), _jlora_deltas(combined, config)
    for m in MODULES:
        np.testing.assert_allclose(got[m], want[m], err_msg=m, **TOL)

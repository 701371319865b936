"""load_loralib / save_loralib on state dicts that do not match the model and on files that are not theirs.

    python -m pytest -q tests/test_interop_loralib_checks.py

The state dicts are numpy dicts with loralib's keys for a two-layer GPT-2-like model (no PyTorch needed); the
file cases (torch.load / torch.save) are skipped without torch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.interop import load_loralib, save_loralib, to_loralib

D, FC, VOCAB, R, ALPHA = 11, 19, 23, 7, 32.0
ENABLE = (True, False, True)
ATTN, FC0, FC1 = "transformer.h.{}.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"


def _variables():
    rng = np.random.default_rng(0)
    dense = lambda i, o: {"kernel": jnp.asarray(rng.standard_normal((i, o)), jnp.float32),  # noqa: E731
                          "bias": jnp.asarray(rng.standard_normal(o), jnp.float32)}
    block = lambda: {"attn": {"c_attn": dense(D, 3 * D), "c_proj": dense(D, D)}, "mlp": {"c_fc": dense(D, FC)}}  # noqa: E731
    return {"params": {"transformer": {"wte": {"embedding": jnp.asarray(rng.standard_normal((VOCAB, D)), jnp.float32)},
                                       "h": {"0": block(), "1": block()}}}}


def _state(layers=(0, 1), *, biases=False, seed=0):
    """loralib.lora_state_dict of the model (c_attn a MergedLinear on q and v, c_fc a Linear, wte an Embedding),
    non-zero lora_B; with `biases`, the LoRA modules' biases as lora_state_dict(bias='lora_only') adds them."""
    rng = np.random.default_rng(seed)
    rand = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    sd = {"transformer.wte.lora_A": rand(R, VOCAB), "transformer.wte.lora_B": rand(D, R)}
    for i in layers:
        sd |= {f"{ATTN.format(i)}.lora_A": rand(2 * R, D), f"{ATTN.format(i)}.lora_B": rand(2 * D, R),
               f"transformer.h.{i}.mlp.c_fc.lora_A": rand(R, D), f"transformer.h.{i}.mlp.c_fc.lora_B": rand(FC, R)}
        if biases:
            sd |= {f"{ATTN.format(i)}.bias": rand(3 * D), f"transformer.h.{i}.mlp.c_fc.bias": rand(FC)}
    return sd


def _load(sd, **kw):
    return load_loralib(sd, _variables(), rank=R, alpha=ALPHA, enable_lora=ENABLE, **kw)


def test_complete_state_dict_loads_exactly():
    sd = _state(biases=True)
    adapters, config = _load(sd, bias="lora_only")
    pair = adapters["params"]["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"]
    np.testing.assert_array_equal(pair["lora_a"], sd[f"{ATTN.format(1)}.lora_A"].T)
    np.testing.assert_array_equal(pair["lora_b"], sd[f"{ATTN.format(1)}.lora_B"].T)
    np.testing.assert_array_equal(adapters["params"]["transformer"]["h"]["1"]["mlp"]["c_fc"]["bias"], sd[f"{FC1}.bias"])
    assert config.fused_for("params/transformer/h/0/attn/c_attn/kernel") == ENABLE


def test_fewer_layers_than_the_model_is_an_error():
    """A state dict of a one-layer model onto a two-layer one: before, layer 1 loaded unadapted without a word."""
    with pytest.raises(ValueError, match=rf"2 module\(s\) adapted in another layer have no tensors.*"
                                         rf"{ATTN.format(1)}.*{FC1}.*strict=False"):
        _load(_state(layers=(0,)))
    with pytest.warns(UserWarning, match=rf"have no tensors.*{ATTN.format(1)}"):
        adapters, config = _load(_state(layers=(0,)), strict=False)
    assert sorted(adapters["params"]["transformer"]["h"]) == ["0"]
    assert config.scale_for("params/transformer/h/0/mlp/c_fc/kernel") == ALPHA / R


def test_unused_biases_and_foreign_keys_are_an_error():
    """Biases a lora_state_dict(bias='lora_only' / 'all') holds were dropped silently with bias='none', the
    non-LoRA modules' biases with bias='lora_only', and keys of another format whenever loralib keys were there."""
    with pytest.raises(ValueError, match=rf"4 tensor\(s\) adapt nothing.*{FC0}.bias \(a bias trained in full that "
                                         rf"bias='none' does not load: pass bias='lora_only' or 'all'"):
        _load(_state(biases=True))
    sd = _state(biases=True) | {f"transformer.h.{i}.attn.c_proj.bias": np.ones(D, np.float32) for i in (0, 1)}
    with pytest.raises(ValueError, match=r"attn.c_proj.bias \(a bias trained in full that bias='lora_only' does not "
                                         r"load: pass bias='all'"):
        _load(sd, bias="lora_only")
    assert "c_proj" in _load(sd, bias="all")[0]["params"]["transformer"]["h"]["0"]["attn"]
    sd = _state() | {"transformer.h.0.attn.c_proj.lora_A.weight": np.ones((R, D), np.float32)}  # PEFT's naming
    with pytest.raises(ValueError, match=r"c_proj.lora_A.weight \(not a loralib factor"):
        _load(sd)


def test_factors_on_a_module_the_variables_lack():
    sd = _state() | {"transformer.h.2.mlp.c_fc.lora_A": np.ones((R, D), np.float32),
                     "transformer.h.2.mlp.c_fc.lora_B": np.ones((FC, R), np.float32)}
    with pytest.raises(ValueError, match=r"h.2.mlp.c_fc.lora_A/lora_B \(transformer.h.2.mlp.c_fc.weight is not a "
                                         r"parameter of the variables; close candidates: \['transformer.h.[01].mlp"):
        _load(sd)
    with pytest.warns(UserWarning, match="h.2.mlp.c_fc"):
        adapters, _ = _load(sd, strict=False)
    assert sorted(adapters["params"]["transformer"]["h"]) == ["0", "1"]


# --- files (PyTorch) ------------------------------------------------------------------------------------------------


def test_damaged_checkpoint_names_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    good = tmp_path / "good.pt"
    torch.save({k: torch.from_numpy(v) for k, v in _state().items()}, good)
    data = good.read_bytes()
    for name, blob in [("truncated.pt", data[: len(data) // 2]), ("garbage.pt", b"not a checkpoint")]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=rf"{name} is not a readable PyTorch checkpoint"):
            _load(tmp_path / name)


def test_save_loralib_refuses_and_replaces_atomically(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    old, config = _load(_state(seed=1))
    new, _ = _load(_state(seed=2))
    out = tmp_path / "lora.pt"
    save_loralib(out, old, config)
    with pytest.raises(FileExistsError, match="overwrite=True"):  # before: replaced without being asked
        save_loralib(out, new, config)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="No space left"):
        save_loralib(out, new, config, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.pt"]  # no temporary file left behind
    jax.tree.map(np.testing.assert_array_equal, _load(out)[0], old)  # before: a truncated file

    save_loralib(out, new, config, overwrite=True)
    jax.tree.map(np.testing.assert_array_equal, _load(out)[0], new)
    assert sorted(torch.load(out, weights_only=True)) == sorted(to_loralib(new, config))


def test_save_loralib_never_replaces_a_foreign_file(tmp_path):
    pytest.importorskip("torch")
    adapters, config = _load(_state())
    notes = tmp_path / "results.csv"
    notes.write_text("step,loss\n1,0.5\n")
    with pytest.raises(ValueError, match=r"results.csv exists and is not a PyTorch checkpoint"):
        save_loralib(notes, adapters, config, overwrite=True)
    assert notes.read_text() == "step,loss\n1,0.5\n"
    with pytest.raises(ValueError, match="is a directory"):
        save_loralib(tmp_path, adapters, config, overwrite=True)

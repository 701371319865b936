"""load_peft / save_peft on files that are incomplete, foreign or broken, without PyTorch: a PEFT directory is written
by hand (safetensors.numpy + JSON) in PEFT's layout for a tiny two-layer model.

    python -m pytest -q tests/test_interop_peft_checks.py

Every case is an adapter that loaded silently wrong, raised a Python internal, or lost a directory before the checks.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.flax
from safetensors.numpy import save_file

import jlora
from jlora.interop import load_peft, save_peft

IN, OUT, R, ALPHA = 11, 19, 7, 5.0
PREFIX = "base_model.model."
Q0, Q1 = "encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"


def _variables():
    rng = np.random.default_rng(0)
    dense = lambda i, o: {"kernel": jnp.asarray(rng.standard_normal((i, o)), jnp.float32),  # noqa: E731
                          "bias": jnp.asarray(rng.standard_normal(o), jnp.float32)}
    layer = lambda: {"attention": {"self": {"query": dense(IN, OUT), "value": dense(IN, OUT)}},  # noqa: E731
                     "output": {"dense": dense(OUT, IN)}}
    return {"params": {"encoder": {"layer": {"0": layer(), "1": layer()}}}}


def _factors(module, seed, r=R):
    """PEFT's tensors for a Linear (IN -> OUT) `module`: lora_A (r, IN), lora_B (OUT, r), both non-zero."""
    rng = np.random.default_rng(seed)
    return {f"{PREFIX}{module}.lora_A.weight": rng.standard_normal((r, IN)).astype(np.float32),
            f"{PREFIX}{module}.lora_B.weight": rng.standard_normal((OUT, r)).astype(np.float32)}


def _modules(layers=(0, 1), names=("query", "value")):
    return [f"encoder.layer.{i}.attention.self.{n}" for i in layers for n in names]


def _write(directory, tensors=None, **config):
    """A PEFT LoRA directory as PEFT 0.21's save_pretrained writes it (less README.md)."""
    tensors = tensors if tensors is not None else {k: v for i, m in enumerate(_modules())
                                                  for k, v in _factors(m, i).items()}
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": ["query", "value"], "bias": "none",
           "init_lora_weights": True, "use_rslora": False, "lora_dropout": 0.0, "modules_to_save": None,
           "fan_in_fan_out": False, "use_dora": False, "peft_version": "0.21.2", "task_type": None, **config}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def test_complete_adapter_loads_exactly(tmp_path):
    """The baseline the other cases break: every targeted module, factors transposed exactly."""
    adapters, config = load_peft(_write(tmp_path / "a"), _variables())
    pair = adapters["params"]["encoder"]["layer"]["1"]["attention"]["self"]["query"]["kernel"]
    want = _factors(Q1, 2)
    np.testing.assert_array_equal(pair["lora_a"], want[f"{PREFIX}{Q1}.lora_A.weight"].T)
    np.testing.assert_array_equal(pair["lora_b"], want[f"{PREFIX}{Q1}.lora_B.weight"].T)
    assert config.scale_for(f"params/{Q1.replace('.', '/')}/kernel") == ALPHA / R


# --- 1. layers target_modules covers with no tensors; tensors nothing uses -----------------------------------------


def test_missing_layers_are_an_error(tmp_path):
    """target_modules ['query', 'value'] covers both layers; the file holds layer 0 only (an adapter of a shallower
    model): before, layer 1 loaded unadapted without a word."""
    tensors = {k: v for i, m in enumerate(_modules(layers=(0,))) for k, v in _factors(m, i).items()}
    directory = _write(tmp_path / "a", tensors)
    with pytest.raises(ValueError, match=rf"2 module\(s\) that target_modules covers have no tensors.*"
                                         rf"{Q1}.*encoder.layer.1.attention.self.value.*strict=False"):
        load_peft(directory, _variables())
    with pytest.warns(UserWarning, match=rf"have no tensors.*{Q1}"):
        adapters, config = load_peft(directory, _variables(), strict=False)
    assert sorted(adapters["params"]["encoder"]["layer"]) == ["0"]
    assert config.rank_for(f"params/{Q0.replace('.', '/')}/kernel") == R


def test_tensors_target_modules_does_not_cover_are_an_error(tmp_path):
    """PEFT ignores the factors of a module target_modules does not name; jlora applied them."""
    tensors = {**_factors(Q0, 0), **_factors(Q1, 1)}
    rng = np.random.default_rng(5)
    tensors[f"{PREFIX}encoder.layer.0.output.dense.lora_A.weight"] = rng.standard_normal((R, OUT)).astype(np.float32)
    tensors[f"{PREFIX}encoder.layer.0.output.dense.lora_B.weight"] = rng.standard_normal((IN, R)).astype(np.float32)
    directory = _write(tmp_path / "a", tensors, target_modules=["query"])
    with pytest.raises(ValueError, match=r"tensor\(s\) adapt nothing.*output.dense.*target_modules does not cover"):
        load_peft(directory, _variables())
    with pytest.warns(UserWarning, match="output.dense"):
        adapters, _ = load_peft(directory, _variables(), strict=False)
    assert "output" not in adapters["params"]["encoder"]["layer"]["0"]


def test_stray_modules_to_save_copy_is_an_error(tmp_path):
    """A `.modules_to_save.` copy of a module modules_to_save does not list was skipped silently."""
    tensors = {k: v for i, m in enumerate(_modules()) for k, v in _factors(m, i).items()}
    tensors[f"{PREFIX}encoder.layer.0.output.dense.modules_to_save.weight"] = np.ones((IN, OUT), np.float32)
    with pytest.raises(ValueError, match=r"output.dense.modules_to_save.weight \(a copy of a module to save"):
        load_peft(_write(tmp_path / "a", tensors), _variables())


@pytest.mark.parametrize("selection", [
    dict(target_modules=["query", "value"], layers_to_transform=[0]),
    dict(target_modules=["query", "value"], layers_to_transform=0, layers_pattern="layer"),
    dict(target_modules=r".*\.0\.attention\.self\.(query|value)"),
    dict(target_modules=["query", "value"], exclude_modules=["layer.1.attention.self.query",
                                                              "layer.1.attention.self.value"]),
    dict(target_modules=["query", "value"], exclude_modules=r".*\.1\..*"),
], ids=["layers_to_transform", "layers_pattern", "regex", "exclude_list", "exclude_regex"])
def test_peft_selection_rules_are_honoured(selection, tmp_path):
    """Layer 0 only, selected as PEFT selects: no false 'missing' report."""
    tensors = {k: v for i, m in enumerate(_modules(layers=(0,))) for k, v in _factors(m, i).items()}
    adapters, _ = load_peft(_write(tmp_path / "a", tensors, **selection), _variables())
    assert sorted(adapters["params"]["encoder"]["layer"]) == ["0"]
    with pytest.raises(ValueError, match=rf"have no tensors.*{Q1}"):  # and the same rules find what is missing
        load_peft(_write(tmp_path / "b", tensors, target_modules=["query", "value"]), _variables())


def test_all_linear_covers_every_linear_but_the_head(tmp_path):
    """A hand-written target_modules 'all-linear' (PEFT saves the expanded list): every 2-D kernel but lm_head."""
    variables = _variables()
    variables["params"]["lm_head"] = {"kernel": jnp.ones((IN, OUT), jnp.float32)}
    tensors = {k: v for i, m in enumerate(_modules()) for k, v in _factors(m, i).items()}
    with pytest.raises(ValueError, match=r"2 module\(s\) that target_modules covers have no tensors.*"
                                         r"encoder.layer.0.output.dense, encoder.layer.1.output.dense\. "):
        load_peft(_write(tmp_path / "a", tensors, target_modules="all-linear"), variables)
    adapters, _ = load_peft(_write(tmp_path / "b", tensors, target_modules="all-linear",
                                   exclude_modules=["output.dense"]), variables)
    assert "lm_head" not in adapters["params"] and len(jax.tree.leaves(adapters)) == 8


# --- 3. inits that rewrite the base weights; features jlora would silently ignore ----------------------------------


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_base_rewriting_init_is_refused(init, tmp_path):
    directory = _write(tmp_path / "a", init_lora_weights=init)
    with pytest.raises(ValueError, match=rf"adapter_config.json: init_lora_weights='{init}' rewrites the base weights"
                                         r".*path_initial_model_for_weight_conversion"):
        load_peft(directory, _variables())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_load_as_rank_2r_on_the_original_base(init, tmp_path):
    """PEFT re-runs PiSSA / OLoRA on the base it loads onto: jlora rebuilds A0, B0 from the variables and returns
    [A | A0] [B ; -B0] (rank 2r, alpha x2: same scale); before, the file was refused."""
    variables = _variables()
    adapters, config = load_peft(_write(tmp_path / "a", init_lora_weights=init), variables)
    path = f"params/{Q1.replace('.', '/')}/kernel"
    pair = adapters["params"]["encoder"]["layer"]["1"]["attention"]["self"]["query"]["kernel"]
    np.testing.assert_array_equal(pair["lora_a"][:, :R], _factors(Q1, 2)[f"{PREFIX}{Q1}.lora_A.weight"].T)
    assert pair["lora_a"].shape == (IN, 2 * R) and pair["lora_b"].shape == (2 * R, OUT)
    assert config.rank_for(path) == 2 * R and config.scale_for(path) == pytest.approx(ALPHA / R)
    a0, b0 = pair["lora_a"][:, R:], -pair["lora_b"][R:]
    w = variables["params"]["encoder"]["layer"]["1"]["attention"]["self"]["query"]["kernel"]
    resid = np.linalg.svd(w - ALPHA / R * a0 @ b0, compute_uv=False)
    if init == "pissa":  # the residual holds the trailing singular values only
        np.testing.assert_allclose(resid[: IN - R], np.linalg.svd(w, compute_uv=False)[R:], rtol=1e-4)


@pytest.mark.parametrize("init, extra, match", [
    ("pissa_niter_4", {}, "randomized SVD drawn from torch's RNG"),
    ("pissa", {"use_dora": True}, "with use_dora"),
    ("olora", {"fan_in_fan_out": True}, "untransposed"),
])
def test_pissa_olora_files_jlora_cannot_rebuild(init, extra, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        load_peft(_write(tmp_path / "a", init_lora_weights=init, **extra), _variables())


def test_pissa_file_needs_concrete_weights(tmp_path):
    abstract = jax.eval_shape(_variables)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*pass the concrete original base weights"):
        load_peft(_write(tmp_path / "a", init_lora_weights="pissa"), abstract)


def test_loftq_and_unknown_inits_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"adapter_config.json: init_lora_weights='loftq'.*merge_and_unload"):
        load_peft(_write(tmp_path / "a", init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), _variables())
    with pytest.raises(ValueError, match="init_lora_weights='shiny' is not an initialisation jlora knows"):
        load_peft(_write(tmp_path / "b", init_lora_weights="shiny"), _variables())


@pytest.mark.parametrize("init", [False, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_keep_the_base_load(init, tmp_path):
    adapters, _ = load_peft(_write(tmp_path / "a", init_lora_weights=init), _variables())
    assert len(jax.tree.leaves(adapters)) == 8


@pytest.mark.parametrize(("field", "value", "match"), [
    ("megatron_config", {"tensor_model_parallel_size": 2}, "Megatron"),
    ("use_bdlora", {"lora_a_is_blockdiagonal": True}, "BD-LoRA"),
    ("kasa_config", {"beta": 1.0}, "KaSA"),
    ("velora_config", {"num_groups": 2}, "VeLoRA"),
    ("arrow_config", {"top_k": 2}, "Arrow"),
    ("enable_lora", [True, False, True], "enable_lora"),
    ("use_magic_scaling", True, r"sets use_magic_scaling=True, which jlora does not know"),
])
def test_unsupported_or_unknown_fields_are_refused(field, value, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        load_peft(_write(tmp_path / "a", **{field: value}), _variables())


def test_rank_that_contradicts_the_config_is_refused(tmp_path):
    """r / rank_pattern say 4, the tensors rank 7: PEFT refuses the file; jlora loaded it with scale alpha/7."""
    with pytest.raises(ValueError, match=rf"{Q0}.lora_A.weight has rank 7.*rank 4 \(r / rank_pattern\)"):
        load_peft(_write(tmp_path / "a", r=4), _variables())
    with pytest.raises(ValueError, match=r"value.lora_A.weight has rank 7.*rank 3"):
        load_peft(_write(tmp_path / "b", rank_pattern={"value": 3}), _variables())


# --- 4. broken files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "match"), [
    ("{not json", r"adapter_config.json is not valid JSON"),
    ("[1, 2]", r"adapter_config.json is not a JSON object but a list"),
    ('{"peft_type": "LORA", "lora_alpha": 8, "target_modules": ["query"]}', r"adapter_config.json has no r\b"),
    ('{"peft_type": "LORA", "r": 8, "lora_alpha": 8}', r"adapter_config.json has no target_modules"),
    ('{"peft_type": "LORA", "r": 8, "target_modules": ["query"]}', r"adapter_config.json has no lora_alpha"),
    ('{"peft_type": "LORA", "r": "8", "lora_alpha": 8, "target_modules": ["q"]}', r"r is '8', but must be a positive"),
    ('{"peft_type": "LORA", "r": 8, "lora_alpha": [8], "target_modules": ["q"]}', r"lora_alpha is \[8\], but must"),
    ('{"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": 3}', r"target_modules is 3, but must be"),
])
def test_broken_config_names_the_file(text, match, tmp_path):
    directory = _write(tmp_path / "a")
    (directory / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_peft(directory, _variables())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_broken_safetensors_names_the_file(damage, tmp_path):
    directory = _write(tmp_path / "a")
    file = directory / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[:-100], "garbage": b"not a safetensors file at all", "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is not a readable safetensors file"):
        load_peft(directory, _variables())


def test_integer_tensors_and_missing_files(tmp_path):
    tensors = {k: v for i, m in enumerate(_modules()) for k, v in _factors(m, i).items()}
    tensors[f"{PREFIX}{Q0}.lora_B.weight"] = tensors[f"{PREFIX}{Q0}.lora_B.weight"].astype(np.int32)
    with pytest.raises(ValueError, match=rf"safetensors holds tensors that are not floating point.*{Q0}.*int32"):
        load_peft(_write(tmp_path / "a", tensors), _variables())
    directory = _write(tmp_path / "b")
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no adapter_model.safetensors"):
        load_peft(directory, _variables())
    (directory / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json"):
        load_peft(directory, _variables())


# --- 5. atomic overwrite -----------------------------------------------------------------------------------------


def _jlora_adapters(seed, alpha):
    variables = _variables()
    config = jlora.LoraConfig(rank=R, alpha=alpha, targets=("query",))
    rng = np.random.default_rng(seed)
    pairs = {f"params/{m.replace('.', '/')}/kernel": {"lora_a": jnp.asarray(rng.standard_normal((IN, R)), jnp.float32),
                                                      "lora_b": jnp.asarray(rng.standard_normal((R, OUT)), jnp.float32)}
             for m in (Q0, Q1)}
    from jlora.paths import nest

    return variables, nest(pairs), config


def test_save_peft_refuses_and_replaces_atomically(tmp_path, monkeypatch):
    variables, old, old_config = _jlora_adapters(0, 3.0)
    out = tmp_path / "adapter"
    save_peft(out, old, old_config, base_model_name_or_path="tiny")
    _, new, new_config = _jlora_adapters(1, 9.0)
    with pytest.raises(FileExistsError, match="overwrite=True"):  # before: overwritten without being asked
        save_peft(out, new, new_config, base_model_name_or_path="tiny")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.flax, "save_file", boom)
    with pytest.raises(OSError, match="No space left"):
        save_peft(out, new, new_config, base_model_name_or_path="tiny", overwrite=True)
    monkeypatch.undo()
    loaded, config = load_peft(out, variables)  # before: the new config beside the old tensors (alpha 9 on old)
    assert config.alpha == 3.0
    jax.tree.map(np.testing.assert_array_equal, loaded, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging directory left behind

    save_peft(out, new, new_config, base_model_name_or_path="tiny", overwrite=True)
    loaded, config = load_peft(out, variables)
    assert config.alpha == 9.0
    jax.tree.map(np.testing.assert_array_equal, loaded, new)


def test_save_peft_never_deletes_a_foreign_directory(tmp_path):
    _, adapters, config = _jlora_adapters(0, 3.0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("three weeks of results")
    with pytest.raises(ValueError, match=r"run exists and is not a PEFT adapter directory \(it holds notes.txt\)"):
        save_peft(run, adapters, config, base_model_name_or_path="tiny", overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # before: the adapter files were added beside
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory (tempfile.mkdtemp()) holds nothing to lose: no overwrite needed
    assert save_peft(empty, adapters, config, base_model_name_or_path="tiny") == empty
    assert sorted(p.name for p in empty.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

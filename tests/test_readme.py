"""The README's code blocks run as pasted: the quickstart, the NNX section, the other libraries (haiku, equinox,
keras), the real-models walkthrough."""

import pathlib
import re

import pytest


def python_blocks() -> list[str]:
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_quickstart_runs_as_pasted():
    namespace: dict = {}
    exec(compile(python_blocks()[0], "README.md", "exec"), namespace)
    assert namespace["y"].shape == (8, 4)
    assert "lora_a" in namespace["adapters"]["params"]["query"]["kernel"]


@pytest.mark.reference
@pytest.mark.assets
def test_real_models_walkthrough_runs_as_pasted(capsys):
    namespace: dict = {}
    block = python_blocks()[5]
    assert "assets.fetch" in block, "README blocks moved: update the indices"
    exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    diff = float(re.search(r"max \|PEFT - jlora\| = (\S+)", printed).group(1))
    assert diff < 1e-4
    assert "Paris" in printed


def test_nnx_section_runs_as_pasted(capsys):
    import jax.numpy as jnp
    import numpy as np

    namespace: dict = {}
    exec(compile(python_blocks()[1], "README.md", "exec"), namespace)
    frozen, adapters, model = namespace["frozen"], namespace["adapters"], namespace["model"]
    assert int(frozen["drop"]["rngs"]["count"]) == 5 == int(model.drop.rngs.count[...])  # a fresh mask per step
    assert float(jnp.max(jnp.abs(frozen["norm"]["mean"]))) > 1e-3  # BatchNorm statistics were updated
    np.testing.assert_allclose(model.norm.mean[...], frozen["norm"]["mean"])
    assert float(jnp.max(jnp.abs(adapters["query"]["kernel"]["lora_b"]))) > 0
    assert float(capsys.readouterr().out.rsplit("= ", 1)[1]) < 1e-5  # merged module == eval-mode LoRA output


def _run_block(index: int, first_import: str) -> dict:
    block = python_blocks()[index]
    assert first_import in block, "README blocks moved: update the indices"
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


@pytest.mark.thirdparty
def test_haiku_section_runs_as_pasted():
    pytest.importorskip("haiku")
    import jax
    import numpy as np
    from helpers import perturb

    import jlora

    ns = _run_block(2, "import haiku")
    assert ns["adapters"]["multi_head_attention"]["query"]["w"]["lora_a"].shape == (32, 8)
    adapters = perturb(ns["adapters"])
    lora, frozen, config, model, rng, x = (ns[k] for k in ("lora", "frozen", "config", "model", "rng", "x"))
    want = model.apply(jlora.merge(frozen, adapters, config), rng, x)
    np.testing.assert_allclose(lora.apply(frozen, adapters, rng, x), want, atol=1e-5)
    assert not np.allclose(want, model.apply(ns["params"], rng, x), atol=1e-3)
    assert not np.allclose(want, model.apply(ns["params"], jax.random.key(3), x), atol=1e-3)  # the rng is used


@pytest.mark.thirdparty
def test_equinox_section_runs_as_pasted():
    eqx = pytest.importorskip("equinox")
    import jax
    import numpy as np
    from helpers import perturb

    import jlora

    ns = _run_block(3, "import equinox")
    assert isinstance(ns["merged_model"], eqx.nn.MLP)
    adapters = perturb(ns["adapters"])
    lora, frozen, config, static, x = (ns[k] for k in ("lora", "frozen", "config", "static", "x"))
    merged = eqx.combine(jlora.merge(frozen, adapters, config), static)
    want = jax.vmap(merged)(x)
    np.testing.assert_allclose(lora.apply(frozen, adapters, x), want, atol=1e-5)
    assert not np.allclose(want, jax.vmap(ns["model"])(x), atol=1e-3)


@pytest.mark.thirdparty
def test_keras_section_runs_as_pasted():
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("keras runs on another backend than jax")
    import numpy as np
    from helpers import perturb

    import jlora

    ns = _run_block(4, "import keras")
    lora, frozen, config, model, x = (ns[k] for k in ("lora", "frozen", "config", "model", "x"))
    assert "lora_a" in ns["adapters"]["sequential"]["hidden"]["kernel"]
    base = np.asarray(model(x))
    adapters = perturb(ns["adapters"])
    merged = jlora.merge(frozen, adapters, config)
    for v in model.trainable_variables:  # as the README writes them back
        v.assign(merged[v.path])
    np.testing.assert_allclose(lora.apply(frozen, adapters, x), model(x), atol=1e-5)
    assert not np.allclose(base, model(x), atol=1e-3)


def test_qlora_section_runs_as_pasted(capsys):
    import jax
    import numpy as np

    import jlora

    ns = _run_block(9, "jlora.quantize(frozen, qtype=\"nf4\"")
    printed = capsys.readouterr().out
    assert "QuantizedArray(nf4, shape=(64, 192), dtype=float32, block_size=64, double_quant)" in printed
    frozen, adapters, lora, ids = ns["frozen"], ns["adapters"], ns["lora"], ns["ids"]
    assert float(np.abs(adapters["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]["lora_b"]).max()) > 0
    # the float merge equals the QLoRA model (bf16 rounding aside), and the saved fingerprint records nf4
    np.testing.assert_allclose(ns["model"].apply(jlora.merge(frozen, adapters, lora.config), ids),
                               jax.jit(lora.apply)(frozen, adapters, ids), rtol=1e-4, atol=1e-4)
    assert ns["merged"]["params"]["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].dtype == jax.numpy.bfloat16
    assert ns["report"]["params/transformer/h/0/attn/c_attn/kernel"]["rms"] > 0
    _, config = jlora.load_adapters("/tmp/jlora_qlora", variables=frozen)
    assert config == lora.config


def test_many_adapters_sections_run_as_pasted(capsys):
    import numpy as np

    ns = _run_block(10, "from jlora import multi")
    assert float(capsys.readouterr().out.rsplit("\n", 2)[-2]) < 1e-5  # the served stack equals the merged model
    assert ns["ys"].shape == (3, 8, 4) and [c.rank for _, c in ns["trained"]] == [2, 4, 8]
    ns = _run_block(11, "adapter_ids=ids")
    assert ns["logits"].shape == (4, 8, 512) and ns["tokens"].shape == (4, 24)
    np.testing.assert_array_equal(ns["tokens"][:, :8], ns["prompts"])
    base = ns["model"].apply(ns["frozen"], ns["prompts"][2:3])  # row 2 has id -1: the base model alone
    np.testing.assert_allclose(ns["logits"][2:3], base, rtol=1e-5, atol=1e-4)
    ns = _run_block(12, "jlora.combine_adapters")
    assert ns["config"].rank == 12


def test_lora_family_section_runs_as_pasted(capsys):
    import jax
    import numpy as np

    ns = _run_block(13, "dora=True")
    assert capsys.readouterr().out.split() == ["(1,", "256)", "True", "(4,", "64,", "4)"]
    mlp = ns["adapters"]["params"]["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"]
    assert float(jax.numpy.abs(mlp["lora_b"]).max()) > 0 and np.isfinite(float(ns["loss"]))  # DoRA + LoRA+ trained
    for got, want in zip(jax.tree.leaves(ns["restored"]), jax.tree.leaves(ns["frozen"]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # unmerge with the norms inverts merge
    assert ns["plain_config"].rank == 16 and ns["logits"].shape == (4, 32, 512)

"""The README's code blocks run as pasted: the quickstart, the NNX section, the real-models walkthrough."""

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
    exec(compile(python_blocks()[2], "README.md", "exec"), namespace)
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

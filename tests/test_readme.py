"""The README's quickstart runs as pasted."""

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
    exec(compile(python_blocks()[1], "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    diff = float(re.search(r"max \|PEFT - jlora\| = (\S+)", printed).group(1))
    assert diff < 1e-4
    assert "Paris" in printed

"""The README's quickstart runs as pasted."""

import pathlib
import re


def test_quickstart_runs_as_pasted():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["y"].shape == (8, 4)
    assert "lora_a" in namespace["adapters"]["params"]["query"]["kernel"]

"""The README's "Multi-device and multi-host" block runs as pasted on 8 devices, and does what its comments say."""

import os
import pathlib
import re
import sys

import jax
from jax.sharding import PartitionSpec as P


def _block(marker: str) -> str:
    text = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    found = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if marker in b]
    assert len(found) == 1, f"README: {len(found)} python blocks contain {marker!r}"
    return found[0]


def test_mesh_training_block_runs_as_pasted(capsys):
    namespace: dict = {}
    exec(compile(_block('jax.make_mesh((2, 4), ("data", "model")'), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "P(None, 'model')"
    assert printed[1].endswith("P('model',)")
    adapters, state, mesh = namespace["adapters"], namespace["state"], namespace["mesh"]
    up = adapters["params"]["up"]["kernel"]
    assert up["lora_a"].sharding.spec == P() and up["lora_b"].sharding.spec == P(None, "model")
    assert float(abs(up["lora_b"]).max()) > 0  # trained
    moments = [x for x in jax.tree.leaves(state) if x.ndim == 2]
    assert moments and all(x.sharding.mesh == mesh for x in moments)


WRAPPER = """import runpy, sys
import multihost_worker
multihost_worker.loopback_only()  # gloo on 127.0.0.1 too, whatever the hostname resolves to
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_multihost_script_and_restore_run_as_pasted(tmp_path, capsys):
    """The README's lora_multihost.py in 2 processes of 4 CPU devices (its bash block's environment, a free port on
    127.0.0.1), printing what the README says; then its restore block here on 8 devices."""
    from test_multihost import HERE, child_env, free_port, run_processes

    script = tmp_path / "lora_multihost.py"
    script.write_text(_block("jax.distributed.initialize(address"))
    port, directory = free_port(), tmp_path / "ckpt"
    env = {**child_env(), "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
           "PYTHONPATH": os.pathsep.join([str(HERE), child_env()["PYTHONPATH"]])}
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    run_processes([[sys.executable, "-c", WRAPPER, str(script), f"127.0.0.1:{port}", "2", str(i), str(directory)]
                   for i in range(2)], env, logs)
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    out0 = logs[0].read_text()
    steps = re.findall(r"step \d: loss [\d.]+", out0)
    assert len(steps) == 3 and all(f"`{s}`" in readme for s in steps), (steps, out0[-2000:])
    for log in logs:
        assert "steps [2, 3], lora_a of up sharded as P('data', None)" in log.read_text()

    block = _block('jlora.load_adapters("/tmp/jlora-multihost/3"')
    exec(compile(block.replace("/tmp/jlora-multihost", str(directory)), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("'lora_a': P('data', None)") == 2 and printed.count("'lora_b': P(None, None)") == 2, printed

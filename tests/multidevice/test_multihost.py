"""Two JAX processes (jax.distributed on 127.0.0.1, 4 CPU devices each, one mesh of 8) train, save and restore
adapters like one process of 8 devices; their checkpoints restore here on 1 device and on a 4-device mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/multidevice/test_multihost.py
"""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import multihost_worker as worker
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora import basecheck
from jlora.paths import named_leaves

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMEOUT = 120  # seconds for both processes together (they take ~15 s on 2 cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """This process's environment with 4 CPU devices instead of 8 (the flag replaced, other XLA flags kept)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4".strip(),
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}


def run_processes(commands: list[list[str]], env: dict[str, str], logs: list[pathlib.Path]) -> None:
    """Runs the commands as concurrent processes (stdout and stderr to `logs`) until all exit, one fails, or
    TIMEOUT passes; kills the rest (SIGKILL: JAX ignores SIGTERM); fails the test with their logs' tails."""
    procs = []
    try:
        for command, log in zip(commands, logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it at a barrier
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        tails = "\n".join(f"--- process {i} (exit {c}) ---\n" + "\n".join(log.read_text().splitlines()[-40:])
                          for i, (c, log) in enumerate(zip(codes, logs)))
        pytest.fail(f"the {len(procs)}-process run failed or took over {TIMEOUT} s (exit codes {codes}):\n{tails}")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The directory the two worker processes wrote (checkpoints, result.npz); fails with their logs."""
    out = tmp_path_factory.mktemp("multihost")
    port, logs = free_port(), [out.parent / f"{out.name}-process{i}.log" for i in range(2)]
    run_processes([[sys.executable, str(HERE / "multihost_worker.py"), str(i), str(port), str(out)] for i in range(2)],
                  child_env(), logs)
    return out


@pytest.fixture(scope="module")
def single_process():
    """The same training on this process's 8 devices: `(variables, shardings, history, losses)`."""
    return worker.train(Mesh(np.array(jax.devices()), ("data",)))


def saved(out, step: int) -> dict[str, np.ndarray]:
    """The 2-process run's adapters after `step` (1-based), gathered, by path."""
    with np.load(out / "result.npz") as f:
        return {k.split(":", 1)[1]: f[k] for k in f.files if k.startswith(f"{step - 1}:")}


def test_two_processes_train_and_save_like_one_process(two_processes, single_process):
    _, _, history, losses = single_process
    with np.load(two_processes / "result.npz") as f:
        np.testing.assert_allclose(f["losses"], losses, rtol=1e-5)
    assert losses[2] < losses[0]
    for step, adapters in enumerate(history, start=1):
        want = {p: np.asarray(x) for p, x in named_leaves(adapters)}
        got = saved(two_processes, step)
        assert got.keys() == want.keys()
        for p in want:
            np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-6, err_msg=f"step {step}: {p}")
        assert np.abs(got["params/value/kernel/lora_b"]).min() > 0  # trained: the comparison is not of zeros
    assert jlora.AdapterCheckpointManager(two_processes / "managed").all_steps() == [2, 3]
    for checkpoint in (two_processes / "adapters", two_processes / "managed" / "3"):  # each process wrote its shards
        assert sorted(p.name for p in (checkpoint / "adapters").glob("ocdbt.process_*")) == ["ocdbt.process_0",
                                                                                              "ocdbt.process_1"]
    assert not [n for d in (two_processes, two_processes / "managed") for n in os.listdir(d) if n.startswith(".")]


def check(adapters, want: dict[str, np.ndarray], shardings: dict):
    for p, x in named_leaves(adapters):
        np.testing.assert_array_equal(np.asarray(x), want[p], err_msg=p)
        assert x.dtype == np.float32
        assert x.sharding.is_equivalent_to(shardings[p], x.ndim), (p, x.sharding, shardings[p])
    assert {p for p, _ in named_leaves(adapters)} == want.keys()


def test_restore_the_two_process_checkpoints_on_one_device(two_processes):
    variables, _, _, _, _ = worker.host_values()
    device = jax.devices()[0]
    variables = jax.device_put(variables, device)
    one = {p: SingleDeviceSharding(device) for p in saved(two_processes, 3)}
    adapters, config = jlora.load_adapters(two_processes / "adapters", variables=variables)  # digests compared
    assert config == worker.CONFIG
    check(adapters, saved(two_processes, 3), one)
    manager = jlora.AdapterCheckpointManager(two_processes / "managed")
    check(manager.restore(2, variables=variables)[0], saved(two_processes, 2), one)
    # without variables: the saved 8-device, 2-process sharding does not exist here; the default device does
    check(jlora.load_adapters(two_processes / "adapters")[0], saved(two_processes, 3), one)


def test_restore_the_two_process_checkpoints_on_a_four_device_mesh(two_processes):
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    variables = worker.variables_on(mesh, worker.host_values()[0])
    expected = {"params/query/kernel/lora_a": P("data", None), "params/query/kernel/lora_b": P(None, None),
                "params/value/kernel/lora_a": P(None, None), "params/value/kernel/lora_b": P(None, "data"),
                "params/query/bias": P(), "params/value/bias": P("data")}
    shardings = {p: NamedSharding(mesh, s) for p, s in expected.items()}
    adapters, _ = jlora.load_adapters(two_processes / "adapters", variables=variables)
    check(adapters, saved(two_processes, 3), shardings)
    manager = jlora.AdapterCheckpointManager(two_processes / "managed")
    restored, _ = manager.restore(variables=variables)
    check(restored, saved(two_processes, 3), shardings)
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(restored)} == {4}


@pytest.mark.parametrize("axis_types", ["explicit", "auto"])
def test_fingerprint_of_sharded_weights_equals_the_unsharded_ones(tmp_path, axis_types):
    # jax.make_mesh's axes are Explicit by default: a sharded weight's sample cannot be taken by a reshape there
    types = (jax.sharding.AxisType.Explicit if axis_types == "explicit" else jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=types)
    rng = np.random.default_rng(0)
    for shape, spec, dtype in [((16, 24), P("data", "model"), np.float32), ((64, 4096), P(None, "data"), np.float32),
                               ((4, 24, 40), P("data", None, "model"), jax.numpy.bfloat16), ((8, 3), P(), np.float32)]:
        host = rng.standard_normal(shape).astype(dtype)
        sharded = jax.device_put(host, NamedSharding(mesh, spec))
        assert basecheck.digest(sharded) == basecheck.digest(host), (shape, spec)
    specs = {"params/query/kernel": P("data", "model"), "params/query/bias": P("model"),
             "params/value/kernel": P("model", "data"), "params/value/bias": P("data")}
    variables, _, adapters, _, _ = worker.host_values()
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(x, NamedSharding(mesh, specs["/".join(k.key for k in p)])), variables)
    jlora.save_adapters(tmp_path / "a", adapters, worker.CONFIG, variables=variables)
    restored, _ = jlora.load_adapters(tmp_path / "a", variables=variables)  # digests compared
    want = jlora.adapter_shardings(variables, adapters, config=worker.CONFIG)
    assert want["params"]["query"]["kernel"]["lora_a"].spec == P("data", None)
    check(restored, dict(named_leaves(adapters)), dict(named_leaves(want)))

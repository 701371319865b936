"""One process of the 2-process run of tests/multidevice/test_multihost.py, and the training loop both runs share.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multidevice/multihost_worker.py ID PORT OUT

Process ID (0 or 1) of 2 joins the coordinator on 127.0.0.1:PORT (4 CPU devices each, one global mesh of 8),
trains the tiny LoRA model 3 AdamW steps (FSDP kernel, tensor-parallel kernel, data-parallel batch), saves with
save_adapters (overwriting once) and with AdapterCheckpointManager, restores both on the 8-device mesh and checks
values and shardings; process 0 writes OUT/result.npz (losses, adapters after each step, gathered). Any failure
exits non-zero with its traceback on stderr.
"""

import functools
import os
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora.paths import named_leaves

IN, HIDDEN, OUT, RANK, BATCH, STEPS = 16, 24, 40, 7, 16, 3  # in/out divisible by the 8 devices, all distinct
CONFIG = jlora.LoraConfig(rank=RANK, alpha=14, targets=("query", "value"), bias="lora_only")
# query: FSDP (input axis sharded); value: column-parallel (output axis); the batch: data-parallel
SPECS = {"params/query/kernel": P("data", None), "params/query/bias": P(),
         "params/value/kernel": P(None, "data"), "params/value/bias": P("data")}


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(HIDDEN, name="query")(x))
        return nn.Dense(OUT, name="value")(h)


LORA = jlora.lora_transform(Net().apply, CONFIG)
OPT = jlora.masked_optimizer(optax.adamw(3e-2, weight_decay=0.01), CONFIG)


def host_values():
    """`(variables, frozen, adapters, x, target)` as numpy trees: the same on every process (same keys, CPU)."""
    x = jax.random.normal(jax.random.key(0), (BATCH, IN))
    target = jax.random.normal(jax.random.key(3), (BATCH, OUT))
    variables = Net().init(jax.random.key(1), x)
    frozen, adapters = LORA.init(variables, x, key=jax.random.key(2))
    return jax.tree.map(np.asarray, (variables, frozen, adapters, x, target))


def spread(tree, shardings):
    """Global arrays of the numpy `tree`, each process supplying its own devices' shards."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), tree, shardings)


def variables_on(mesh, variables):
    """The numpy `variables` (or frozen tree) placed on `mesh` by SPECS."""
    shardings = jax.tree_util.tree_map_with_path(
        lambda p, _: NamedSharding(mesh, SPECS["/".join(str(k.key) for k in p)]), variables)
    return spread(variables, shardings)


def train(mesh):
    """`(variables, shardings, [adapters after each step], [losses])` of STEPS AdamW steps on `mesh`: variables
    and adapters global arrays, adapters placed by jlora.adapter_shardings, the batch split over "data"."""
    variables, frozen, adapters, x, target = host_values()
    variables, frozen = variables_on(mesh, variables), variables_on(mesh, frozen)
    shardings = jlora.adapter_shardings(variables, adapters, config=CONFIG)
    adapters = spread(adapters, shardings)
    batch = NamedSharding(mesh, P("data"))
    x, target = spread((x, target), (batch, batch))
    replicated = NamedSharding(mesh, P())

    @jax.jit
    def step(frozen, adapters, opt_state, x, target):
        def loss_fn(a):
            return jnp.mean((LORA.apply(frozen, a, x) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = OPT.update(grads, opt_state, adapters)
        adapters = jax.lax.with_sharding_constraint(optax.apply_updates(adapters, updates), shardings)
        return adapters, opt_state, jax.lax.with_sharding_constraint(loss, replicated)

    opt_state = jax.jit(OPT.init)(adapters)
    history, losses = [], []
    for _ in range(STEPS):
        adapters, opt_state, loss = step(frozen, adapters, opt_state, x, target)
        history.append(adapters)
        losses.append(float(loss))
    return variables, shardings, history, losses


def gathered(adapters) -> dict[str, np.ndarray]:
    """`{path: whole numpy array}` of global adapters (a collective with several processes)."""
    from jax.experimental import multihost_utils

    return {p: np.asarray(x) for p, x in named_leaves(multihost_utils.process_allgather(adapters, tiled=True))}


def check_restored(restored, want, shardings):
    """The restored adapters equal `want` (global arrays) in value, dtype and sharding."""
    got, expected = gathered(restored), gathered(want)
    assert got.keys() == expected.keys(), (sorted(got), sorted(expected))
    for p in expected:
        np.testing.assert_array_equal(got[p], expected[p], err_msg=p)
    for (p, x), (_, s) in zip(named_leaves(restored), named_leaves(shardings), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), (p, x.sharding, s)
        assert x.dtype == jnp.float32, (p, x.dtype)


def loopback_only() -> None:
    """Gloo, JAX's CPU collectives, listens on the address the hostname resolves to: pin it to 127.0.0.1 so the
    test opens no port on another interface (JAX has no public setting; a private hook, skipped if it moves).
    Must run before the CPU backend starts."""
    from jax._src import xla_bridge

    lib = getattr(xla_bridge, "_jax", None)
    make = getattr(lib, "make_gloo_tcp_collectives", None)
    if make is not None:
        lib.make_gloo_tcp_collectives = functools.partial(make, hostname="127.0.0.1")


def main(process_id: int, port: int, out: pathlib.Path) -> None:
    loopback_only()
    address = f"127.0.0.1:{port}"
    jax.distributed.initialize(coordinator_address=address, coordinator_bind_address=address, num_processes=2,
                               process_id=process_id, initialization_timeout=60)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    variables, shardings, history, losses = train(mesh)
    assert not all(x.is_fully_addressable for x in jax.tree.leaves(variables))

    path = out / "adapters"
    jlora.save_adapters(path, history[1], CONFIG, variables=variables)
    try:
        jlora.save_adapters(path, history[2], CONFIG, variables=variables)
    except FileExistsError as e:  # process 0's own, rebuilt on process 1
        assert e.filename == str(path), e
    else:
        raise AssertionError("saving over an existing checkpoint without overwrite did not raise")
    jlora.save_adapters(path, history[2], CONFIG, variables=variables, overwrite=True)
    restored, config = jlora.load_adapters(path, variables=variables)  # the content digests checked too
    assert config == CONFIG
    check_restored(restored, history[2], shardings)
    check_restored(jlora.load_adapters(path)[0], history[2], shardings)  # no variables: the saved shardings

    with jlora.AdapterCheckpointManager(out / "managed", max_to_keep=2) as manager:
        for step, adapters in enumerate(history, start=1):
            manager.save(step, adapters, CONFIG, variables=variables)
        assert manager.all_steps() == [2, 3], manager.all_steps()
        check_restored(manager.restore(variables=variables)[0], history[2], shardings)
        check_restored(manager.restore(2, variables=variables)[0], history[1], shardings)

    steps = [gathered(a) for a in history]
    if jax.process_index() == 0:
        np.savez(out / "result.npz", losses=np.array(losses),
                 **{f"{i}:{p}": x for i, s in enumerate(steps) for p, x in s.items()})
    staging = [n for d in (out, out / "managed") for n in os.listdir(d) if n.startswith(".")]
    assert not staging, staging


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))

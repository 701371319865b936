"""The multi-device tests: 8 simulated CPU devices (one process), or two processes of 4 started by the tests."""

import jax
import pytest


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
    if jax.device_count() != 8:
        pytest.fail(f"tests/multidevice needs 8 devices, found {jax.device_count()}: run it as "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/multidevice")

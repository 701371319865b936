"""Shared fixtures: the real assets, fetched once per session into $JLORA_CACHE (CI sets it inside the clone)."""

import os

import pytest

from jlora import assets


@pytest.fixture(scope="session")
def minilm_dir():
    return assets.fetch("minilm", progress=False)


@pytest.fixture(scope="session")
def smollm2_gguf():
    return assets.fetch("smollm2", progress=False)


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir():
    return assets.fetch("gpt2-tokenizer", progress=False)


# tests/multidevice needs 8 CPU devices, which XLA_FLAGS must ask for before JAX starts: `make test` runs it as its
# own pytest process (XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/multidevice); a plain
# `pytest` leaves it out
collect_ignore = [] if "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "") else ["multidevice"]

"""Shared fixtures: the real assets, fetched once per session into $JLORA_CACHE (CI sets it inside the clone)."""

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

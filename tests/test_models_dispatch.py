"""jlora.models.from_pretrained dispatches on model_type / file type, and rejects unknown architectures."""

import json

import pytest

from jlora import models


def test_unknown_architecture_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"model_type 'mamba' is not supported.*'bert', 'gpt2', 'llama'"):
        models.from_pretrained(tmp_path)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        models.from_pretrained(tmp_path / "nowhere")


@pytest.mark.assets
def test_dispatch_on_a_real_asset(minilm_dir):
    module, variables = models.from_pretrained(minilm_dir)
    assert isinstance(module, models.BertModel)
    assert variables["params"]["encoder"]["layer"]["5"]["attention"]["self"]["query"]["kernel"].shape == (384, 384)

"""MixtralConfig and the Mixtral loader refuse what jlora.models.mixtral does not implement (no torch needed)."""

import pytest

from jlora.models import mixtral

HF = dict(model_type="mixtral", vocab_size=61, hidden_size=24, intermediate_size=11, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2)


def test_from_hf_reads_the_experts_and_the_llama_fields():
    config = mixtral.MixtralConfig.from_hf(HF)
    assert (config.num_local_experts, config.num_experts_per_tok, config.head_dim, config.rope_theta) == (5, 2, 6, 1e6)
    assert config.mlp is mixtral.MixtralSparseMoeBlock


@pytest.mark.parametrize(("change", "message"), [
    (dict(sliding_window=4), r"sliding_window=4 is not supported"),
    (dict(model_type="llama"), r"model_type 'llama' is not a Mixtral config"),
    (dict(num_experts_per_tok=6), r"num_experts_per_tok \(6\) exceeds num_local_experts \(5\)"),
    (dict(num_local_experts=0), r"num_local_experts must be a positive int, got 0"),
])
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        mixtral.MixtralConfig.from_hf({**HF, **change})


def test_sharded_loading_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"mesh= / rules= .*not implemented for Mixtral"):
        mixtral.from_pretrained(tmp_path, rules="fsdp")

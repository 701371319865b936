"""jlora: low-rank adaptation (LoRA) for JAX as a parameter transform.

    lora = jlora.lora_transform(model.apply, jlora.LoraConfig(rank=8, alpha=16, targets=("query", "value")))
    frozen, adapters = lora.init(variables, x, key=jax.random.key(1))
    y = lora.apply(frozen, adapters, x)
"""

from jlora import multi
from jlora.analysis import LayoutWarning
from jlora.checkpoint import CorruptCheckpointError, fingerprint, load_adapters, save_adapters
from jlora.combination import combine_adapters
from jlora.config import LoraConfig
from jlora.interpreter import FactoredFallbackWarning
from jlora.manager import AdapterCheckpointManager
from jlora.merge import dora_norms, merge, merge_requantized, unmerge
from jlora.optim import loralib_adamw, masked_optimizer, optimizer_shardings
from jlora.partition import combine, split, trainable_mask
from jlora.quant import QuantizedArray, dequantize, quantize
from jlora.sharding import adapter_shardings
from jlora.transform import LoraTransform, lora_transform
from jlora.validate import RankWarning, check_adapters, check_pairs
from jlora.variants.convert import convert_to_plain_lora
from jlora.variants.init import RewrittenBaseWarning
from jlora.variants.loraplus import loraplus, loraplus_labels

__version__ = "0.1.0"

__all__ = [
    "AdapterCheckpointManager",
    "CorruptCheckpointError",
    "FactoredFallbackWarning",
    "LayoutWarning",
    "LoraConfig",
    "LoraTransform",
    "QuantizedArray",
    "RankWarning",
    "RewrittenBaseWarning",
    "adapter_shardings",
    "check_adapters",
    "check_pairs",
    "combine",
    "combine_adapters",
    "convert_to_plain_lora",
    "dequantize",
    "dora_norms",
    "fingerprint",
    "load_adapters",
    "lora_transform",
    "loralib_adamw",
    "loraplus",
    "loraplus_labels",
    "masked_optimizer",
    "merge",
    "merge_requantized",
    "multi",
    "optimizer_shardings",
    "quantize",
    "save_adapters",
    "split",
    "trainable_mask",
    "unmerge",
]

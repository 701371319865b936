"""Adapter files of the PyTorch LoRA libraries: Hugging Face PEFT directories and microsoft/LoRA (loralib) state dicts.

    jlora.interop.save_peft(out_dir, adapters, config, base_model_name_or_path="bert-base-uncased")
    adapters, config = jlora.interop.load_peft(peft_dir, variables)
    adapters, config = jlora.interop.load_loralib("gpt2_md_lora_e2e.pt", variables, rank=4, alpha=32)
"""

from jlora.interop.loralib import load_loralib, save_loralib, to_loralib
from jlora.interop.peft import load_peft, save_peft

__all__ = ["load_loralib", "load_peft", "save_loralib", "save_peft", "to_loralib"]

"""Adapter files of the PyTorch LoRA libraries: Hugging Face PEFT directories and microsoft/LoRA (loralib) state dicts.

    jlora.interop.save_peft(out_dir, adapters, config, base_model_name_or_path="bert-base-uncased")
    adapters, config = jlora.interop.load_peft(peft_dir, variables)
    adapters, config = jlora.interop.load_loralib("gpt2_md_lora_e2e.pt", variables, rank=4, alpha=32)

Loading is strict: a module the file should adapt but holds no tensors for, or a tensor nothing uses, is a ValueError
listing them; `strict=False` loads the rest and warns instead (PEFT itself warns about missing adapter keys and
ignores unexpected ones; torch's `load_state_dict(strict=False)`, loralib's recipe, says nothing). Saving never
replaces an existing adapter unless `overwrite=True`, and then atomically; never a directory or file jlora did not
write.
"""

from jlora.interop.loralib import load_loralib, save_loralib, to_loralib
from jlora.interop.peft import save_peft
from jlora.interop.peft_load import load_peft

__all__ = ["load_loralib", "load_peft", "save_loralib", "save_peft", "to_loralib"]

"""Flax models named like their Hugging Face counterparts (GPT-2, BERT, Llama) and their checkpoint readers."""

"""Variants of LoRA beyond the original: each in its own module."""

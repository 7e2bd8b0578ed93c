"""Helpers of the export tests (a unique module name: test folders are not packages)."""

from __future__ import annotations

import torch


def lora_model(arch: str = "llama", tokenizer=None, **overrides):
    """A tiny random ``arch`` with LoRA on every linear layer, B not zero (so merging matters)."""
    from peft import LoraConfig, get_peft_model

    from sloth_core.testing.models import init_tiny_model, tiny_config
    from sloth_core.testing.tokenizer import build_tokenizer

    tokenizer = tokenizer or build_tokenizer()
    base = init_tiny_model(tiny_config(arch, tokenizer=tokenizer, **overrides))
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, config).eval(), tokenizer


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


#: Token ids of a prompt longer than the tiny models' sliding windows (16).
PROMPT = [0, 5, 9, 77, 100, 3, 4, 200, 17, 301, 42, 8, 55, 120, 6, 99, 250, 11, 13, 400, 7]

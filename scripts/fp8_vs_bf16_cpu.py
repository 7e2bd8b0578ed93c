"""Does a LoRA fine-tune with FP8 base weights learn as the bf16 one does? A random-init
llama of the bench's make (bf16 weights, a tokenizer made on the spot), loaded as
``sloth bench train`` loads each system, trained on one fixed random batch, as the bench
does, from the same start: hf (transformers + PEFT, bf16), sloth bf16, sloth FP8, and sloth
FP8 with the input's gradient through the dequantized weight. Prints each run's first,
middle and last loss (CPU; with ``SLOTH_KERNELS=torch`` the op references, a few seconds a
step at the defaults).

    HF_HUB_OFFLINE=1 SLOTH_KERNELS=torch python scripts/fp8_vs_bf16_cpu.py [--layers 8]
        [--hidden 256] [--steps 20] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from sloth_fp8.linear import Fp8Linear
from transformers import LlamaConfig, LlamaForCausalLM

from sloth_core.bench.train import _load
from sloth_core.testing.tokenizer import build_tokenizer
from sloth_core.train.optim import default_adamw
from sloth_core.train.step import train_step

RUNS = [("hf", None, True), ("sloth", None, True), ("sloth", "fp8", True), ("sloth", "fp8", False)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=4096, max_position_embeddings=512,
    )  # fmt: skip
    ids = torch.randint(0, 4096, (4, 128), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as path:
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        build_tokenizer().save_pretrained(path)
        for system, quantization, fp8_backward in RUNS:
            Fp8Linear.fp8_backward = fp8_backward
            model, _ = _load(system, path, "cpu", quantization)
            model.train()
            optimizer = default_adamw([p for p in model.parameters() if p.requires_grad],
                                      lr=args.lr)  # fmt: skip
            rows = [{"input_ids": ids, "labels": ids}]
            losses = [float(train_step(model, optimizer, rows).loss) for _ in range(args.steps)]
            name = f"{system} {quantization or 'bf16'}"
            if quantization == "fp8" and not fp8_backward:
                name += " (input gradient through the dequantized weight)"
            print(f"{name}: losses {losses[0]:.4f} -> {losses[len(losses) // 2]:.4f} -> "
                  f"{losses[-1]:.4f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

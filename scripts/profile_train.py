"""Where a LoRA training step's device time goes, per system (GPU only).

    python3 scripts/profile_train.py MODEL_DIR [SEQ BATCH] > profile.txt

Loads the model as ``sloth bench train`` does (sloth, then hf), runs two warm-up steps
and profiles one, printing the kernels that take the most device time.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sloth_core.bench.train import _load


def step(model, optimizer, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    model_dir = Path(sys.argv[1])
    seq, batch = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (2048, 4)
    for system in ("sloth", "hf"):
        model, _ = _load(system, model_dir, "cuda")
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
        for _ in range(2):
            step(model, optimizer, ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(model, optimizer, ids)
            torch.cuda.synchronize()
        print(f"==== {system}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

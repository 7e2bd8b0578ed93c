"""GPU check of sloth_core.memory_plan: predicted vs measured device memory of one
training step (forward + backward, bf16, full fine-tuning, gradients allocated up front)
of a random llama-shaped model, per plan. Prints one JSON line per plan.

    python3 scripts/memory_plan_gpu.py [--hidden 2048 --layers 8 --seq 4096]
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sloth_core.memory_plan import (
    LayerMode,
    MemoryPlan,
    apply_plan,
    measure_layer_costs,
    plan_memory,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run, memory figures 0")
    args = ap.parse_args()
    h = args.hidden
    config = LlamaConfig(
        hidden_size=h,
        intermediate_size=h * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=h // 128,
        num_key_value_heads=max(h // 512, 1),
        vocab_size=args.vocab,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(args.device).train()
    ids = torch.randint(0, args.vocab, (1, args.seq), device=args.device)
    costs = measure_layer_costs(model, ids[:, : args.seq // 4])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    tokens = ids.numel()
    n = args.layers
    keep, rec, off = LayerMode.KEEP, LayerMode.RECOMPUTE, LayerMode.OFFLOAD
    plans = {
        "keep": (keep,) * n,
        "recompute": (rec,) * n,
        "offload": (off,) * n,
        "mixed": tuple((keep, rec, off)[i % 3] for i in range(n)),
    }
    full = MemoryPlan(plans["keep"], costs, tokens, 0, 0).predicted_peak_bytes
    lean = MemoryPlan(plans["offload"], costs, tokens, 0, 0).predicted_peak_bytes
    plans["budget-mid"] = plan_memory(costs, tokens, int((full + lean) / 2)).modes
    for name, modes in plans.items():
        plan = MemoryPlan(modes, costs, tokens, 0, 0)
        apply_plan(model, plan)
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated if cuda else lambda: 0
        base = allocated()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        held = allocated() - base
        loss.backward()
        del loss
        peak = (torch.cuda.max_memory_allocated() if cuda else 0) - base
        row = {
            "plan": name,
            "modes": "".join(m.value[0] for m in modes),
            "held_after_forward_measured": held,
            "held_after_forward_predicted": plan.held_after_forward_bytes,
            "peak_measured": peak,
            "peak_predicted": plan.predicted_peak_bytes,
            "peak_ratio": peak / plan.predicted_peak_bytes,
        }
        print(json.dumps(row), flush=True)
    print(json.dumps({"rest_per_token": costs.rest_bytes_per_token,
                      "transient_per_token": costs.transient_bytes_per_token,
                      "layer0": vars(costs[0])}))  # fmt: skip


if __name__ == "__main__":
    main()

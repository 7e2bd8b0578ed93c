"""GPU timing of sloth-fp8's ``Fp8Linear`` against a bf16 ``nn.Linear``, forward + the
input's gradient (the weight frozen, as under LoRA), at ``llama-8b``'s projection shapes:
the FP8 backward (``fp8_backward``) and the dequantizing one, the row quantization
compiled (the default) and eager (``SLOTH_FP8_COMPILE=0``). Median of CUDA-event-timed
repeats; prints one JSON line per shape and a summary line.

    python3 scripts/fp8_linear_gpu.py [--tokens 8192 --repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from sloth_fp8.linear import Fp8Linear

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336),
          "down_proj": (14336, 4096)}  # fmt: skip


def _time(layer: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    grad = torch.randn_like(layer(x))
    times = []
    for i in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        layer(x).backward(grad)
        end.record()
        torch.cuda.synchronize()
        x.grad = None
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    total = {"bf16": 0.0, "fp8_dequant_grad": 0.0, "fp8": 0.0, "fp8_eager": 0.0}
    for name, (k, n) in SHAPES.items():
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        linear.weight.requires_grad_(False)
        fp8 = Fp8Linear(linear)
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        row = {"shape": name, "tokens": args.tokens, "in": k, "out": n,
               "bf16_ms": _time(linear, x, args.repeats)}  # fmt: skip
        fp8.fp8_backward = False
        row["fp8_dequant_grad_ms"] = _time(fp8, x, args.repeats)
        fp8.fp8_backward = True
        row["fp8_ms"] = _time(fp8, x, args.repeats)
        os.environ["SLOTH_FP8_COMPILE"] = "0"
        row["fp8_eager_ms"] = _time(fp8, x, args.repeats)
        del os.environ["SLOTH_FP8_COMPILE"]
        for key in total:
            total[key] += row[f"{key}_ms"]
        print(json.dumps(row))
    print(json.dumps({"summary": "sum over shapes, ms", **total,
                      "fp8_speedup": total["bf16"] / total["fp8"],
                      "fp8_dequant_grad_speedup": total["bf16"] / total["fp8_dequant_grad"],
                      "device": torch.cuda.get_device_name()}))  # fmt: skip


if __name__ == "__main__":
    main()

"""Host time per call of the launches a host-bound LoRA step is made of (llama-1b's: about
2,300 aten launches and 250 Triton ones a step), measured on a GPU kept busy so that no
call waits for it: an aten op, a cast, a cuBLAS GEMM, sloth's Triton kernels (RMSNorm,
RoPE, SwiGLU) and an autograd Function. Tells whether a Triton launch costs the host more
than an aten one, and so which launches are worth cutting first. Prints one JSON line.

    python3 scripts/launch_overhead_gpu.py [--calls 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from sloth_kernels.activations import swiglu_forward
from sloth_kernels.norms import rms_norm
from sloth_kernels.rope import rope


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _host_us(call: Callable[[], object], calls: int) -> float:
    """Median host microseconds per call over five rounds, the GPU busy throughout."""
    rounds = []
    for _ in range(5):
        torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU work queued ahead: no call waits
        start = time.perf_counter()
        for _ in range(calls):
            call()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    x = torch.randn(64, 2048, device=dev, dtype=bf16)
    x32 = torch.randn(16, 2048, device=dev)
    w = torch.randn(2048, 64, device=dev, dtype=bf16)
    norm_w = torch.ones(2048, device=dev, dtype=bf16)
    q = torch.randn(1, 32, 64, 64, device=dev, dtype=bf16)
    k = torch.randn(1, 8, 64, 64, device=dev, dtype=bf16)
    cos = torch.randn(1, 64, 64, device=dev, dtype=bf16)
    sin = torch.randn(1, 64, 64, device=dev, dtype=bf16)
    gate, up = (
        torch.randn(64, 8192, device=dev, dtype=bf16),
        torch.randn(64, 8192, device=dev, dtype=bf16),
    )
    x_grad = x.clone().requires_grad_()
    cases: dict[str, Callable[[], object]] = {
        "aten add": lambda: torch.add(x, x),
        "aten cast fp32->bf16": lambda: x32.to(bf16),
        "cuBLAS mm": lambda: torch.mm(x, w),
        "cuBLAS addmm_ alpha": lambda: torch.empty(64, 64, device=dev, dtype=bf16).addmm_(
            x, w, beta=0, alpha=0.5
        ),
        "triton rms_norm (no grad)": lambda: rms_norm(x, norm_w, 1e-5),
        "triton rope": lambda: rope(q, k, cos, sin),
        "triton swiglu forward": lambda: swiglu_forward(gate, up),
        "autograd Function apply": lambda: _Identity.apply(x_grad),
    }
    with torch.no_grad():
        for call in cases.values():  # compile and warm every path first
            call()
    torch.cuda.synchronize()
    result = {}
    for name, call in cases.items():
        grad = name.startswith("autograd")
        with torch.set_grad_enabled(grad):
            result[name] = round(_host_us(call, args.calls), 2)
    print(json.dumps({"device": torch.cuda.get_device_name(), "host_us_per_call": result}))


if __name__ == "__main__":
    main()

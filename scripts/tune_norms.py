"""Time rms_norm / layer_norm forward and backward for launch-parameter variants (GPU).

    python3 scripts/tune_norms.py            # prints a table: variant, fwd ms, bwd ms, % bw

Kept in the repository as the script behind the launch constants of sloth_kernels.norms.
"""

from __future__ import annotations

import itertools

import torch

from sloth_core.bench.timing import copy_bandwidth, measure
from sloth_kernels import norms


def main() -> None:
    device = "cuda"
    bw = copy_bandwidth(device)
    print(f"copy bandwidth {bw:.0f} GB/s")
    n, d = 8192, 4096
    x = torch.randn(n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(d, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(d, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    size = x.numel() * 2
    print(f"{'op':<10} {'fwd_tile':>8} {'bwd_tile':>8} {'per_sm':>6} {'fwd ms':>8} {'bwd ms':>8} "
          f"{'fwd %bw':>7} {'bwd %bw':>7}")  # fmt: skip
    for op, fwd_tile, bwd_tile, per_sm in itertools.product(
        ("rms", "ln"), (4096, 8192), (4096, 8192, 16384), (1, 2, 4)
    ):
        norms._FORWARD_TILE, norms._BACKWARD_TILE, norms._PROGRAMS_PER_SM = fwd_tile, bwd_tile, per_sm
        if op == "rms":
            forward = lambda: norms.rms_norm(x, w, 1e-6)  # noqa: E731
        else:
            forward = lambda: norms.layer_norm(x, w, b, 1e-5)  # noqa: E731
        y = forward()
        fwd = measure(forward, device, runs=20).median_ms
        bwd = measure(lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True), device,
                      runs=20).median_ms  # fmt: skip
        fwd_pct = 2 * size / (fwd * 1e-3) / 1e9 / bw * 100
        bwd_pct = 3 * size / (bwd * 1e-3) / 1e9 / bw * 100
        print(f"{op:<10} {fwd_tile:>8} {bwd_tile:>8} {per_sm:>6} {fwd:>8.4f} {bwd:>8.4f} "
              f"{fwd_pct:>7.0f} {bwd_pct:>7.0f}")  # fmt: skip


if __name__ == "__main__":
    main()

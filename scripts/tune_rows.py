"""Device time of the row kernels' forward and backward, per launch variant (GPU only).

    python3 scripts/tune_rows.py

Times CUDA-graph replays (no host overhead) at 8192 tokens x 4096 hidden (norms) and
8192 tokens x 32/8 heads x 128 (rope), bf16, and prints the fraction of the measured copy
bandwidth each reaches for the bytes it must move. The script behind the launch
constants of sloth_kernels.norms and sloth_kernels.rope.
"""

from __future__ import annotations

import itertools

import torch

from sloth_core.bench.timing import copy_bandwidth, measure
from sloth_kernels import norms, rope
from sloth_kernels._utils import next_power_of_2


def timed(fn) -> float:
    return measure(fn, "cuda", runs=30, graph=True).median_ms


def main() -> None:
    bw = copy_bandwidth("cuda")
    print(f"copy bandwidth {bw:.0f} GB/s")

    def pct(nbytes, ms):
        return nbytes / (ms * 1e-3) / 1e9 / bw * 100

    n, d = 8192, 4096
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(n, d, **bf16, requires_grad=True)
    w = torch.randn(d, **bf16, requires_grad=True)
    b = torch.randn(d, **bf16, requires_grad=True)
    dy = torch.randn(n, d, **bf16)
    size = x.numel() * 2
    print(f"{'kernel':<10} {'tile':>6} {'per_sm':>6} {'warps':>5} {'fwd ms':>8} {'bwd ms':>8} "
          f"{'fwd%':>5} {'bwd%':>5} {'total%':>6}")  # fmt: skip
    original_tile = norms._tile
    for op, tile, per_sm, warps in itertools.product(
        ("rms", "ln"), (2048, 4096, 8192), (1, 2, 3), (4, 8, 16)
    ):
        def tile_fn(n_rows, n_cols, t, warps=warps):
            block_m, block_n, _ = original_tile(n_rows, n_cols, t)
            return block_m, block_n, warps

        norms._tile, norms._BACKWARD_TILE, norms._PROGRAMS_PER_SM = tile_fn, tile, per_sm
        if op == "rms":
            forward = lambda: norms.rms_norm(x, w, 1e-6)  # noqa: E731
        else:
            forward = lambda: norms.layer_norm(x, w, b, 1e-5)  # noqa: E731
        try:
            fwd = timed(forward)
            y = forward()
            bwd = timed(lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True))
        except Exception as exc:  # a variant that does not compile (registers): skip it
            print(f"{op:<10} {tile:>6} {per_sm:>6} {warps:>5} failed: {type(exc).__name__}")
            continue
        print(f"{op:<10} {tile:>6} {per_sm:>6} {warps:>5} {fwd:>8.4f} {bwd:>8.4f} "
              f"{pct(2 * size, fwd):>5.0f} {pct(3 * size, bwd):>5.0f} "
              f"{pct(5 * size, fwd + bwd):>6.0f}")  # fmt: skip
    norms._tile = original_tile

    q = torch.randn(1, 32, n, 128, **bf16).transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.randn(1, 8, n, 128, **bf16).transpose(1, 2).contiguous().transpose(1, 2)
    q.requires_grad_(True)
    k.requires_grad_(True)
    angles = torch.arange(n, device="cuda")[:, None] * torch.rand(64, device="cuda")
    emb = torch.cat([angles, angles], -1)[None]
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    qk = (q.numel() + k.numel()) * 2
    for tile, warps in itertools.product((512, 1024, 2048, 4096), (2, 4, 8)):
        rope._TILE, rope._NUM_WARPS = tile, warps
        fwd = timed(lambda: rope.rope(q, k, cos, sin))
        out = rope.rope(q, k, cos, sin)
        bwd = timed(lambda: torch.autograd.grad(out, (q, k), (dq, dk), retain_graph=True))
        print(f"{'rope':<10} {tile:>6} {'-':>6} {warps:>5} {fwd:>8.4f} {bwd:>8.4f} "
              f"{pct(2 * qk, fwd):>5.0f} {pct(2 * qk, bwd):>5.0f} {pct(4 * qk, fwd + bwd):>6.0f}")
    print("next_power_of_2 check", next_power_of_2(4096))


if __name__ == "__main__":
    main()

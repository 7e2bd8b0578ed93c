"""The gated kernels with the gate/up adapters added in them (``sloth_kernels.gated_lora``),
timed per launch (``SLOTH_GATED_LORA_TILE``) at a llama-8b MLP's shape, against what they
replace: the two ``addmm_`` of the thin products over the FP8 GEMMs' outputs, then the
plain gated kernels (GPU only).

    python3 scripts/gated_lora_tiles_gpu.py [--rows 8192] [--inter 14336] [--rank 16]
                                            [--json FILE]

Prints a line per launch (forward and backward, ms: medians of CUDA-event timings) and
last ``BEST=BM,BN,WARPS,DOT``: the launch with the least forward-twice-plus-backward time,
as a training step with a checkpoint's recompute runs them (the forward, then ``h`` again
in row chunks for down's adapter, then the backward).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from sloth_kernels.activations import swiglu_backward, swiglu_forward
from sloth_kernels.gated_lora import (
    TILE_ENV,
    Addend,
    Addends,
    gated_lora_backward_inplace,
    gated_lora_forward,
)
from triton.testing import do_bench

LAUNCHES = [
    "32,128,4,1", "32,128,4,0", "16,256,4,0", "16,128,4,0", "64,64,4,0", "64,128,8,0",
    "32,256,8,0", "64,128,4,1", "64,256,8,1",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--inter", type=int, default=14336)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n, inter, r = args.rows, args.inter, args.rank
    kw = {"device": "cuda", "dtype": torch.bfloat16}
    gate, up = torch.randn(n, inter, **kw), torch.randn(n, inter, **kw)
    xa = torch.randn(n, 2 * r, **kw)
    bg, bu = torch.randn(inter, r, **kw) * 0.1, torch.randn(inter, r, **kw) * 0.1
    addends = Addends(xa, Addend(0, r, bg, 2.0), Addend(r, r, bu, 2.0))
    grad = torch.randn(n, inter, **kw)
    g2, u2 = gate.clone(), up.clone()

    def before_forward():  # the adapters by addmm_ over the outputs, then the gated kernel
        g2.addmm_(xa[:, :r], bg.t(), alpha=2.0)
        u2.addmm_(xa[:, r:], bu.t(), alpha=2.0)
        return swiglu_forward(g2, u2)

    results = [
        {
            "launch": "addmm_ x2 + swiglu (before)",
            "forward_ms": do_bench(before_forward, warmup=10, rep=50),
            "backward_ms": do_bench(lambda: swiglu_backward(grad, g2, u2, inplace=True)),
        }
    ]
    for launch in LAUNCHES:
        os.environ[TILE_ENV] = launch
        fwd = do_bench(lambda: gated_lora_forward(gate, up, addends), warmup=10, rep=50)
        bwd = do_bench(lambda: gated_lora_backward_inplace(grad, g2, u2, addends))
        results.append({"launch": launch, "forward_ms": fwd, "backward_ms": bwd})
    os.environ.pop(TILE_ENV)
    for row in results:
        row["step_ms"] = 2 * row["forward_ms"] + row["backward_ms"]
        print(json.dumps(row))
    best = min(results[1:], key=lambda row: row["step_ms"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": n, "inter": inter, "rank": r, "results": results}, f, indent=1)
    print(f"BEST={best['launch']}")


if __name__ == "__main__":
    main()

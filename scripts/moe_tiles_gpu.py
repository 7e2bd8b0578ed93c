"""The grouped-GEMM MoE experts' tiles and operand precision on the GPU (one layer of a
qwen3-30b-a3b-sized model, LoRA r=16 on every expert, forward + backward).

    python3 scripts/moe_tiles_gpu.py [--tokens 4096] [--json OUT.json]

Times ``sloth_kernels.moe.moe_experts`` for each ``(rows, cols, depth, warps, stages)``
tile, with 16-bit operands going to the tensor cores as they are (the kernels' default
on the GPU) and, for the first tile, converted to fp32 (tf32 dots: the precision the
kernels had before); and with the base products through ``torch._grouped_mm``
(``SLOTH_MOE_GEMM=grouped_mm``), the kernels doing the rest after it. Every variant's
output and gradients are compared with the first one's; the per-kernel device times of
each come from the profiler. ``torch._grouped_mm`` on the base products (no LoRA, no
gather) gives a floor for the GEMMs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from sloth_kernels import moe

from sloth_core.ops.reference import ExpertLinear, moe_route

TILES = [  # the likeliest first: a call stopped by its time limit still printed those
    (64, 64, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 3),
    (128, 128, 64, 4, 3),
    (128, 64, 64, 4, 3),
    (64, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 128, 32, 4, 4),
]


def problem(tokens: int, hidden=2048, inter=768, experts=128, top_k=8, rank=16, dev="cuda"):
    bf16 = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale=1.0, dtype=bf16, grad=False):
        t = (torch.randn(*shape, generator=gen, device=dev) * scale).to(dtype)
        return t.requires_grad_(grad)

    def layer(out_f, in_f):
        # The adapters in fp32, as PEFT keeps them beside bf16 weights.
        return ExpertLinear(
            weight=rand(experts, out_f, in_f, scale=in_f**-0.5),
            lora_A=rand(experts, rank, in_f, scale=in_f**-0.5, dtype=torch.float32, grad=True),
            lora_B=rand(experts, out_f, rank, scale=0.01, dtype=torch.float32, grad=True),
            scaling=1.0,
        )

    x = rand(tokens, hidden, grad=True)
    weights, index = moe_route(torch.randn(tokens, experts, generator=gen, device=dev), top_k,
                               normalize=True)  # fmt: skip
    weights = weights.detach().requires_grad_()
    gate_up, down = layer(2 * inter, hidden), layer(hidden, inter)
    dy = rand(tokens, hidden)
    leaves = [x, weights, gate_up.lora_A, gate_up.lora_B, down.lora_A, down.lora_B]
    return x, index, weights, gate_up, down, dy, leaves


def step(p):
    x, index, weights, gate_up, down, dy, leaves = p
    for t in leaves:
        t.grad = None
    out = moe.moe_experts(x, index, weights, gate_up, down)
    out.backward(dy)
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def timed(fn, iters=10):
    if not torch.cuda.is_available():
        fn()
        return 0.0
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_times(fn):
    """Device ms per kernel name of one call."""
    if not torch.cuda.is_available():
        return {}
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total:
            out[event.key[:60]] = out.get(event.key[:60], 0.0) + event.self_device_time_total / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])


def grouped_mm_floor(p) -> float | None:
    """ms of the base products of a training step's layer (forward, its recompute, dH' and
    dX) through torch._grouped_mm: sorted rows, no LoRA, no activation."""
    x, index, _, gate_up, down, _, _ = p
    if not hasattr(torch, "_grouped_mm") or not torch.cuda.is_available():
        return None
    flat = index.reshape(-1)
    _, order = torch.sort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.weight.shape[0]), 0).to(torch.int32)
    rows = x.detach()[order // index.shape[1]]
    w1, w2 = gate_up.weight.transpose(1, 2), down.weight.transpose(1, 2)
    inter = down.weight.shape[2]

    w1_back, w2_back = gate_up.weight, down.weight  # [E, 2I, H], [E, H, I]
    grad_rows = torch.randn(rows.shape, device=rows.device, dtype=rows.dtype)

    def run():  # forward twice (the recompute), then dH' and dX
        for _ in range(2):
            gu = torch._grouped_mm(rows, w1, offs=offs)
            torch._grouped_mm(gu[:, :inter].contiguous(), w2, offs=offs)
        dh = torch._grouped_mm(grad_rows, w2_back, offs=offs)
        torch._grouped_mm(torch.cat([dh, dh], 1), w1_back, offs=offs)

    try:
        return timed(run)
    except Exception as exc:  # a build without it for this dtype or device
        print(f"torch._grouped_mm: {type(exc).__name__}: {exc}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--json")
    # A dry run of the script itself on the CPU (TRITON_INTERPRET=1): tiny sizes.
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        global TILES
        TILES = [(16, 16, 16, 4, 1)]
        p = problem(8, hidden=32, inter=16, experts=4, top_k=2, rank=4, dev="cpu")
    else:
        p = problem(args.tokens)
    real_lowp = moe._lowp
    variants = [("fp32 operands (tf32)", TILES[0], False, "triton")]
    # torch's grouped GEMM (CUTLASS) for the base products, the kernels after it.
    variants += [("grouped_mm + epilogues", tile, True, "grouped_mm") for tile in TILES[:3]]
    variants += [("16-bit operands", tile, True, "triton") for tile in TILES]
    results, reference = [], None
    for name, tile, lowp, gemm in variants:
        moe.GPU_BLOCKS = tile
        moe._lowp = real_lowp if lowp else (lambda *t: False)
        os.environ["SLOTH_MOE_GEMM"] = gemm
        try:
            got = step(p)
            if reference is None:
                reference = got
            err = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
                      for g, r in zip(got, reference, strict=True))  # fmt: skip
            ms = timed(lambda: step(p))
            kernels = kernel_times(lambda: step(p))
            row = dict(variant=name, tile=tile, ms=ms, max_rel_err_vs_first=err, kernels=kernels)
        except Exception as exc:  # a tile too large for the shared memory, say
            row = dict(variant=name, tile=tile, error=f"{type(exc).__name__}: {exc}"[:300])
        results.append(row)
        print(json.dumps(row), flush=True)
    moe._lowp = real_lowp
    os.environ.pop("SLOTH_MOE_GEMM")
    floor = grouped_mm_floor(p)
    print(f"torch._grouped_mm, the base products of fwd + recompute + dH' + dX: {floor} ms")
    best = min((r for r in results if "ms" in r), key=lambda r: r["ms"])
    print(f"best: {best['variant']} {best['tile']} {best['ms']:.2f} ms "
          f"(first: {results[0].get('ms')} ms)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            json.dump(dict(device=device, torch=torch.__version__,
                           tokens=args.tokens, results=results, grouped_mm_ms=floor), f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()

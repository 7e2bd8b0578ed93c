"""Device time of the row kernels (norms, rope) per launch variant, on a GPU.

    python3 scripts/tune_rows.py

Each variant runs the same case as ``sloth bench kernels`` (forward + backward, CUDA-graph
replays, 8192 tokens x 4096 hidden, bf16) and prints the fraction of the measured copy
bandwidth it reaches for the bytes it must move. The launch constants of
``sloth_kernels.norms`` and ``sloth_kernels.rope`` are chosen with it.
"""

from __future__ import annotations

import gc
import itertools

import torch
from sloth_kernels import norms, rope

from sloth_core.bench.kernel_cases import Shapes, layer_norm_case, rms_norm_case, rope_case
from sloth_core.bench.timing import copy_bandwidth, measure


def run_variant(build, fn, bw: float) -> str:
    case = build()
    try:
        ms = measure(lambda case=case: case.run(fn), "cuda", runs=20, graph=True).median_ms
        return f"{ms:8.4f} ms {case.min_bytes / (ms * 1e-3) / 1e9 / bw * 100:5.0f}% bw"
    except Exception as exc:  # a variant that does not compile or fit: report, go on
        return f"failed: {type(exc).__name__}"
    finally:
        del case
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    bw = copy_bandwidth("cuda")
    print(f"copy bandwidth {bw:.0f} GB/s")
    shapes = Shapes()
    for tile, per_sm in itertools.product((2048, 4096, 8192), (1, 2, 3)):
        norms._BACKWARD_TILE, norms._PROGRAMS_PER_SM = tile, per_sm
        for name, build, fn in (
            ("rms_norm", lambda: rms_norm_case(shapes), norms.rms_norm),
            ("layer_norm", lambda: layer_norm_case(shapes), norms.layer_norm),
        ):
            result = run_variant(build, fn, bw)
            print(f"{name:<10} backward tile {tile:>5} programs/SM {per_sm}: {result}")
    for tile, warps in itertools.product((512, 1024, 2048), (2, 4, 8)):
        rope._TILE, rope._NUM_WARPS = tile, warps
        result = run_variant(lambda: rope_case(shapes), rope.rope, bw)
        print(f"rope       tile {tile:>5} warps {warps}: {result}")


if __name__ == "__main__":
    main()

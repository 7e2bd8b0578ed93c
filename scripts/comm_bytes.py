"""The numbers of docs/scaling.md: parameters, memory per GPU, bytes each GPU sends per
optimizer step and the step times they imply, for LoRA (DDP) and full fine-tuning (FSDP2)
of the llama-3 8B and 70B shapes on N GPUs. A model, not a measurement:

    python3 scripts/comm_bytes.py --gpus 2,8,16,32

Collectives are rings: all-reduce sends 2(N-1)/N x S bytes per GPU, all-gather and
reduce-scatter (N-1)/N x S, at NCCL's bus bandwidth (``--nvlink``, ``--nic``, ``--nics``).
The compute time per GPU is the measured 2-GPU step of docs/bench-train-llama-8b-*.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
GIB, GB = 2**30, 1e9
FSDP = "bench-train-llama-8b-fsdp-2gpu-h200.json"
H200_GIB = 139  # what CUDA can use of an H200 (an H100: about 78)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit + 8-bit absmax / 64 + fp32 / 256 blocks


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of q, k, v, o, gate, up, down: one decoder layer's linear modules."""
        h, kv, i = self.hidden, self.hidden // self.heads * self.kv_heads, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def layer_params(self) -> int:  # the linears and two RMSNorm weights
        return sum(a * b for a, b in self.linears()) + 2 * self.hidden

    def root_params(self) -> int:  # embeddings + untied lm_head + final norm: FSDP2's root
        return 2 * self.vocab * self.hidden + self.hidden

    def linear_params(self) -> int:  # every decoder layer's linears
        return self.layers * sum(a * b for a, b in self.linears())

    def base_params(self) -> int:  # what 6 x N_base counts: the linears and lm_head
        return self.linear_params() + self.vocab * self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def lora_params(self, r: int) -> int:  # A (r x in) and B (out x r) on every linear
        return self.layers * sum(r * (a + b) for a, b in self.linears())


SHAPES = {
    "8B": Shape(4096, 32, 14336, 32, 8, 128256),
    "70B": Shape(8192, 80, 28672, 64, 8, 128256),
}
L8B, L70B = SHAPES["8B"], SHAPES["70B"]


def memory(shape: Shape, mode: str, n: int, r: int = 16) -> float:
    """Bytes per GPU before activations. LoRA/QLoRA replicate the base; adapters are fp32
    with grads and two AdamW moments (16 B). FSDP2: 16 B a weight over N, plus the root
    gathered (bf16) with its bf16 grads, two gathered layers (one prefetched) and one
    layer's unsharded grads (bf16, then fp32 for the reduce-scatter)."""
    adapters = 16 * shape.lora_params(r)
    if mode == "lora":
        return 2 * shape.params() + adapters
    if mode == "qlora":  # NF4 linears (double quant); embeddings and lm_head stay bf16
        linears = shape.linear_params()
        return NF4_BYTES * linears + 2 * (shape.params() - linears) + adapters
    layer = shape.layer_params()
    return 16 * shape.params() / n + 4 * shape.root_params() + (2 * 2 + 6) * layer


def comm(shape: Shape, mode: str, n: int, r: int = 16) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step (FSDP2: per micro-batch)."""
    f = (n - 1) / n
    if mode == "lora":  # one all-reduce of the fp32 adapter grads
        return {"all-reduce": 2 * f * 4 * shape.lora_params(r)}
    layers = shape.layers * shape.layer_params()
    return {  # layers gathered for forward and again for backward; the root once
        "all-gather": f * 2 * (2 * layers + shape.root_params()),
        "reduce-scatter": f * 4 * shape.params(),
    }


def bus_bandwidth(n: int, args: argparse.Namespace, nics: int = 0) -> float:
    """GB/s: NVLink within a node; across nodes a ring is bound by the node's NICs."""
    return args.nvlink if n <= args.per_node else min(args.nvlink, (nics or args.nics) * args.nic)


def seconds(shape: Shape, mode: str, n: int, args: argparse.Namespace, nics: int = 0) -> float:
    return sum(comm(shape, mode, n).values()) / GB / bus_bandwidth(n, args, nics)


def measured(name: str) -> tuple[float, int]:
    """(median step s, tokens per GPU a step) of the 2-process run in ``name``."""
    data = json.loads((DOCS / name).read_text())
    step = next(r["median_step_s"] for r in data["results"] if r["nproc"] == 2)
    return step, data["seq"] * data["batch"]


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default="2,8,16,32", help="world sizes, comma-separated")
    parser.add_argument("--per-node", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nvlink", type=float, default=370.0, help="NVLink bus GB/s")
    parser.add_argument("--nic", type=float, default=46.0, help="GB/s of one 400 Gb/s NIC")
    parser.add_argument("--nics", type=int, default=8, help="NICs per node")
    args = parser.parse_args()
    gpus = [int(n) for n in args.gpus.split(",")]
    cols = [f"N={n}" for n in gpus]

    print("## Parameters\n")
    print(table(["shape", "all", "per layer", "root", "LoRA r=16"], [
        [s, f"{v.params():,}", f"{v.layer_params():,}", f"{v.root_params():,}",
         f"{v.lora_params(16):,}"] for s, v in SHAPES.items()]))  # fmt: skip
    print()
    for label, size in (
        ("Checkpointed layer inputs (bf16), KiB per token",
         lambda v: v.hidden * 2 * v.layers / 2**10),
        ("A checkpoint (fp32 weights, 2 AdamW moments; before sharded saving, on rank 0's CPU), GB",
         lambda v: 12 * v.params() / GB),
        ("One GPU at load before sharded loading (the whole model in fp32), GiB",
         lambda v: 4 * v.params() / GIB),
    ):  # fmt: skip
        print(f"{label}: " + ", ".join(f"{s} {size(v):.1f}" for s, v in SHAPES.items()))

    print("\n## Memory per GPU before activations, GiB\n")
    print(table(["shape", "mode", *cols], [
        [s, m, *(f"{memory(v, m, n) / GIB:.1f}" for n in gpus)]
        for s, v in SHAPES.items() for m in ("lora", "qlora", "full")]))  # fmt: skip

    print("\n## Bytes sent per GPU per step, GB, and their time at the bus bandwidth\n")
    rows = [["bus GB/s", "", *(f"{bus_bandwidth(n, args):.0f}" for n in gpus)]]
    for s, v in SHAPES.items():
        for mode in ("lora", "full"):
            rows += [[s, f"{mode} {what}", *(f"{comm(v, mode, n)[what] / GB:.2f}" for n in gpus)]
                     for what in comm(v, mode, 2)]  # fmt: skip
            rows += [[s, f"{mode} {label}", *(f"{seconds(v, mode, n, args, nics) * 1e3:.1f}"
                                              for n in gpus)]
                     for nics, label in ((0, "ms"), (1, "ms, 1 NIC a node"))]  # fmt: skip
    print(table(["shape", "bytes", *cols], rows))

    print("\n## 8B tokens/s: communication hidden / not hidden (added to the 2-GPU step)\n")
    rows = []
    for mode, name in (("lora", "bench-train-llama-8b-2gpu-h200.json"), ("full", FSDP)):
        step, tokens = measured(name)
        rows.append([mode, f"{step:.3f}", *(
            f"{n * tokens / max(step, t):,.0f} / {n * tokens / (step + t):,.0f}"
            for n, t in ((n, seconds(L8B, mode, n, args)) for n in gpus))])  # fmt: skip
    print(table(["mode", "2-GPU step s", *cols], rows))
    ratio = L70B.base_params() / L8B.base_params()
    step, tokens = measured(FSDP)
    print(f"\n70B full fine-tuning, compute per token 6 x linear weights (attention aside): "
          f"{ratio:.2f}x 8B's, {ratio * step:.1f} s a micro-batch at its 2-GPU MFU; tokens/s "
          "if communication hides, where the state fits an H200 (139 GiB): " + ", ".join(
              f"N={n} {n * tokens / max(ratio * step, seconds(L70B, 'full', n, args)):,.0f}"
              for n in gpus if memory(L70B, "full", n) / GIB < H200_GIB))  # fmt: skip


if __name__ == "__main__":
    main()

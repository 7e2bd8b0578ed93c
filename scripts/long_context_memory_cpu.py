"""Peak memory of one LoRA step at long sequences on the CPU, MLP tiles on and off.

A proxy for the GPU's max-context row (`sloth bench train --targets context-nf4`) that the
CPU can run: a llama of the 8B's proportions shrunk (intermediate 3.5 x hidden, GQA 4:1,
head_dim 64; a vocabulary of 512, as the GPU's chunked loss keeps the logits out of the
peak, which the reference loss here does not), sloth's patched layers through the
reference ops, offloaded checkpointing (on the CPU the "host" copies share the memory),
and the step's peak of the bytes malloc has handed out, sampled after every op, above
what was allocated before the step; each configuration in a fresh process. Prints one
JSON line a run.

    python scripts/long_context_memory_cpu.py --seq 4096 8192 16384
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def _allocated() -> int:
    """Bytes glibc's malloc has handed out now: its heap's and its mmapped blocks'."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _peak_during(step) -> int:
    """The most bytes allocated after any op of ``step()`` (forward and backward: on the
    CPU autograd runs the backward's ops on this thread), above what was before it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    base = _allocated()
    peak = [base]

    class Sample(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            peak[0] = max(peak[0], _allocated())
            return out

    with Sample():
        step()
    return peak[0] - base


def _one(seq: int, tiles: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as m

    from sloth_core.checkpointing import enable_checkpointing
    from sloth_core.ops import default_registry
    from sloth_core.patches import patch_architecture, register_sloth_attention, tiled_mlp
    from sloth_core.testing import init_tiny_model

    register_sloth_attention()
    config = LlamaConfig(
        hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, vocab_size=512, max_position_embeddings=seq,
        tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "sloth_attention"
    model = init_tiny_model(config, seed=0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    patch_architecture(model, default_registry(), plugin="bench", model_types="llama",
                       mlp=m.LlamaMLP, rms_norm=m.LlamaRMSNorm)  # fmt: skip
    enable_checkpointing(model, offload=True)
    model.train()
    # 1024-row tiles on this model (its MLP rows are 4 B x 896 x 3 = 10.5 KiB), as an 8B
    # model's 12,483-row tiles hold 1 GiB; off: one tile longer than any sequence here
    tiled_mlp._MIN_ROWS = 1
    tiled_mlp.MLP_TILE_BYTES = 3 * 896 * 4 * (1024 if tiles else 10**9)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())

    start = time.perf_counter()
    growth = _peak_during(step)
    seconds = time.perf_counter() - start
    return {"seq": seq, "tiles": tiles, "peak_bytes": growth,
            "bytes_per_token": round(growth / seq), "step_s": round(seconds, 2),
            "loss": round(losses[0], 4)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--one", nargs=2, metavar=("SEQ", "TILES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(int(args.one[0]), args.one[1] == "1")))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for seq in args.seq:
        for tiles in (False, True):
            command = [sys.executable, __file__, "--one", str(seq), str(int(tiles))]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()

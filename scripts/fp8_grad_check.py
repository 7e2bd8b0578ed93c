"""Where do FP8 base weights' LoRA gradients part from exact ones? One batch through a
random-init llama (the bench's make, llama-8b's widths, a few layers), LoRA adapters with
random ``A`` and ``B`` (so every gradient flows), the loss and every adapter's gradient
compared with an exact reference: transformers + PEFT in float32 on the same weights, each
base weight rounded through e4m3 as sloth-fp8 stores it. Beside it, the bf16 reference
and sloth bf16 on those weights (how far bf16 alone goes), then sloth FP8 with each of
its parts switched off in turn: the input's gradient in FP8, the gated kernels' LoRA, the
compiled quantizations, every FP8 product (the dequantized weight instead). A part whose
switch brings the error down to bf16's is where FP8 training loses.

Any sloth bf16 run against the same reference too (``--runs``): its checkpointing modes,
the kept attention on or off, its copies as device clones or synchronized. That is how
session 23 found the kept attention's wrong gradients on CUDA (docs/benchmarks.md).

    HF_HUB_OFFLINE=1 python scripts/fp8_grad_check.py [--layers 4] [--hidden 4096]
        [--intermediate 14336] [--vocab 128256] [--seq 2048] [--batch 2] [--device cuda]
        [--runs hf,sloth,sloth-kept,sloth-kept-probe,sloth:off,fp8] [--repeats 2] [--by-layer]

Prints a markdown table: per run the loss, and against the float32 reference the
gradients' cosine and relative error, overall and per projection (the worst layer).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from sloth_fp8 import linear as fp8
from transformers import LlamaConfig, LlamaForCausalLM

from sloth_core.bench.train import _load
from sloth_core.patches import kept_attention
from sloth_core.testing.tokenizer import build_tokenizer

KEY = re.compile(r"layers\.(\d+)\..*?(\w+_proj)\.lora_([AB])")
FP8_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("sloth fp8", {}),
    ("sloth fp8, input gradient through the dequantized weight", {"backward": False}),
    ("sloth fp8, gated kernels without LoRA (SLOTH_GATED_LORA=0)",
     {"env": {"SLOTH_GATED_LORA": "0"}}),
    ("sloth fp8, quantizations not compiled (SLOTH_FP8_COMPILE=0)",
     {"env": {"SLOTH_FP8_COMPILE": "0"}}),
    ("sloth fp8, every product through the dequantized weight",
     {"backward": False, "products": False}),
]  # fmt: skip
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def switched(env: dict[str, str] | None = None, backward: bool = True,
             products: bool = True) -> Iterator[None]:  # fmt: skip
    """sloth-fp8 with some of its parts off: environment switches read at call time, the
    input's gradient through the dequantized weight, every product through it."""
    saved_takes, saved_backward = fp8._takes, fp8.Fp8Linear.fp8_backward
    fp8.Fp8Linear.fp8_backward = backward
    if not products:
        fp8._takes = lambda *args: False  # type: ignore[assignment]
    try:
        with mock.patch.dict(os.environ, env or {}):
            yield
    finally:
        fp8._takes, fp8.Fp8Linear.fp8_backward = saved_takes, saved_backward


#: What ``-probe`` found: per kept call, the kept output's relative distance to the
#: attention the recompute's own q, k and v give (0 where the kept path is consistent).
PROBED: list[float] = []


def _probing_forward(ctx, q, k, v, out, lse, name, backward, fallback, layouts=None):
    """``_Replay.forward`` that also measures the kept output against the attention of
    the q, k and v it is handed (``-probe``)."""
    with torch.no_grad():
        fresh = fallback(q, k, v).float()
        PROBED.append(float((out.float() - fresh).norm() / fresh.norm()))
    return _REPLAY_FORWARD(ctx, q, k, v, out, lse, name, backward, fallback, layouts)


def _autograd_backward(ctx, dout):
    """``_Replay.backward`` through the attention again with autograd, on the recompute's
    q, k and v (``-autograd``): the kernel's backward and the kept output and
    log-sum-exp left out."""
    q, k, v, _, _ = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(ctx.fallback(*inputs), inputs, dout)
    return (*grads, None, None, None, None, None, None)


_REPLAY_FORWARD = kept_attention._Replay.forward


@contextlib.contextmanager
def kept_options(options: list[str]) -> Iterator[None]:
    """The kept attention on or off, the offloaded copies as device clones or
    synchronized, and where the kept path could go wrong (see ``--runs``)."""
    from sloth_core import checkpointing

    settings = {"kept": "1", "nokept": "0"}
    env, original = {}, checkpointing._Slot._to_host
    patches: list[Any] = []
    for option in options:
        if option in settings:
            env[kept_attention.ENV] = settings[option]
        elif option == "probe":
            patches.append(mock.patch.object(kept_attention._Replay, "forward",
                                             staticmethod(_probing_forward)))  # fmt: skip
        elif option == "autograd":
            patches.append(mock.patch.object(kept_attention._Replay, "backward",
                                             staticmethod(_autograd_backward)))  # fmt: skip
        elif option == "flash":  # SDPA (and so the kept path) without cuDNN's kernel
            patches.append(_without_cudnn_sdp())
        elif option == "offload":
            pass  # main() does it, on the loaded model
        elif option == "clone":
            checkpointing._Slot._to_host = lambda self, t: (t.detach().clone(), None)
        elif option == "sync":

            def synced(self: Any, t: torch.Tensor) -> Any:
                result = original(self, t)
                torch.cuda.synchronize()
                return result

            checkpointing._Slot._to_host = synced
        else:
            raise SystemExit(f"unknown run option {option!r}")
    try:
        with mock.patch.dict(os.environ, env), contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            yield
    finally:
        checkpointing._Slot._to_host = original


@contextlib.contextmanager
def _without_cudnn_sdp() -> Iterator[None]:
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)


def adapters(model: Any) -> dict[tuple[int, str, str], torch.nn.Parameter]:
    """Every LoRA weight by (layer, projection, A or B)."""
    found = {}
    for name, param in model.named_parameters():
        match = KEY.search(name)
        if match and param.requires_grad:
            found[(int(match[1]), match[2], match[3])] = param
    return found


def set_adapters(model: Any, values: dict[tuple[int, str, str], torch.Tensor]) -> None:
    params = adapters(model)
    if set(params) != set(values):
        raise SystemExit(f"adapters differ: {sorted(set(params) ^ set(values))[:4]}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(values[key])


def gradients(model: Any, ids: torch.Tensor) -> tuple[float, dict]:
    """The loss of one batch and every adapter's gradient (float32, on the host)."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    loss = loss.detach()
    grads = {k: p.grad.detach().float().cpu() for k, p in adapters(model).items()}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def compare(grads: dict, exact: dict) -> tuple[float, float, dict[str, float]]:
    """Cosine and relative error of all gradients together, and the worst layer's
    relative error per projection."""
    a = torch.cat([grads[k].flatten() for k in sorted(exact)])
    b = torch.cat([exact[k].flatten() for k in sorted(exact)])
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    overall = float((a - b).norm() / b.norm())
    worst: dict[str, float] = {}
    for (layer, proj, ab), g in exact.items():
        err = float((grads[(layer, proj, ab)] - g).norm() / g.norm().clamp(min=1e-30))
        worst[proj] = max(worst.get(proj, 0.0), err)
    return cosine, overall, worst


def by_layer(grads: dict, exact: dict, layer: int) -> float:
    keys = sorted(k for k in exact if k[0] == layer)
    a = torch.cat([grads[k].flatten() for k in keys])
    b = torch.cat([exact[k].flatten() for k in keys])
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--runs",
        default="hf,sloth,fp8",
        help="beside the float32 reference: hf (bf16), sloth, sloth:on, "
        "sloth:off (sloth bf16, its checkpointing so; suffixes: see kept_options), "
        "fp8 (sloth fp8, each part off in turn)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="each sloth bf16 run this many times (is it deterministic?)",
    )
    parser.add_argument(
        "--by-layer", action="store_true", help="also each run's relative error per layer"
    )
    args = parser.parse_args()
    device = args.device
    wanted = args.runs.split(",")
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 512), rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    runs: list[tuple[str, float, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        original, rounded = Path(tmp, "original"), Path(tmp, "rounded")
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(original)
        # The weights sloth-fp8 multiplies: each linear layer's but the output layer's
        # through e4m3 and its row scale, back in bf16.
        with torch.no_grad():
            for module in model.model.layers.modules():
                if type(module) is torch.nn.Linear:
                    module.weight.copy_(fp8.dequantize_rows(*fp8.quantize_rows(module.weight),
                                                            torch.bfloat16))  # fmt: skip
        model.save_pretrained(rounded)
        del model
        for path in (original, rounded):
            build_tokenizer().save_pretrained(path)

        reference, _ = _load("hf", rounded, device)
        generator = torch.Generator().manual_seed(1)
        values = {k: (torch.randn(p.shape, generator=generator) * 0.02).to(device)
                  for k, p in adapters(reference).items()}  # fmt: skip
        set_adapters(reference, values)
        reference.float()
        runs.append(("hf + PEFT, float32 (the reference)", *gradients(reference, ids)))
        if "hf" in wanted:
            reference.to(torch.bfloat16)
            runs.append(("hf + PEFT, bf16", *gradients(reference, ids)))
        del reference
        for system in [w for w in wanted if w.startswith("sloth")]:
            # Suffixes: "-kept" / "-nokept" the offloaded layers' attention kept for the
            # recompute or not (SLOTH_KEPT_ATTENTION); "-clone": every copy "to host" a
            # device copy instead; "-sync": the device synchronized after each such copy;
            # "-probe": each kept output measured against the attention of the
            # recompute's q, k and v; "-autograd": the kept path's backward through the
            # attention again with autograd, not the kernel's backward; "-flash": SDPA
            # without cuDNN's kernel (the kept path takes flash); "-offload": the layers
            # offloaded whatever the device (on the CPU sloth does not offload, so it
            # keeps nothing: this is how these options run there).
            base, *options = system.split("-")
            model, _ = _load(base, rounded, device)
            set_adapters(model, values)
            if "offload" in options:
                from sloth_core.checkpointing import enable_checkpointing

                enable_checkpointing(model, offload=True)
            with kept_options(options):
                for repeat in range(args.repeats):
                    name = f"{system} bf16" + (f" (again, {repeat + 1})" if repeat else "")
                    PROBED.clear()
                    runs.append((name, *gradients(model, ids)))
                    if PROBED:
                        print(
                            f"{name}: {len(PROBED)} kept outputs against the recompute's "
                            f"attention: relative distance max {max(PROBED):.4f}, "
                            f"per call {', '.join(f'{d:.4f}' for d in PROBED)}",
                            flush=True,
                        )
            del model
        if "fp8" in wanted:
            model, _ = _load("sloth", original, device, "fp8")
            set_adapters(model, values)
            for name, switches in FP8_VARIANTS:
                with switched(**switches):
                    runs.append((name, *gradients(model, ids)))
    exact = runs[0][2]
    header = ["run", "loss", "cosine", "rel. error"]
    header += [p.removesuffix("_proj") for p in PROJECTIONS]
    print(f"llama, {args.layers} layers, hidden {args.hidden}, {args.batch} x {args.seq} tokens, "
          f"{device}: adapter gradients against the float32 reference")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, loss, grads in runs:
        cosine, overall, worst = compare(grads, exact)
        cells = [name, f"{loss:.5f}", f"{cosine:.6f}", f"{overall:.4f}"]
        cells += [f"{worst.get(p, float('nan')):.4f}" for p in PROJECTIONS]
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.by_layer:
        print("\nrelative error per layer (all projections, A and B)")
        print("| run | " + " | ".join(f"layer {i}" for i in range(args.layers)) + " |")
        print("|" + "---|" * (args.layers + 1))
        for name, _, grads in runs:
            cells = [f"{by_layer(grads, exact, i):.4f}" for i in range(args.layers)]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

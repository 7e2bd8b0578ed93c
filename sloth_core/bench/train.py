"""``sloth bench train``: LoRA training throughput and memory, sloth against HF + PEFT.

Each system trains the same random-init model (a named shape, saved once as bf16
safetensors) on the same fixed batch of random tokens, **each in its own process**, in
one run: LoRA r=16, alpha 16, dropout 0 on q,k,v,o,gate,up,down; AdamW(lr=2e-4), fused
as both trainers run it by default (``sloth_core.train.optim.default_adamw``);
gradient checkpointing on; ``warmup`` untimed steps, then ``steps`` timed ones, each
between ``torch.cuda.synchronize`` calls. Tokens/s come from the median step; peak memory
is ``torch.cuda.max_memory_allocated()`` after a reset once the model is loaded and
wrapped. MFU counts ``4 N_base + 6 N_lora + 12 layers hidden seq`` FLOPs per token (base
matmul weights incl. lm_head: forward and input gradients; LoRA weights: forward, input
and weight gradients; attention scores and values; recomputation not counted) against
the device's bf16 matmul rate.

Several GPUs (``nproc``: one or more world sizes, each system run at each): the processes
start through torchrun, every rank trains its own batch (the global batch is ``batch x
nproc``), tokens/s count every rank's tokens and peak memory is the largest rank's.
``sloth`` runs on :mod:`sloth_core.train.distributed` (the trainer's DDP, or FSDP2 for
``full``), the baselines under torch's DDP. ``full``: every weight trains (no LoRA;
FLOPs ``6 N_base`` for the weights), ``sloth`` systems only.

Systems: ``sloth`` (``:on``/``:off`` name its checkpointing), ``hf``, and the other
baselines when installed (``liger``: Liger-Kernel's patches on the ``hf`` baseline).
``--systems all`` runs every installed one; one that is not installed is reported as
skipped, with the reason, not as an error. All of them must train the same: their first
losses are compared (``check_losses``) and a disagreement is flagged in the table.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Named model shapes: Llama 3.2 1B and Llama 3.1 8B (untied lm_head, as the issue fixes).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256, rope_theta=500000.0),
    "llama-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256, rope_theta=500000.0),
    # Qwen3 8B: head_dim 128, per-head q/k norms, untied lm_head.
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, rope_theta=1000000.0),
    # Gemma 2 9B: head_dim 256, attention/final softcaps 50/30, alternating 4096-token
    # window, tied embeddings (as the real model; its 256000-row vocab is the lm_head).
    # Qwen3-30B-A3B: every layer sparse, 128 experts of intermediate 768, 8 per token
    # (renormalised); its dense intermediate_size 6144 is unused (no mlp_only_layers).
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          rope_theta=1000000.0),
    "gemma2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336,
                      num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                      head_dim=256, vocab_size=256000, rope_theta=10000.0,
                      query_pre_attn_scalar=256, sliding_window=4096,
                      attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      tie_word_embeddings=True),
    # For the harness's own tests on the CPU.
    "llama-tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=1007, rope_theta=10000.0),
    "qwen3-moe-tiny": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128,
                           moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                           norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=1007,
                           rope_theta=10000.0),
}  # fmt: skip

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Measured bf16 dense matmul rate of the project's H200 (TFLOP/s), the MFU denominator.
PEAK_TFLOPS = 790.0
SYSTEMS = ("sloth", "hf")
#: ``sloth`` variants name their checkpointing: ``:on`` (inputs on the device), ``:off``,
#: ``:auto`` (per layer for a memory budget; ``sloth`` too when a budget is given).
KNOWN_SYSTEMS = ("sloth", "sloth:offload", "sloth:on", "sloth:off", "sloth:auto", "hf", "liger")
#: What ``--systems all`` means: each system once (the ``sloth`` variants only when named).
ALL_SYSTEMS = ("sloth", "hf", "liger")
#: Baselines that are optional installs: system -> (import name, distribution name).
OPTIONAL_BASELINES = {"liger": ("liger_kernel", "liger-kernel")}
#: First losses further apart than this (absolute) mean the systems do not train the same
#: model; bf16 runs agree to about 1e-3 at 8B, NF4 ones to a few 1e-2 on the tiny shape.
LOSS_TOLERANCE = 5e-2
#: Last losses further apart than the tolerance and this fraction of the reference's drop
#: (first loss to last) or of its last loss, whichever is smaller, mean the systems do not
#: learn the same: the same start hid a backward that trained on wrong gradients (session
#: 23: 1.80 against 0.91 after 40 steps, 10.26 against 10.26 after 10; session 24: 1.45
#: against 0.91, which a fraction of the drop alone, 0.63, let through). bf16 runs of the
#: same training end 0.0003 to 0.012 apart. None where the numerics differ by design (FP8
#: weights against hf in bf16).
END_FRACTION = 0.05


@dataclass
class TrainResult:
    system: str
    tokens_per_s: float
    median_step_s: float
    peak_gib: float | None
    mfu: float | None
    first_loss: float
    last_loss: float
    n_base: int
    n_lora: int
    attention: str | None = None
    device_name: str | None = None
    error: str | None = None
    nproc: int = 1
    full: bool = False
    plan: str | None = None  # the memory plan (sloth:auto, or sloth with a budget)
    #: sloth's attention calls of one timed step by path (sdpa, kept, varlen, ...): which
    #: kernels the step ran, e.g. whether the recompute reused kept attention outputs.
    attention_paths: dict[str, float] | None = None
    #: the optimizer the system stepped with ("fused AdamW": see default_adamw)
    optimizer: str | None = None
    #: with SLOTH_CUDA_GRAPH=1, whether the timed steps replayed a CUDA graph ("replayed")
    #: or ran eagerly, and why (sloth_core.train.step_graph)
    graph: str | None = None
    #: the frozen weights and the buffers once loaded (LoRA and trained weights aside),
    #: GiB: what a quantization leaves of the base (FP8's experts, a 4-bit base)
    base_gib: float | None = None


class SystemSkipped(Exception):
    """A baseline that cannot run here (not installed, no patch for the model type)."""


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def skip_reason(system: str) -> str | None:
    """Why ``system`` cannot run in this environment, or None when it can."""
    if system not in OPTIONAL_BASELINES:
        return None
    module, dist = OPTIONAL_BASELINES[system]
    if not installed(module):
        return f"{dist} is not installed (pip install {dist})"
    return None


_WITH_ENV = re.compile(r"(?P<base>[a-z:]+)\[(?P<var>[A-Z_][A-Z0-9_]*)=(?P<value>[^\]]*)\]")


def system_env(name: str) -> tuple[str, dict[str, str]]:
    """A system name and the environment it runs with: ``sloth[SLOTH_X=1]`` is ``sloth``
    with ``SLOTH_X=1`` set in its process, measured in the same run as plain ``sloth`` (an
    A/B of a switch). Other names have no settings of their own."""
    found = _WITH_ENV.fullmatch(name)
    if found is None:
        return name, {}
    return found["base"], {found["var"]: found["value"]}


def split_systems(spec: str) -> tuple[str, ...]:
    """``--systems`` split at its commas, but not at those inside a setting's brackets
    (``sloth[SLOTH_GATED_LORA_TILE=32,128,4,1]`` is one name); empty names dropped."""
    return tuple(n.strip() for n in re.split(r",(?![^\[]*\])", spec) if n.strip())


def resolve_systems(spec: str | tuple[str, ...]) -> tuple[list[str], list[dict[str, str]]]:
    """``--systems`` (comma-separated names, or ``all``) to the systems that run and the
    skipped ones (``{"system", "skipped"}``). Unknown names raise ``ValueError``. A name
    may carry one environment setting for its process (:func:`system_env`)."""
    names = list(split_systems(spec)) if isinstance(spec, str) else [n for n in spec if n]
    if names == ["all"]:
        names = list(ALL_SYSTEMS)
    unknown = [n for n in names if system_env(n)[0] not in KNOWN_SYSTEMS]
    if unknown or not names:
        raise ValueError(f"unknown system(s) {unknown or spec!r}; choose from "
                         f"{', '.join(KNOWN_SYSTEMS)}, or all")  # fmt: skip
    run, skipped = [], []
    for name in dict.fromkeys(names):  # in order, once each
        reason = skip_reason(system_env(name)[0])
        if reason:
            skipped.append({"system": name, "skipped": reason})
        else:
            run.append(name)
    return run, skipped


def liger_patch(model_type: str):
    """Liger-Kernel's patch for ``model_type`` (``apply_liger_kernel_to_llama``, ...),
    applied to the transformers classes before the model loads, with Liger's defaults
    (RoPE, RMSNorm, SwiGLU/GeGLU, fused linear cross entropy)."""
    try:
        import liger_kernel.transformers as liger
    except ImportError as exc:
        raise SystemSkipped(f"liger-kernel is not importable: {exc}") from exc
    patch = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if patch is None:
        raise SystemSkipped(f"liger-kernel has no patch for model type {model_type!r}")
    return patch


def versions() -> dict[str, str | None]:
    """Versions of what the systems run on, read without importing anything."""
    out: dict[str, str | None] = {}
    for dist in ("torch", "transformers", "peft", "triton", "bitsandbytes", "liger-kernel",
                 "sloth-core"):  # fmt: skip
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["python"] = sys.version.split()[0]
    return out


def check_losses(results: list[dict[str, Any]], tolerance: float = LOSS_TOLERANCE,
                 end_fraction: float | None = END_FRACTION) -> bool:  # fmt: skip
    """Mark each trained result with its first loss's distance to the reference's (``hf``,
    else the first system that trained) and whether it is within ``tolerance``; with
    ``end_fraction``, its last loss's too (``same_end``: within ``tolerance`` plus that
    fraction of the reference's drop from its first loss to its last, or of its last
    loss where that is smaller: a long run's last losses are judged against what is left
    of the loss, not against how far it fell). True where all agree."""
    trained = [r for r in results if "first_loss" in r and not r.get("error")]
    if not trained:
        return True
    ref = next((r for r in trained if r["system"] == "hf"), trained[0])
    for r in trained:
        r["first_loss_delta"] = r["first_loss"] - ref["first_loss"]
        r["same_start"] = abs(r["first_loss_delta"]) <= tolerance
        if end_fraction is not None and "last_loss" in r and "last_loss" in ref:
            r["last_loss_delta"] = r["last_loss"] - ref["last_loss"]
            drop = max(ref["first_loss"] - ref["last_loss"], 0.0)
            scale = min(drop, abs(ref["last_loss"]))
            r["same_end"] = abs(r["last_loss_delta"]) <= tolerance + end_fraction * scale
    return all(r["same_start"] and r.get("same_end", True) for r in trained)


def shape_config(shape: str) -> Any:
    """The transformers config of ``shape`` (a key of :data:`SHAPES`)."""
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    rope = {"rope_type": "default", "rope_theta": spec.pop("rope_theta")}
    spec.setdefault("tie_word_embeddings", False)
    return AutoConfig.for_model(model_type, **spec, rope_parameters=rope,
                                max_position_embeddings=8192)  # fmt: skip


def add_bench_options(parser: Any, *, systems: tuple[str, ...], known: tuple[str, ...],
                      note: str = "") -> None:  # fmt: skip
    """The options every ``sloth bench`` of a model shape takes: ``--shape``, ``--systems``,
    ``--device``, ``--model-dir``, ``--json``, ``--markdown`` and ``--plot`` (see
    :func:`bench_place`)."""
    parser.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    parser.add_argument("--systems", default=",".join(systems),
                        help=f"comma-separated, of {', '.join(known)}"
                             + (f" ({note})" if note else ""))  # fmt: skip
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where the random-init model is written once (default: "
                             "$SLOTH_CACHE/bench-models/SHAPE)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--markdown", type=Path, help="write the docs table here")
    parser.add_argument(
        "--plot",
        type=Path,
        help="write a bar chart here (tokens/s and peak memory per system); needs matplotlib",
    )


def bench_place(args: Any) -> tuple[str, Path]:
    """The device (``--device``, else cuda when present) and the model directory
    (``--model-dir``, else ``$SLOTH_CACHE/bench-models/SHAPE``) of a bench's ``args``."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = Path(os.environ.get("SLOTH_CACHE", Path.home() / ".cache" / "sloth"))
    return device, args.model_dir or cache / "bench-models" / args.shape


def make_model(shape: str, path: Path, *, device: str) -> Path:
    """Write a random-init bf16 model of ``shape`` (and a tokenizer) to ``path``, once."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM

    from sloth_core.testing.tokenizer import build_tokenizer

    config = shape_config(shape)
    with torch.device("meta"):
        size = sum(
            t.numel() * 2 for t in AutoModelForCausalLM.from_config(config).state_dict().values()
        )
    check_free_space(path.parent, size)
    torch.manual_seed(0)
    # Initialised in bf16 (an 8B model never goes through fp32 on the host), on the device
    # where it fits: on the CPU, filling qwen3-30b-a3b's 57 GiB took over 4 minutes.
    build_on = device if _fits_on(device, size) else "cpu"
    with torch.device(build_on):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = path.with_name(path.name + ".tmp")
    # The model's own layout (MoE experts as 3-D tensors, which from_pretrained reads as
    # they are): the checkpoint's original per-expert layout would be built by copies of
    # every expert on the device, more than an 80 GB H100 has beside a 57 GiB model.
    model.save_pretrained(staging, safe_serialization=True, save_original_format=False)
    build_tokenizer().save_pretrained(staging)
    staging.rename(path)
    # The systems load it in their own processes, beside this one: a model built on the
    # device must not stay in its cache (qwen3-30b-a3b's 57 GiB left none on an H100).
    del model
    if build_on != "cpu":
        torch.cuda.empty_cache()
    return path


def _fits_on(device: str, size: int) -> bool:
    """Whether ``size`` bytes take at most 90% of ``device``'s memory (always on the CPU)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return True
    return size <= 0.9 * torch.cuda.get_device_properties(dev).total_memory


def check_free_space(folder: Path, needed: int, *, margin: int = 1 << 30) -> None:
    """Fail before writing ``needed`` bytes under ``folder`` when its file system lacks them
    (with a GiB to spare): a bench model (57 GiB for qwen3-30b-a3b) that fills the disk
    half-way would leave a broken staging folder and nothing else able to write."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed + margin:
        raise RuntimeError(
            f"{folder}: {free / 2**30:.1f} GiB free, the bench model needs "
            f"{needed / 2**30:.1f} GiB (+1 GiB spare); point SLOTH_CACHE or --model-dir at "
            "a larger disk"
        )


def _matmul_params(model: Any) -> int:
    """The matmul weights a token runs through: the MFU's FLOPs are 6 x this a token (an
    MoE layer's experts at ``num_experts_per_tok`` of them)."""
    from sloth_core.flops import matmul_params_per_token

    top_k = getattr(model.config, "num_experts_per_tok", None)
    return round(matmul_params_per_token(model, top_k))


def hf_attention(model_dir: Path) -> str:
    """The baseline's attention: ``sdpa``, or ``eager`` for a model with an attention
    softcap (Gemma 2), which transformers' ``sdpa`` refuses (or, in some 5.x releases,
    silently drops: a different model, trained to different losses)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return "eager" if config.get("attn_logit_softcapping") else "sdpa"


def hf_quantization_config(quantization: str) -> Any:
    """The baseline's QLoRA: bitsandbytes through transformers, as its docs show it (double
    quantization, bf16 compute), without ``prepare_model_for_kbit_training`` (whose fp32
    upcast of the other weights sloth does not do either)."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip


def _load(system: str, model_dir: Path, device: str, quantization: str | None = None,
          full: bool = False):  # fmt: skip
    import torch

    if system == "liger":  # the hf baseline with Liger-Kernel's patches
        config = json.loads((Path(model_dir) / "config.json").read_text())
        liger_patch(config["model_type"])()
        system = "hf"

    if system == "sloth" or system.startswith("sloth:"):
        from sloth_core import FastLanguageModel

        # "sloth" checkpoints with the layer inputs in pinned host memory (get_peft_model's
        # default); "sloth:on" keeps them on the device, "sloth:off" does not checkpoint.
        from sloth_core.checkpointing import Checkpointing, apply_checkpointing
        from sloth_core.train import distributed

        mode = Checkpointing(system.partition(":")[2] or "offload")

        model, _ = FastLanguageModel.from_pretrained(
            str(model_dir), dtype=torch.bfloat16, device_map=device, max_seq_length=None,
            quantization=quantization,  # nf4: what load_in_4bit=True means
            full_finetuning=full,
        )  # fmt: skip
        n_base = _matmul_params(model)
        if full:  # as sloth train does it: sharded by FSDP2 under torchrun
            apply_checkpointing(model, mode, sharded=distributed.launched())
            return model, n_base
        model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES,
            use_gradient_checkpointing=mode,
        )  # fmt: skip
        return model, n_base
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sloth_core.quiet import peft_calls

    quantized = {}
    if quantization and quantization != "fp8":  # fp8's baseline is hf in bf16
        quantized["quantization_config"] = hf_quantization_config(quantization)
    # MoE experts: transformers 5 picks its fastest implementation itself (grouped_mm, the
    # eager loop only where torch lacks it), so the baseline is its best, unasked.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation=hf_attention(model_dir),
        device_map=device, **quantized,
    )  # fmt: skip
    n_base = _matmul_params(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES,
                        task_type="CAUSAL_LM")  # fmt: skip
    with peft_calls():
        return get_peft_model(model, config), n_base


def _distribute(system: str, model: Any, full: bool):
    """Under torchrun: the model as the system runs on several processes, and the group."""
    from sloth_core.train import distributed

    group = distributed.setup()
    if not group.active:
        return model, group
    if system == "sloth" or system.startswith("sloth:"):
        return group.wrap(model, full=full), group
    from torch.nn.parallel import DistributedDataParallel

    ids = [group.device.index] if group.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids), group


def _plan(system: str, model: Any, *, batch: int, seq: int, device: str,
          budget_gib: float | None) -> str | None:  # fmt: skip
    """``sloth:auto``, and ``sloth`` given a budget: checkpointing planned per layer for
    ``budget_gib`` (default 90% of the device's memory), as ``sloth train`` plans it."""
    if system != "sloth:auto" and not (system == "sloth" and budget_gib):
        return None
    import torch

    from sloth_core import memory_plan

    budget = int((budget_gib or 0) * 2**30) or memory_plan.device_budget_bytes(torch.device(device))
    plan = memory_plan.plan_for_step(model, sequences=batch, seq=seq, budget_bytes=budget)
    return plan.describe()


def run_system(system: str, model_dir: Path, *, seq: int, batch: int, steps: int,
               warmup: int, device: str, quantization: str | None = None,
               full: bool = False, budget_gib: float | None = None) -> TrainResult:  # fmt: skip
    """Train ``system`` on a fixed random batch; the body of one worker process (of each
    rank, under torchrun). ``budget_gib``: see :func:`_plan`."""
    import torch

    from sloth_core.train import step_graph
    from sloth_core.train.optim import default_adamw
    from sloth_core.train.step import train_step

    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    model, n_base = _load(system, model_dir, device, quantization, full)
    frozen = [*(p for p in model.parameters() if not p.requires_grad), *model.buffers()]
    base_gib = sum(t.numel() * t.element_size() for t in frozen) / 2**30
    del frozen
    plan = _plan(system, model, batch=batch, seq=seq, device=device, budget_gib=budget_gib)
    n_lora = 0 if full else sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.config
    model, group = _distribute(system, model, full)
    model.train()
    optimizer = default_adamw([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    generator = torch.Generator().manual_seed(1234 + group.rank)  # each rank its own rows
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    rows = {"input_ids": ids, "labels": ids}
    sloth = system.startswith("sloth")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    from sloth_core.patches.attention import ATTENTION_PATHS

    for step in range(warmup + steps):
        if step == warmup:
            paths_before = dict(ATTENTION_PATHS)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        # The trainer's own step (sloth_core.train.step), for every system. sloth's
        # wrappers sum the ranks' gradients, the step dividing by every rank's tokens;
        # torch's DDP (the others) averages them, the step dividing by this rank's.
        done = train_step(model, optimizer, [rows], group=group if sloth else None)
        if cuda:
            torch.cuda.synchronize()
        loss = done.loss
        if group.active and not sloth:  # the mean over every rank's rows, as sloth reports
            loss = group.all_sum([loss])[0] / group.world_size
        losses.append(loss)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    if group.active:  # the slowest rank's step; the largest rank's memory
        median = max(group.all_max([median]))
    tokens_per_s = group.world_size * batch * seq / median
    base_flops = (6 if full else 4) * n_base  # full: the weights' gradients too
    flops_per_token = (
        base_flops + 6 * n_lora + 12 * config.num_hidden_layers * config.hidden_size * seq
    )
    per_device = tokens_per_s / group.world_size
    mfu = flops_per_token * per_device / (PEAK_TFLOPS * 1e12) if cuda else None
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    if peak is not None and group.active:
        peak = max(group.all_max([peak]))
    attention = getattr(config, "_attn_implementation", None)
    per_step = {k: (v - paths_before.get(k, 0)) / steps for k, v in ATTENTION_PATHS.items()}
    paths = {k: v for k, v in per_step.items() if v} or None
    if cuda:
        device_name = torch.cuda.get_device_name()
    else:
        import platform

        device_name = platform.processor() or platform.machine()
    stepper = "fused AdamW" if optimizer.defaults.get("fused") else "AdamW"
    graph = None
    if sloth and step_graph.enabled():
        why = step_graph.reason(model)
        graph = "replayed" if step_graph.replayed(model) else f"eager ({why or 'not captured'})"
    # The model (a sharded one holds its collectives' work objects) goes before the group:
    # alive after it, gloo's threads can abort the process at exit (distributed.Group.close).
    del model, optimizer
    group.close()
    return TrainResult(system, tokens_per_s, median, peak, mfu, losses[0], losses[-1], n_base,
                       n_lora, attention, device_name, nproc=group.world_size,
                       full=full, plan=plan, attention_paths=paths,
                       optimizer=stepper, graph=graph, base_gib=base_gib)  # fmt: skip


def run_worker(module: str, args: list[str], *, timeout: float, nproc: int = 1,
               env: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """``python -m module *args`` in a fresh process (``nproc`` of them under torchrun),
    with ``env`` added to this one's environment: its last JSON line (rank 0's), or the
    error."""
    from sloth_core.train.distributed import LAUNCH_VARS

    cmd = [sys.executable, "-m", module, *args]
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}"]  # fmt: skip
        env = {key: value for key, value in env.items() if key not in LAUNCH_VARS}
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        env.setdefault("OMP_NUM_THREADS", "1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (done.stderr or done.stdout).strip().splitlines()
    # torchrun ends with its own summary: the ranks' exceptions are what says why.
    raised = [line for line in tail if "Error" in line and "ChildFailedError" not in line]
    tail = raised[-1:] if raised else tail[-5:]
    return {"error": " | ".join(tail)[-800:] or f"exit status {done.returncode}",
            "returncode": done.returncode}  # fmt: skip


def ratios_vs_hf(results: list[dict[str, Any]]) -> None:
    """Add ``speed_vs_hf`` (tokens/s) and ``memory_vs_hf`` (peak) to each result that ran,
    against the ``hf`` result of the same run, when there is one."""
    base = next((r for r in results if r["system"] == "hf" and "tokens_per_s" in r), None)
    for r in results:
        if base and "tokens_per_s" in r:
            r["speed_vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r.get("peak_gib") and base.get("peak_gib"):
                r["memory_vs_hf"] = r["peak_gib"] / base["peak_gib"]


def run_bench(shape: str, *, seq: int, batch: int, steps: int = 10, warmup: int = 3,
              systems: str | tuple[str, ...] = SYSTEMS, model_dir: Path, device: str,
              timeout: float = 1800, quantization: str | None = None,
              loss_tolerance: float = LOSS_TOLERANCE, nproc: tuple[int, ...] = (1,),
              full: bool = False, budget_gib: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Every system in its own process, one after the other, on the same model and batch;
    with ``quantization`` (``"nf4"``, ...) QLoRA: the base weights quantized as they load.
    ``systems``: names, or ``"all"``/a comma-separated string (see ``resolve_systems``).
    ``nproc``: the world sizes each system runs at (``sloth@2``: 2 processes); ``full``:
    full fine-tuning, sloth systems only. ``budget_gib``: ``sloth`` and ``sloth:auto``
    plan their checkpointing per layer for it (``sloth train --memory-budget-gib``)."""
    run, skipped = resolve_systems(systems)
    if full and any(not s.startswith("sloth") for s in run):
        raise ValueError("full fine-tuning is benchmarked for sloth systems only")
    model_dir = make_model(shape, Path(model_dir), device=device)
    results = []
    for world in nproc:
        for system in run:
            base, env = system_env(system)
            out = run_worker("sloth_core.bench.train", [
                base, str(model_dir), str(seq), str(batch), str(steps), str(warmup), device,
                quantization or "none", "full" if full else "lora", str(budget_gib or 0),
            ], timeout=timeout, nproc=world, env=env)  # fmt: skip
            name = system if world == 1 else f"{system}@{world}"
            results.append({**out, "system": name})
    results += skipped
    # FP8 weights against hf in bf16: the last losses differ by design (docs/benchmarks.md).
    losses_agree = check_losses(results, loss_tolerance,
                                None if quantization == "fp8" else END_FRACTION)  # fmt: skip
    ratios_vs_hf(results)
    for r in results:
        one = next((o for o in results if o["system"] == r["system"].partition("@")[0]
                    and "tokens_per_s" in o), None)  # fmt: skip
        if "@" in r["system"] and one and "tokens_per_s" in r:  # scaling over 1 process
            r["speed_vs_1"] = r["tokens_per_s"] / one["tokens_per_s"]
    device_name = next((r["device_name"] for r in results if r.get("device_name")), None)
    return {"shape": shape, "config": SHAPES[shape], "seq": seq, "batch": batch, "steps": steps,
            "warmup": warmup, "device": device, "quantization": quantization,
            "nproc": list(nproc), "full": full, "budget_gib": budget_gib,
            "peak_tflops": PEAK_TFLOPS, "device_name": device_name, "versions": versions(),
            "loss_tolerance": loss_tolerance, "losses_agree": losses_agree,
            "results": results}  # fmt: skip


def device_line(report: dict[str, Any]) -> str:
    """``Device: NAME; torch X, ...``: the device and the versions a report ran with."""
    found = {k: v for k, v in (report.get("versions") or {}).items() if v}
    return (f"Device: {report.get('device_name') or report['device']}; "
            + ", ".join(f"{k} {v}" for k, v in found.items()) + ".")  # fmt: skip


def markdown(report: dict[str, Any], command: str) -> str:
    """The report as a docs/benchmarks.md table, with the exact command."""

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    def ratio(value):
        return "-" if value is None else f"{value:.2f}x"

    scaling = any("speed_vs_1" in r for r in report["results"])
    what = ("full fine-tuning" if report.get("full")
            else f"QLoRA ({report['quantization']} base weights)" if report.get("quantization")
            else "LoRA")  # fmt: skip
    steppers = sorted({r["optimizer"] for r in report["results"] if r.get("optimizer")})
    if steppers:
        what += ", " + " / ".join(steppers)
    lines = [f"Shape `{report['shape']}`, seq {report['seq']} x batch {report['batch']} per "
             f"process, {report['warmup']} warm-up + {report['steps']} timed steps, "
             f"{report['device']}, {what}; `system@N`: N processes, one GPU each.",
             "", f"    {command}", "",
             "| system | attention | tokens/s | peak GiB | MFU | first loss | last loss "
             "| speed vs hf | memory vs hf |" + (" speed vs 1 process |" if scaling else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if scaling else "")]  # fmt: skip
    for r in report["results"]:
        if r.get("skipped"):
            lines.append(f"| {r['system']} | | skipped: {r['skipped'][:120]} | | | | | | |")
            continue
        if r.get("error"):
            lines.append(f"| {r['system']} | | error: {r['error'][:120]} | | | | | | |")
            continue
        flag = "" if r.get("same_start", True) else " (!)"
        lines.append(
            f"| {r['system']} | {r.get('attention') or '-'} | {r['tokens_per_s']:.0f} | "
            f"{fmt(r['peak_gib'], '.2f')} | "
            f"{fmt(r['mfu'] and r['mfu'] * 100, '.1f')}% | {r['first_loss']:.4f}{flag} | "
            f"{r['last_loss']:.4f}{'' if r.get('same_end', True) else ' (!)'} | "
            f"{ratio(r.get('speed_vs_hf'))} | {ratio(r.get('memory_vs_hf'))} |"
            + (f" {ratio(r.get('speed_vs_1'))} |" if scaling else "")
        )
    plans = [f"`{r['system']}`: {r['plan']}" for r in report["results"] if r.get("plan")]
    if plans:
        lines += ["", *plans]
    graphs = [f"`{r['system']}`: CUDA graph {r['graph']}" for r in report["results"]
              if r.get("graph")]  # fmt: skip
    if graphs:
        lines += ["", *graphs]
    if not report.get("losses_agree", True):
        lines += ["", f"(!) a first loss differs from the reference's by more than "
                      f"{report['loss_tolerance']}, or a last loss by more than that and "
                      f"{END_FRACTION:.0%} of the reference's drop or last loss (the "
                      "smaller): not the same training."]  # fmt: skip
    if report.get("device_name") or report.get("versions"):
        lines += ["", device_line(report)]
    return "\n".join(lines) + "\n"


def _worker(argv: list[str]) -> None:
    system, model_dir, seq, batch, steps, warmup, device, quantization, mode, budget = argv
    try:
        result = run_system(system, Path(model_dir), seq=int(seq), batch=int(batch),
                            steps=int(steps), warmup=int(warmup), device=device,
                            quantization=None if quantization == "none" else quantization,
                            full=mode == "full", budget_gib=float(budget) or None)  # fmt: skip
    except SystemSkipped as exc:
        print(json.dumps({"system": system, "skipped": str(exc)}))
        return
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(asdict(result)))


if __name__ == "__main__":  # one system, in its own process (see run_bench)
    _worker(sys.argv[1:])

"""DPO training throughput and memory: sloth's DPO step against TRL's ``DPOTrainer``.

The issue's row "llama-8b DPO, 1024-token prompt+completion pairs, batch 4": each system
trains the same random-init bf16 model (a shape of :data:`sloth_core.bench.train.SHAPES`,
written once) on the same ``batch`` preference pairs of random token ids, **each in its
own process**, in one run:

- LoRA r=16, alpha 16, dropout 0 on q,k,v,o,gate,up,down; DPO's sigmoid loss, beta 0.1;
  the reference is the model with its adapters disabled (no second copy); AdamW (each
  trainer's default: torch's fused kernel, no weight decay), a constant learning rate,
  gradients clipped to norm 1 (both trainers' default); gradient checkpointing as each
  system trains lean by default.
- Each pair is prompt + chosen and prompt + rejected, ``seq`` tokens each (a prompt of
  ``seq // 2``, completions of the rest), one forward taking both rows of every pair.
- ``sloth``: the step ``sloth train --method dpo`` runs (:class:`PreferenceMethod`'s
  forward and backward in :func:`~sloth_core.train.step.train_step`), on the model
  ``FastLanguageModel.get_peft_model`` makes (its default offloaded checkpointing), with
  its default ``share_prompt``: a pair in one row, the prompt's tokens run once
  (:mod:`sloth_core.patches.shared_prompt`). The system
  ``sloth[SLOTH_BENCH_SHARE_PROMPT=0]`` runs ``share_prompt = false`` (the rows apart)
  in the same run, to measure what sharing gives.
- ``hf``: TRL's ``DPOTrainer`` on transformers + PEFT, as TRL's docs show it
  (``peft_config``, ``DPOConfig(gradient_checkpointing=True, bf16=True)``), given the
  pairs already tokenized (``prompt_ids``/``chosen_ids``/``rejected_ids``, what its own
  tokenization makes), so both systems see the same ids. It is named ``hf`` so that the
  ratios and the targets read it as the baseline.

``warmup`` untimed optimizer steps, then ``steps`` timed ones, each between
``torch.cuda.synchronize`` calls (TRL's through a ``TrainerCallback``'s step begin and
end). Tokens/s count both rows of every pair: ``batch x 2 x seq`` over the median step.
Peak memory is ``torch.cuda.max_memory_allocated()`` after a reset as training starts.
MFU counts ``6 N_base + 6 N_lora + 16 layers hidden seq`` FLOPs per token: the policy's
forward and input gradients and the reference's forward through the base weights, the
LoRA weights' forward, input and weight gradients, attention (policy 12, reference 4).
Tokens/s and MFU count the workload, not what a system ran: with the prompt shared, sloth
runs 3/4 of the tokens at this shape, and its MFU says how fast the workload went, not
how busy its matmuls were.

At step 1 the policy is the reference (LoRA B is 0), so every pair's loss is log 2:
both first losses must be ``log 2`` and agree (``losses_agree``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import train as bench
from .generate import _device_name
from .train import SystemSkipped, TrainResult, add_bench_options

#: ``0`` in a ``sloth`` system's environment: its step scores the rows apart.
SHARE_PROMPT_ENV = "SLOTH_BENCH_SHARE_PROMPT"
#: The systems this bench knows: ``hf`` is TRL's DPOTrainer on transformers + PEFT.
SYSTEMS = ("sloth", "hf")
BETA = 0.1
LEARNING_RATE = 2e-4
#: At step 1 both losses are log 2 exactly in fp32; bf16 runs agree to well under this.
DPO_LOSS_TOLERANCE = 1e-2
#: What every first loss is: the policy equals its reference before any update.
FIRST_LOSS = math.log(2)


def make_pairs(batch: int, seq: int, vocab: int, seed: int = 1234) -> list[dict[str, list[int]]]:
    """``batch`` pairs of random ids, ``prompt_ids`` (``seq // 2``) and ``chosen_ids`` and
    ``rejected_ids`` (the rest of ``seq`` each), from a fixed generator."""
    import torch

    prompt, completion = seq // 2, seq - seq // 2
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt + 2 * completion), generator=generator)
    return [{"prompt_ids": row[:prompt].tolist(), "chosen_ids": row[prompt:seq].tolist(),
             "rejected_ids": row[seq:].tolist()} for row in ids]  # fmt: skip


class StepClock:
    """Times optimizer steps between ``torch.cuda.synchronize`` calls (on CUDA) and reads
    the peak memory since :meth:`start`; both systems' steps go through one."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.times: list[float] = []
        self._began = 0.0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def start(self) -> None:
        """Training starts: the peak memory counts from here."""
        if self.cuda:
            import torch

            self._sync()
            torch.cuda.reset_peak_memory_stats()

    def begin(self) -> None:
        self._sync()
        self._began = time.perf_counter()

    def end(self) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._began)

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return torch.cuda.max_memory_allocated() / 2**30


def _result(system: str, model: Any, clock: StepClock, losses: list[float], *, warmup: int,
            batch: int, seq: int, n_base: int, n_lora: int) -> TrainResult:  # fmt: skip
    timed = clock.times[warmup:]
    if not timed or not losses:
        raise RuntimeError(f"{system}: {len(clock.times)} steps timed, {len(losses)} losses")
    median = statistics.median(timed)
    tokens_per_s = batch * 2 * seq / median
    config = model.config
    flops = 6 * n_base + 6 * n_lora + 16 * config.num_hidden_layers * config.hidden_size * seq
    mfu = flops * tokens_per_s / (bench.PEAK_TFLOPS * 1e12) if clock.cuda else None
    return TrainResult(system, tokens_per_s, median, clock.peak_gib(), mfu, losses[0],
                       losses[-1], n_base, n_lora,
                       getattr(config, "_attn_implementation", None),
                       _device_name("cuda" if clock.cuda else "cpu"))  # fmt: skip


def _trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sloth_dpo_step(model_dir: Path, pairs: list[dict[str, list[int]]], *, seq: int,
                   device: str, lr: float = LEARNING_RATE, budget_gib: float | None = None,
                   share_prompt: bool = True, quantization: str | None = None,
                   ) -> tuple[Any, int, Any, str | None]:  # fmt: skip
    """sloth's DPO step on one fixed batch of ``pairs``, as ``sloth train --method dpo``
    runs it (model, method, optimizer, autocast and step all the trainer's own): the
    model, its base matmul parameters, a ``step()`` that runs one optimizer step and
    returns its loss, and the checkpointing plan (with ``budget_gib``: planned per layer
    for that budget, as ``sloth train --method dpo --memory-budget-gib`` plans it, both
    rows of every pair). ``quantization`` (``nf4``, ``fp8``): the frozen base weights
    quantized as they load, as ``sloth train --quantization`` does."""
    from sloth_core.data import PairExample
    from sloth_core.train.config import TrainConfig
    from sloth_core.train.loop import _autocast
    from sloth_core.train.methods import method_for
    from sloth_core.train.optim import build_optimizer
    from sloth_core.train.step import train_step

    model, n_base = bench._load("sloth", model_dir, device, quantization)  # offloaded
    config = TrainConfig(method="dpo", beta=BETA, loss_type="sigmoid", learning_rate=lr,
                         per_device_train_batch_size=len(pairs), gradient_accumulation_steps=1,
                         max_seq_length=seq, share_prompt=share_prompt)  # fmt: skip
    method = method_for(config)
    method.attach(model)  # the reference: the model with its adapters disabled
    examples = [PairExample(tuple(p["prompt_ids"]), tuple(p["chosen_ids"]),
                            tuple(p["rejected_ids"])) for p in pairs]  # fmt: skip
    rows, width = method.forward_shape(examples, model)  # as sloth train plans it
    plan = bench._plan("sloth", model, batch=rows, seq=width, device=device,
                       budget_gib=budget_gib)  # fmt: skip
    optimizer = build_optimizer(model, config)
    autocast = _autocast(config, model)
    # Every row is seq tokens long: nothing is padded.
    rows = method.batches(examples, batch_size=len(pairs), pad_token_id=0, seed=0,
                          train=False).batch(0, 0)  # fmt: skip
    model.train()

    def step() -> float:
        return train_step(model, optimizer, [rows], autocast=autocast,
                          max_grad_norm=config.max_grad_norm,
                          forward_backward=method.forward_backward).loss  # fmt: skip

    return model, n_base, step, plan


def run_sloth(model_dir: Path, pairs: list[dict[str, list[int]]], *, seq: int, steps: int,
              warmup: int, device: str, lr: float = LEARNING_RATE,
              budget_gib: float | None = None,
              quantization: str | None = None) -> TrainResult:  # fmt: skip
    """:func:`sloth_dpo_step` timed: ``warmup`` steps, then ``steps``; the prompt shared
    unless ``SLOTH_BENCH_SHARE_PROMPT=0`` is set."""
    share = os.environ.get(SHARE_PROMPT_ENV, "1") != "0"
    model, n_base, step, plan = sloth_dpo_step(model_dir, pairs, seq=seq, device=device,
                                               lr=lr, budget_gib=budget_gib,
                                               share_prompt=share,
                                               quantization=quantization)  # fmt: skip
    clock, losses = StepClock(device.startswith("cuda")), []
    clock.start()
    for _ in range(warmup + steps):
        clock.begin()
        loss = step()
        clock.end()
        losses.append(loss)
    result = _result("sloth", model, clock, losses, warmup=warmup, batch=len(pairs), seq=seq,
                     n_base=n_base, n_lora=_trainable(model))  # fmt: skip
    result.plan = plan
    return result


def run_trl(model_dir: Path, pairs: list[dict[str, list[int]]], *, seq: int, steps: int,
            warmup: int, device: str, lr: float = LEARNING_RATE,
            quantization: str | None = None) -> TrainResult:  # fmt: skip
    """TRL's ``DPOTrainer`` on transformers + PEFT (``peft_config``: TRL wraps the model
    and takes the reference as it with adapters disabled), on the same pairs. ``nf4``
    (and the other bitsandbytes types): the model loaded through transformers'
    ``BitsAndBytesConfig`` as ``sloth bench train``'s QLoRA baseline is, TRL preparing it
    as it does a 4-bit model; ``fp8``: in bf16, as the fp8 training row's baseline."""
    try:
        import datasets
        import trl
    except ImportError as exc:
        raise SystemSkipped(
            f"trl and datasets are not installed (pip install trl): {exc}"
        ) from None
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cuda = device.startswith("cuda")
    clock, losses = StepClock(cuda), []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class Tokenized(trl.DPOTrainer):
        """The pairs come as the ids TRL's own tokenization would give it."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    quantized = {}
    if quantization and quantization != "fp8":
        quantized["quantization_config"] = bench.hf_quantization_config(quantization)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation=bench.hf_attention(model_dir),
        device_map=device, **quantized,
    )  # fmt: skip
    n_base = bench._matmul_params(model)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                      target_modules=bench.TARGET_MODULES, task_type="CAUSAL_LM")  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=len(pairs), max_steps=warmup + steps,
            bf16=cuda, use_cpu=not cuda, gradient_checkpointing=True, beta=BETA,
            loss_type=["sigmoid"], max_length=seq, learning_rate=lr,
            lr_scheduler_type="constant", report_to="none", logging_steps=1,
            save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = Tokenized(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(pairs),
            processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=lora,
            callbacks=[Clock()],
        )  # fmt: skip
        # Its log lines are Python dicts on stdout, where the worker's JSON line goes.
        for printer in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(printer)
        trainer.train()
    return _result("hf", trainer.model, clock, losses, warmup=warmup, batch=len(pairs),
                   seq=seq, n_base=n_base, n_lora=_trainable(trainer.model))  # fmt: skip


RUNNERS = {"sloth": run_sloth, "hf": run_trl}


def versions() -> dict[str, str | None]:
    """:func:`sloth_core.bench.train.versions`, and TRL's and datasets'."""
    out = bench.versions()
    for dist in ("trl", "datasets"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_dpo_bench(shape: str, *, seq: int = 1024, batch: int = 4, steps: int = 10,
                  warmup: int = 3, systems: tuple[str, ...] = SYSTEMS, model_dir: Path,
                  device: str, timeout: float = 1800, lr: float = LEARNING_RATE,
                  loss_tolerance: float = DPO_LOSS_TOLERANCE, budget_gib: float | None = None,
                  quantization: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Every system in its own process, one after the other, on the same model and pairs;
    the report has :func:`sloth_core.bench.train.run_bench`'s keys and ``kind: "dpo"``.
    ``hf`` is TRL's DPOTrainer on transformers + PEFT; a system that cannot run here
    (TRL not installed) is reported as skipped, with the reason. ``budget_gib``: sloth
    plans its checkpointing per layer for it (:func:`run_sloth`); TRL runs as always. A
    system may carry one setting of its process's environment, ``sloth[VAR=VALUE]``
    (:func:`sloth_core.bench.train.system_env`). ``quantization``: each system's base
    weights so (:func:`run_sloth`, :func:`run_trl`)."""
    unknown = [s for s in systems if bench.system_env(s)[0] not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(RUNNERS)}")
    model_dir = bench.make_model(shape, Path(model_dir), device=device)
    results = []
    for system in systems:
        base, env = bench.system_env(system)
        out = bench.run_worker("sloth_core.bench.dpo", [
            "--worker", base, str(model_dir), str(seq), str(batch), str(steps), str(warmup),
            device, repr(lr), repr(budget_gib or 0.0), quantization or "none",
        ], timeout=timeout, env=env)  # fmt: skip
        results.append({**out, "system": system})
    # FP8 weights against TRL in bf16: the last losses differ by design.
    losses_agree = bench.check_losses(
        results, loss_tolerance, None if quantization == "fp8" else bench.END_FRACTION
    )
    bench.ratios_vs_hf(results)
    device_name = next((r["device_name"] for r in results if r.get("device_name")), None)
    return {"kind": "dpo", "shape": shape, "config": bench.SHAPES[shape], "seq": seq,
            "batch": batch, "steps": steps, "warmup": warmup, "device": device,
            "quantization": quantization, "nproc": [1], "full": False, "budget_gib": budget_gib,
            "beta": BETA, "learning_rate": lr, "expected_first_loss": FIRST_LOSS,
            "peak_tflops": bench.PEAK_TFLOPS, "device_name": device_name,
            "versions": versions(), "loss_tolerance": loss_tolerance,
            "losses_agree": losses_agree, "results": results}  # fmt: skip


def markdown(report: dict[str, Any], command: str) -> str:
    """The report as a docs/benchmarks.md table (:func:`sloth_core.bench.train.markdown`'s,
    under a DPO heading), with the exact command."""
    table = bench.markdown(report, command)
    heading = (
        f"DPO, shape `{report['shape']}`: batch {report['batch']} pairs, prompt + chosen and "
        f"prompt + rejected of {report['seq']} tokens each (tokens/s count both), "
        f"{report['warmup']} warm-up + {report['steps']} timed steps, {report['device']}, "
        f"LoRA r=16, sigmoid loss, beta {report.get('beta', BETA)}, reference = adapters "
        "disabled; `hf`: TRL's DPOTrainer on transformers + PEFT."
    )
    if report.get("quantization") == "fp8":
        heading += " Base weights: sloth's in FP8 (sloth-fp8), TRL's in bf16."
    elif report.get("quantization"):
        heading += f" Base weights in {report['quantization']} (QLoRA) for both."
    return heading + table[table.index("\n") :]


def _worker(argv: list[str]) -> None:
    system, model_dir, seq, batch, steps, warmup, device, lr, *rest = argv
    config = json.loads((Path(model_dir) / "config.json").read_text())
    pairs = make_pairs(int(batch), int(seq), config["vocab_size"])
    budget = float(rest[0]) if rest else 0.0
    quantization = rest[1] if len(rest) > 1 and rest[1] != "none" else None
    options: dict[str, Any] = {"quantization": quantization}
    if system == "sloth" and budget:
        options["budget_gib"] = budget
    try:
        result = RUNNERS[system](Path(model_dir), pairs, seq=int(seq), steps=int(steps),
                                 warmup=int(warmup), device=device, lr=float(lr),
                                 **options)  # fmt: skip
    except SystemSkipped as exc:
        print(json.dumps({"system": system, "skipped": str(exc)}))
        return
    print(json.dumps(asdict(result)))


def add_options(parser: argparse.ArgumentParser) -> None:
    """``sloth bench dpo``'s options (the shape, the systems, the device, the model
    directory and the outputs are :func:`sloth_core.bench.train.add_bench_options`')."""
    parser.add_argument("--seq", type=int, default=1024, help="tokens of prompt + completion")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="sloth plans its checkpointing per layer for it "
                             "(sloth train --memory-budget-gib); TRL runs as always")  # fmt: skip
    parser.add_argument("--quantization", choices=("nf4", "fp4", "int8", "fp8"), default=None,
                        help="the base weights: sloth's as sloth train --quantization loads "
                             "them; TRL's through BitsAndBytesConfig, or bf16 for fp8")  # fmt: skip
    add_bench_options(parser, systems=SYSTEMS, known=SYSTEMS, note="hf: TRL's DPOTrainer")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``sloth bench dpo``: the report of :func:`run_dpo_bench` for ``args``."""
    device, model_dir = bench.bench_place(args)
    return run_dpo_bench(
        args.shape, seq=args.seq, batch=args.batch, steps=args.steps, warmup=args.warmup,
        systems=bench.split_systems(args.systems), device=device, lr=args.lr,
        model_dir=model_dir, budget_gib=args.memory_budget_gib, quantization=args.quantization,
    )  # fmt: skip


if __name__ == "__main__":  # one system in its own process (see run_dpo_bench)
    if sys.argv[1:2] != ["--worker"]:
        raise SystemExit("the command is `sloth bench dpo`; this module runs its workers")
    _worker(sys.argv[2:])

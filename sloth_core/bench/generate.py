"""GRPO's generation benchmark: sampling completions, sloth against Hugging Face ``generate``.

Both systems sample from the same random-init model (a named shape of
:data:`~sloth_core.bench.train.SHAPES`, saved once as bf16 safetensors) with LoRA r=16,
alpha 16 on :data:`~sloth_core.bench.train.TARGET_MODULES` (GRPO samples from the
policy it trains), **each in its own process**, in one run:

- ``sloth``: ``FastLanguageModel.from_pretrained`` + ``get_peft_model``, sampled through
  GRPO's own :func:`sloth_core.train.rollouts.sample` (``num_generations`` completions of
  every prompt) as a run samples: on the fast path where it serves
  (:mod:`sloth_core.inference.graphed`; ``SLOTH_FAST_SAMPLING=0`` turns it off), else plain;
- ``sloth:fast``: the same on the fast path (on CUDA: static KV cache, decode steps
  replayed as CUDA graphs), ``sloth:plain`` on the plain one (dynamic cache, eager);
- ``hf``: ``AutoModelForCausalLM.from_pretrained`` + PEFT's ``get_peft_model``,
  ``model.generate`` on the prompts each repeated ``generations`` times.

``prompts`` rows of ``prompt_len`` random tokens (no padding); temperature 1, top-p 1, no
top-k; ``min_new_tokens = max_new_tokens = new_tokens`` on both, so no completion ends
early at a stop token and both decode the same number of tokens. One untimed warm-up call,
then ``repeats`` timed ones between ``torch.cuda.synchronize`` calls. Tokens/s count the
completion tokens (``prompts x generations x new_tokens``) over the median call; peak
memory is ``torch.cuda.max_memory_allocated()`` after a reset once the model is loaded.

    sloth bench generate --shape llama-8b --json OUT.json --markdown OUT.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sloth_core.bench.train import (
    SHAPES,
    add_bench_options,
    bench_place,
    device_line,
    make_model,
    ratios_vs_hf,
    run_worker,
    split_systems,
    versions,
)

SYSTEMS = ("sloth", "hf")
KNOWN_SYSTEMS = ("sloth", "sloth:fast", "sloth:plain", "hf")
#: The sampling both systems use: GRPO's defaults (temperature 1, no top-p or top-k cut).
TEMPERATURE, TOP_P, TOP_K = 1.0, 1.0, 0


@dataclass
class GenerateResult:
    system: str
    tokens_per_s: float
    median_s: float
    peak_gib: float | None
    times_s: list[float]
    #: The shortest and longest completion of the last call (both ``new_tokens`` when right).
    min_new_tokens: int
    max_new_tokens: int
    attention: str | None = None
    device_name: str | None = None
    #: How sloth sampled: "fast" (static cache, CUDA graphs) or "plain"; hf: "generate".
    path: str | None = None


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def _prompts(vocab: int, prompts: int, prompt_len: int, device: str) -> Any:
    import torch

    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (prompts, prompt_len), generator=generator).to(device)


def _sampler(system: str, model: Any, tokenizer: Any, ids: Any, *, generations: int,
             new_tokens: int) -> Any:  # fmt: skip
    """A call that samples every completion once and returns them ``[N, new]``, and the
    stop ids."""
    import torch

    from sloth_core.sdk.stop import stop_token_ids

    mask = torch.ones_like(ids)
    stops = stop_token_ids(tokenizer, model)
    if system.startswith("sloth"):
        from sloth_core.inference.generation import SamplingOptions
        from sloth_core.train.rollouts import sample

        options = SamplingOptions(max_new_tokens=new_tokens, temperature=TEMPERATURE,
                                  top_p=TOP_P, top_k=TOP_K)  # fmt: skip
        # None: as a run samples (fast unless SLOTH_FAST_SAMPLING=0); the variants name their path.
        fast = {"sloth:plain": False, "sloth:fast": True}.get(system)

        def call(seed: int) -> Any:
            return sample(model, tokenizer, ids, mask, num_generations=generations,
                          options=options, stop_ids=stops, seed=seed,
                          min_new_tokens=new_tokens, fast=fast).completion_ids  # fmt: skip

        return call, stops
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
    )  # fmt: skip
    prompts = ids.repeat_interleave(generations, dim=0)
    prompt_mask = mask.repeat_interleave(generations, dim=0)
    model.eval()

    def generate(seed: int) -> Any:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=prompts, attention_mask=prompt_mask,
                                 generation_config=config)  # fmt: skip
        return out[:, prompts.shape[1] :]

    return generate, stops


def run_system(system: str, model_dir: Path, *, prompts: int, generations: int,
               prompt_len: int, new_tokens: int, repeats: int,
               device: str) -> GenerateResult:  # fmt: skip
    """Sample ``system``'s completions ``repeats`` times after a warm-up; the body of one
    worker process."""
    import torch
    from transformers import AutoTokenizer

    from sloth_core.bench.train import _load
    from sloth_core.inference.graphed import capture_failed, fast_sampling_enabled
    from sloth_core.train.rollouts import completion_mask

    # LoRA r=16 on TARGET_MODULES, as GRPO trains; sloth:plain loads as sloth does.
    model, _ = _load(system.partition(":")[0], model_dir, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = _prompts(model.config.vocab_size, prompts, prompt_len, device)
    call, stops = _sampler(system, model, tokenizer, ids, generations=generations,
                    new_tokens=new_tokens)  # fmt: skip
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(1 + repeats):  # the first call warms up, untimed
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        completions = call(seed=index)
        if cuda:
            torch.cuda.synchronize()
        if index:
            times.append(time.perf_counter() - start)
    lengths = completion_mask(completions, stops).sum(1)  # up to a stop token, if any
    median = statistics.median(times)
    path = "generate"
    if system.startswith("sloth"):  # after the calls: a failed capture turns it off
        if system == "sloth:fast":
            fast = cuda and not capture_failed(model)
        else:
            fast = system == "sloth" and fast_sampling_enabled(model, torch.device(device))
        path = "fast" if fast else "plain"
    return GenerateResult(
        system, prompts * generations * new_tokens / median, median,
        torch.cuda.max_memory_allocated() / 2**30 if cuda else None, times,
        int(lengths.min()), int(lengths.max()),
        getattr(model.config, "_attn_implementation", None), _device_name(device), path,
    )  # fmt: skip


def run_generate_bench(shape: str, *, prompts: int = 8, generations: int = 8,
                       prompt_len: int = 128, new_tokens: int = 512, repeats: int = 3,
                       systems: tuple[str, ...] = SYSTEMS, model_dir: Path, device: str,
                       timeout: float = 1800) -> dict[str, Any]:  # fmt: skip
    """Every system in its own process, one after the other, on the same model and prompts;
    the report (``kind: "generate"``) with each result's speed against ``hf``."""
    unknown = [s for s in systems if s not in KNOWN_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(KNOWN_SYSTEMS)}")
    model_dir = make_model(shape, Path(model_dir), device=device)
    workload = dict(prompts=prompts, generations=generations, prompt_len=prompt_len,
                    new_tokens=new_tokens, repeats=repeats)  # fmt: skip
    results = []
    for system in systems:
        args = ["--worker", system, str(model_dir), device, *(str(v) for v in workload.values())]
        out = run_worker("sloth_core.bench.generate", args, timeout=timeout)
        results.append({**out, "system": system})
    ratios_vs_hf(results)
    device_name = next((r["device_name"] for r in results if r.get("device_name")), None)
    return {"kind": "generate", "shape": shape, "config": SHAPES[shape], **workload,
            "temperature": TEMPERATURE, "top_p": TOP_P, "top_k": TOP_K, "device": device,
            "device_name": device_name, "versions": versions(),
            "results": results}  # fmt: skip


def markdown(report: dict[str, Any], command: str) -> str:
    """The report as a docs/benchmarks.md table, with the exact command."""

    def fmt(value, spec, unit=""):
        return "-" if value is None else format(value, spec) + unit

    lines = [f"Shape `{report['shape']}`, GRPO sampling: {report['prompts']} prompts x "
             f"{report['generations']} generations, {report['prompt_len']}-token prompts, "
             f"{report['new_tokens']} new tokens each (temperature {report['temperature']}, "
             f"top-p {report['top_p']}, no top-k), 1 warm-up + {report['repeats']} timed "
             f"calls, {report['device']}, LoRA r=16.",
             "", f"    {command}", "",
             "| system | sampling | attention | tokens/s | median s | peak GiB | speed vs hf "
             "| memory vs hf |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["results"]:
        if r.get("error"):
            lines.append(f"| {r['system']} | | | error: {r['error'][:120]} | | | | |")
            continue
        lines.append(
            f"| {r['system']} | {r.get('path') or '-'} | {r.get('attention') or '-'} | "
            f"{r['tokens_per_s']:.0f} | "
            f"{r['median_s']:.2f} | {fmt(r['peak_gib'], '.2f')} | "
            f"{fmt(r.get('speed_vs_hf'), '.2f', 'x')} | {fmt(r.get('memory_vs_hf'), '.2f', 'x')} |"
        )
    lines += ["", device_line(report)]
    return "\n".join(lines) + "\n"


def add_options(parser: argparse.ArgumentParser) -> None:
    """``sloth bench generate``'s options (the shape, the systems, the device, the model
    directory and the outputs are :func:`sloth_core.bench.train.add_bench_options`')."""
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    add_bench_options(parser, systems=SYSTEMS, known=KNOWN_SYSTEMS)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``sloth bench generate``: the report of :func:`run_generate_bench` for ``args``."""
    device, model_dir = bench_place(args)
    return run_generate_bench(
        args.shape, prompts=args.prompts, generations=args.generations,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
        systems=split_systems(args.systems), model_dir=model_dir,
        device=device,
    )  # fmt: skip


def _worker(argv: list[str]) -> None:
    system, model_dir, device, prompts, generations, prompt_len, new_tokens, repeats = argv
    result = run_system(system, Path(model_dir), prompts=int(prompts),
                        generations=int(generations), prompt_len=int(prompt_len),
                        new_tokens=int(new_tokens), repeats=int(repeats),
                        device=device)  # fmt: skip
    print(json.dumps(asdict(result)))


if __name__ == "__main__":  # one system in its own process (see run_generate_bench)
    if sys.argv[1:2] != ["--worker"]:
        raise SystemExit("the command is `sloth bench generate`; this module runs its workers")
    _worker(sys.argv[2:])

"""GPU check and timing of GRPO's fast sampling (sloth_core.inference.graphed).

1. Check, on a random-init ``--check-shape`` model (bf16, LoRA r=16 with non-zero B so
   the adapters change the output): greedy completions of the fast path (static cache,
   CUDA-graph replays, ``decode_gqa``) against the plain path's; that the graph was
   captured and no fallback happened; that the adapters are active while sampling; and
   each path's self-consistency (the share of its greedy tokens a teacher-forced forward
   also ranks first: a stale or wrong replay would drop it far below the plain path's).
   bf16 numerics differ between the two caches, so on a random model's flat logits the
   greedy paths may part after a while: agreement is reported, not required.
2. The benchmark: ``sloth:fast``, ``sloth:plain`` and ``hf`` on ``--shape``, each in its
   own process (sloth_core.bench.generate), written to OUT_DIR/bench-generate.{json,md}.

Prints one JSON line per result; writes only under OUT_DIR (the models go to
$SLOTH_CACHE/bench-models, as ``sloth bench train`` writes them).

    source scripts/gpu_env.sh "$OUT" && python3 scripts/grpo_sampling_gpu.py "$OUT"
        [--shape llama-8b] [--check-shape llama-1b] [--new-tokens 512] [--skip-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import torch

from sloth_core.bench import generate as bench
from sloth_core.bench.train import _load, make_model
from sloth_core.inference import graphed
from sloth_core.inference.generation import SamplingOptions
from sloth_core.modes import for_inference, for_training
from sloth_core.patches.attention import ATTENTION_PATHS
from sloth_core.sdk.stop import stop_token_ids
from sloth_core.train.rollouts import sample


def _models() -> Path:
    return Path(os.environ.get("SLOTH_CACHE", Path.home() / ".cache" / "sloth")) / "bench-models"


def _self_consistency(model, rollouts) -> float:
    """Share of the completion tokens that a teacher-forced forward ranks first."""
    ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], 1)
    for_inference(model)  # and back with for_training, which restores all it changed
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for_training(model)
    start = rollouts.prompt_ids.shape[1] - 1
    first = logits[:, start : start + rollouts.completion_ids.shape[1]].argmax(-1)
    return float((first == rollouts.completion_ids).float().mean())


def check(shape: str, new_tokens: int, device: str = "cuda") -> dict:
    from transformers import AutoTokenizer

    model_dir = make_model(shape, _models() / shape, device=device)
    model, _ = _load("sloth", model_dir, device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator, device=device) * 0.02)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.randint(0, model.config.vocab_size, (8, 64), device=device,
                        generator=generator)  # fmt: skip
    mask = torch.ones_like(ids)
    stops = stop_token_ids(tokenizer, model)
    captured = []
    release = graphed._DecodeStep.release

    def spy(self):
        captured.append(self.graph is not None)
        release(self)

    graphed._DecodeStep.release = spy

    def run(options, fast):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = sample(model, tokenizer, ids, mask, num_generations=2, options=options,
                         stop_ids=stops, seed=7, min_new_tokens=new_tokens,
                         fast=fast)  # fmt: skip
        return out, [str(w.message) for w in caught if "fast sampling" in str(w.message)]

    greedy = SamplingOptions(max_new_tokens=new_tokens)
    sampled = SamplingOptions(max_new_tokens=new_tokens, temperature=1.0)
    plain, _ = run(greedy, False)
    gqa = ATTENTION_PATHS["decode_gqa"]
    fast, fallbacks = run(greedy, None)
    used_gqa = ATTENTION_PATHS["decode_gqa"] > gqa
    with model.disable_adapter():
        base, _ = run(greedy, None)
    plain_s, _ = run(sampled, False)
    fast_s, more = run(sampled, None)
    same = fast.completion_ids == plain.completion_ids
    differs = (~same).int()
    first = torch.where(differs.any(1), differs.argmax(1), same.shape[1]).float()
    return {
        "check": shape, "new_tokens": new_tokens, "rows": int(same.shape[0]),
        "graph_captured": bool(captured) and all(captured), "decode_gqa": used_gqa,
        "fallbacks": fallbacks + more,
        "greedy_equal_rows": int(same.all(1).sum()),
        "greedy_token_agreement": float(same.float().mean()),
        "greedy_first_difference_median": float(first.median()),
        "self_consistency_plain": _self_consistency(model, plain),
        "self_consistency_fast": _self_consistency(model, fast),
        "adapters_active": not torch.equal(base.completion_ids, fast.completion_ids),
        "sampled_token_agreement": float((fast_s.completion_ids == plain_s.completion_ids)
                                         .float().mean()),
    }  # fmt: skip


def main() -> None:
    # The fast path is opt-in until this check has passed: on for the check's fast=None calls.
    os.environ[graphed.ENV] = "1"
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--check-shape", default="llama-1b")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (no graphs)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(check(args.check_shape, min(args.new_tokens, 128), args.device)), flush=True)
    if args.skip_bench:
        return
    report = bench.run_generate_bench(
        args.shape, new_tokens=args.new_tokens, repeats=args.repeats,
        systems=("sloth:fast", "sloth:plain", "hf"), model_dir=_models() / args.shape,
        device=args.device,
    )  # fmt: skip
    command = f"python3 scripts/grpo_sampling_gpu.py OUT --shape {args.shape}"
    (args.out / "bench-generate.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench-generate.md").write_text(bench.markdown(report, command))
    for result in report["results"]:
        print(json.dumps({"shape": args.shape, **result}), flush=True)


if __name__ == "__main__":
    main()

"""QLoRA on several processes (gloo on the CPU): 2 ranks of batch b over an nf4 base train
exactly as 1 process of batch 2b, as LoRA does (tests/train/test_train_distributed.py;
the run helpers are tests/train/_ranks.py).

Each rank loads and quantizes the same checkpoint, so the 4-bit weights and their
quantization states are the same bits everywhere; DDP sees only the trainable adapters
(the frozen ``Params4bit`` weights take no part in its buckets or its init sync)."""

from __future__ import annotations

import pytest
import torch
from _ranks import REL, TWO_RANKS, losses, options, run_train

from sloth_core.train import TrainConfig, train
from sloth_core.train.metrics import read_metrics

pytestmark = TWO_RANKS


def _without_4bit() -> str | None:
    """Why nf4 cannot load here, or None."""
    try:
        import bitsandbytes.functional as bnb_functional
        import sloth_bnb  # noqa: F401  (the quantizer `sloth train --load-in-4bit` finds)
    except ImportError as exc:
        return f"QLoRA needs bitsandbytes and sloth-bnb: {exc}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        bnb_functional.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
    except (RuntimeError, NotImplementedError) as exc:
        return f"bitsandbytes has no 4-bit backend for the {device} here: {exc}"
    return None


def test_qlora_on_two_ranks_trains_as_one_process_of_twice_the_batch(
    tiny_llama, alpaca_file, tmp_path
):
    """Rank 0 evaluates alone, after step 2: on AVX512-BF16 processors that repacks its
    4-bit weights for inference (sloth-bnb's guard restores them before training goes on),
    so a rank left with the inference layout would drift from the other at step 3."""
    if reason := _without_4bit():
        pytest.skip(reason)
    qlora = {"load_in_4bit": True, "eval_fraction": 0.1, "eval_steps": 2,
             "save_steps": 0, "save_method": "lora"}  # fmt: skip
    single, double = tmp_path / "single", tmp_path / "double"
    train(TrainConfig.from_mapping(options(tiny_llama, alpaca_file, single, 4, **qlora)),
          show_progress=False)  # fmt: skip
    run_train(options(tiny_llama, alpaca_file, double, 2, **qlora), "--nproc", "2")

    ones, twos = losses(single), losses(double)
    assert sorted(ones) == sorted(twos) == [1, 2, 3, 4]
    for step, loss in ones.items():
        assert twos[step] == pytest.approx(loss, rel=REL), step
    assert ones[4] < ones[1]  # it trains
    evals = [{r["step"]: r["eval_loss"] for r in read_metrics(out) if "eval_loss" in r}
             for out in (single, double)]  # fmt: skip
    assert sorted(evals[0]) == sorted(evals[1]) == [0, 2, 4]
    for step, loss in evals[0].items():
        assert evals[1][step] == pytest.approx(loss, rel=REL), step
    # The adapters rank 0 saved are the single process's. The step-4 evaluation above ran
    # them; entry by entry they agree less closely than the losses (the ranks' gradients
    # sum in another order, and 4 AdamW steps scale the small entries' updates up: 1.1e-5
    # of a tensor's largest entry seen on this CPU), hence 10 x the losses' tolerance.
    from safetensors.torch import load_file

    adapters = [load_file(out / "final" / "adapter_model.safetensors") for out in (single, double)]
    assert sorted(adapters[0]) == sorted(adapters[1]) and len(adapters[0]) > 10
    for name, tensor in adapters[0].items():
        assert (adapters[1][name] - tensor).abs().max() <= 10 * REL * tensor.abs().max(), name


def test_sharding_refuses_quantized_weights():
    """sloth never shards a quantized model (LoRA on several processes is DDP; full
    fine-tuning refuses quantization); handed one in Python, the sharding says why."""
    bnb = pytest.importorskip("bitsandbytes")
    from sloth_core.train.distributed import Group, shard

    for quantized in (bnb.nn.Linear4bit(64, 64, quant_type="nf4"),
                      bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)):  # fmt: skip
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), quantized)
        with pytest.raises(ValueError, match=r"^1\.weight is quantized: FSDP2 .*quant_state"):
            shard(model, Group(world_size=2))

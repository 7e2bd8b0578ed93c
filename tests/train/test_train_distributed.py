"""Several processes on the CPU (gloo): 2 ranks of batch b train exactly as 1 process of
batch 2b, and a checkpoint of either resumes on the other; LoRA under DDP, full
fine-tuning sharded by FSDP2."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from _ranks import REL, TWO_RANKS, write_data
from _ranks import losses as _losses
from _ranks import options as _options
from _ranks import run_train as _train

from sloth_core.train import ConfigError, TrainConfig, train
from sloth_core.train.metrics import read_metrics

pytestmark = TWO_RANKS
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _stopped_at_step_2(source, target):
    """``source``'s output as a run killed just after its step-2 checkpoint leaves it."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoint-4")
    kept = [r for r in read_metrics(target) if r["step"] <= 2]
    (target / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """One process of batch 4, and `sloth train --nproc 2` of batch 2: 4 steps each."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_data(root / "data.jsonl")
    single, double = root / "single", root / "double"
    _train(_options(tiny_llama, data, single, 4))
    _train(_options(tiny_llama, data, double, 2), "--nproc", "2")
    return tiny_llama, data, root


def test_two_ranks_train_as_one_process_of_twice_the_batch(runs):
    _, _, root = runs
    single, double = _losses(root / "single"), _losses(root / "double")
    assert sorted(single) == [1, 2, 3, 4]
    assert sorted(double) == sorted(single)
    for step, loss in single.items():
        assert double[step] == pytest.approx(loss, rel=REL), step
    assert single[4] < single[1]  # it trains
    state = json.loads((root / "double" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["micro_batches"] == 4  # global micro-batches


def test_a_two_rank_checkpoint_resumes_on_one_process_and_back(runs, tmp_path):
    """Stopped after step 2's checkpoint (the later files removed, as a kill would leave
    them), then resumed on the other world size with the same global batch: steps 3 and 4
    have the uninterrupted run's losses."""
    model, data, root = runs
    expected = _losses(root / "single")

    on_one = tmp_path / "on_one"
    _stopped_at_step_2(root / "double", on_one)
    done = _train(_options(model, data, on_one, 4), "--resume")
    assert "resumed from checkpoint-2" in done.stdout
    got = _losses(on_one)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=REL), step

    on_two = tmp_path / "on_two"
    _stopped_at_step_2(root / "single", on_two)
    _train(_options(model, data, on_two, 2), "--resume", launcher=TORCHRUN)
    got = _losses(on_two)
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=REL), step


def test_resume_refuses_another_global_batch(runs, tmp_path):
    model, data, root = runs
    out = tmp_path / "out"
    _stopped_at_step_2(root / "double", out)
    config = TrainConfig.from_mapping({**_options(model, data, out, 2), "resume": True})
    with pytest.raises(ConfigError, match=r"global batch .* 2 x 1 = 2, .* 2 x 2 = 4"):
        train(config, show_progress=False)


def test_nproc_needs_a_launcher_in_python(runs, tmp_path):
    model, data, _ = runs
    config = TrainConfig.from_mapping({**_options(model, data, tmp_path / "o", 2), "nproc": 2})
    with pytest.raises(ConfigError, match="nproc=2: several processes start"):
        train(config, show_progress=False)


@pytest.fixture(scope="module")
def full_runs(runs, tmp_path_factory):
    """Full fine-tuning in fp32: one process of batch 4, and 2 FSDP2 ranks of batch 2."""
    model, data, _ = runs
    root = tmp_path_factory.mktemp("fsdp")
    full = {"full_finetuning": True, "dtype": "fp32", "learning_rate": 1e-3,
            "save_method": "merged_16bit"}  # fmt: skip
    _train(_options(model, data, root / "single", 4, **full))
    _train(_options(model, data, root / "double", 2, **full), "--nproc", "2")
    return model, data, root, full


def test_fsdp_ranks_train_every_weight_as_one_process(full_runs):
    from safetensors.torch import load_file

    _, _, root, _ = full_runs
    single, double = _losses(root / "single"), _losses(root / "double")
    assert sorted(double) == sorted(single) == [1, 2, 3, 4]
    for step, loss in single.items():
        assert double[step] == pytest.approx(loss, rel=REL), step
    assert single[4] < single[1]
    # The checkpoint holds every weight, gathered whole, equal to the single process's.
    ones = load_file(root / "single" / "checkpoint-4" / "trainable.safetensors")
    twos = load_file(root / "double" / "checkpoint-4" / "trainable.safetensors")
    assert sorted(ones) == sorted(twos) and len(ones) > 10
    for name, tensor in ones.items():
        assert twos[name].shape == tensor.shape, name
        assert (twos[name] - tensor).abs().max() <= REL * tensor.abs().max() + 1e-7, name
    # The final export came from the gathered weights (rank 0), as one process writes it.
    finals = [load_file(next((root / run / "final").glob("*.safetensors")))
              for run in ("single", "double")]  # fmt: skip
    assert sorted(finals[0]) == sorted(finals[1])
    for name, tensor in finals[0].items():
        assert (finals[1][name].float() - tensor.float()).abs().max() <= 1e-2, name


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 4,
                    reason="4 ranks on a GPU machine need 4 GPUs")  # fmt: skip
def test_four_fsdp_ranks_loaded_sharded_train_as_one_process(full_runs, tmp_path):
    from safetensors.torch import load_file

    model, data, root, full = full_runs
    quad = tmp_path / "quad"
    done = _train(_options(model, data, quad, 1, **{**full, "save_method": "none"}), "--nproc", "4")
    assert "loaded sharded over 4 processes" in done.stdout
    single, got = _losses(root / "single"), _losses(quad)
    assert sorted(got) == [1, 2, 3, 4]
    for step, loss in single.items():
        assert got[step] == pytest.approx(loss, rel=REL), step
    ones = load_file(root / "single" / "checkpoint-4" / "trainable.safetensors")
    fours = load_file(quad / "checkpoint-4" / "trainable.safetensors")
    assert sorted(ones) == sorted(fours)
    for name, tensor in ones.items():
        assert (fours[name] - tensor).abs().max() <= REL * tensor.abs().max() + 1e-7, name


def test_an_fsdp_checkpoint_resumes_on_one_process_and_back(full_runs, tmp_path):
    model, data, root, full = full_runs
    expected = _losses(root / "single")
    options = {**full, "save_method": "none"}

    on_one = tmp_path / "on_one"
    _stopped_at_step_2(root / "double", on_one)
    done = _train(_options(model, data, on_one, 4, **options), "--resume")
    assert "resumed from checkpoint-2" in done.stdout
    got = _losses(on_one)
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=REL), step

    on_two = tmp_path / "on_two"
    _stopped_at_step_2(root / "single", on_two)
    _train(_options(model, data, on_two, 2, **options), "--resume", launcher=TORCHRUN)
    got = _losses(on_two)
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=REL), step

"""The opt-in graphed training step (``SLOTH_CUDA_GRAPH=1``, sloth_core.train.step_graph),
held on the CPU through a backend that "replays" by running the step again and writing
the captured loss and gradients in place, as a CUDA graph's replay rewrites its outputs:
what the step does around the graph (its inputs copied in, its gradients handed to the
optimizer, the batches it refuses) must give eager training's results step for step."""

from __future__ import annotations

import pytest
import torch

from sloth_core import FastLanguageModel
from sloth_core.checkpointing import enable_checkpointing
from sloth_core.patches.lm_head import CountedLabels, counted_labels, preset_counted_labels
from sloth_core.train import step_graph
from sloth_core.train.step import train_step


class _Rerun:
    """Captures by running the step (a warm-up run first, as on CUDA) and replays by
    running it again into the captured loss and gradient tensors."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.captures = self.replays = 0
        self.fail = fail

    def available(self, device):
        return True

    def capture(self, run, params):
        self.captures += 1
        if self.fail is not None:
            raise self.fail
        run()
        for p in params:
            p.grad = None
        loss = run()
        return (run, loss, [p.grad for p in params], list(params)), loss

    def replay(self, graph):
        self.replays += 1
        run, loss, grads, params = graph
        for p in params:
            p.grad = None
        loss.copy_(run())
        for p, grad in zip(params, grads, strict=True):
            if grad is not None:
                grad.copy_(p.grad)
            p.grad = None


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny Qwen3-MoE: its experts' 3-D weights take LoRA (``target_experts``)."""
    from sloth_core.testing.models import tiny_model

    return tiny_model("qwen3_moe", tmp_path_factory.mktemp("models") / "qwen3_moe")


def _model(path, dropout=0.0, device="cpu"):
    torch.manual_seed(0)
    model, _ = FastLanguageModel.from_pretrained(
        str(path), dtype=torch.float32, device_map=None if device == "cpu" else device
    )
    experts = model.config.model_type == "qwen3_moe"
    model = FastLanguageModel.get_peft_model(
        model, r=4, lora_dropout=dropout, random_state=0, target_experts=experts
    )
    enable_checkpointing(model, offload=True)  # as a GPU trains it
    return model.train()


def _batches(vocab, shapes):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for batch, seq in shapes:
        ids = torch.randint(3, vocab, (batch, seq), generator=generator)
        labels = ids.clone()
        labels[:, :3] = -100  # a prompt, not counted
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def _train(path, batches, *, per_step=1, dropout=0.0, device="cpu", after=None):
    """``after(model, step)``: called after each step."""
    model = _model(path, dropout, device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(2)
    losses = []
    for step, i in enumerate(range(0, len(batches), per_step)):
        losses.append(train_step(model, optimizer, batches[i : i + per_step]).loss)
        if after is not None:
            after(model, step)
    return model, losses, [p.detach().clone() for p in params]


def _eager_then_graphed(path, monkeypatch, batches, backend, **train):
    """Train eagerly, then with the graphed step on ``backend``: the second run's model,
    once both gave the same losses and parameters."""
    _, eager_losses, eager_params = _train(path, batches, **train)
    monkeypatch.setenv("SLOTH_CUDA_GRAPH", "1")
    monkeypatch.setattr(step_graph, "_BACKEND", backend)
    model, losses, params = _train(path, batches, **train)
    for got, want in ((losses, eager_losses), (params, eager_params)):
        assert len(got) == len(want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return model


def test_replayed_steps_train_as_eager_ones(tiny_llama, monkeypatch):
    """Six steps of different rows: two eager warm-ups, the capture, three replays."""
    backend = _Rerun()
    model = _eager_then_graphed(tiny_llama, monkeypatch, _batches(200, [(2, 16)] * 6), backend)
    assert (backend.captures, backend.replays) == (1, 4)  # the capture's step is a replay
    assert step_graph.reason(model) is None and step_graph.replayed(model)


def test_replayed_moe_steps_train_as_eager_ones(tiny_moe, monkeypatch):
    """A mixture of experts with LoRA on every expert (PEFT's 3-D parameter wrappers):
    their gradients are handed over as the linear layers' are."""
    backend = _Rerun()
    model = _eager_then_graphed(tiny_moe, monkeypatch, _batches(200, [(2, 16)] * 5), backend)
    assert any(p.dim() == 2 and "experts" in n for n, p in model.named_parameters()
               if p.requires_grad)  # fmt: skip
    assert (backend.captures, backend.replays) == (1, 3)
    assert step_graph.reason(model) is None and step_graph.replayed(model)


def test_a_batch_unlike_the_captured_one_runs_eagerly(tiny_llama, monkeypatch):
    shapes = [(2, 16)] * 3 + [(2, 12)] + [(2, 16)] * 2 + [(1, 16)]
    backend = _Rerun()
    _eager_then_graphed(tiny_llama, monkeypatch, _batches(200, shapes), backend)
    assert (backend.captures, backend.replays) == (1, 3)


def test_a_step_that_draws_random_numbers_is_not_captured(tiny_llama, monkeypatch):
    backend = _Rerun()
    batches = _batches(200, [(2, 16)] * 4)
    model = _eager_then_graphed(tiny_llama, monkeypatch, batches, backend, dropout=0.1)
    assert backend.captures == 0 and not step_graph.replayed(model)
    assert "random" in step_graph.reason(model)


def test_a_failed_capture_warns_once_and_trains_eagerly(tiny_llama, monkeypatch):
    backend = _Rerun(fail=RuntimeError("operation not permitted when stream is capturing"))
    with pytest.warns(RuntimeWarning, match="operation not permitted") as caught:
        model = _eager_then_graphed(tiny_llama, monkeypatch, _batches(200, [(2, 16)] * 5), backend)
    assert len([w for w in caught if "SLOTH_CUDA_GRAPH" in str(w.message)]) == 1
    assert backend.captures == 1 and "operation not permitted" in step_graph.reason(model)


def test_a_weight_moved_after_the_capture_ends_the_replays(tiny_llama, monkeypatch):
    """A frozen weight in new memory (as a 4-bit one switched back from eval's layout):
    the graph would read the old memory, so the steps after run eagerly."""

    def move(model, step):
        if step == 3:
            weight = model.get_input_embeddings().weight
            weight.data = weight.data.clone()

    backend = _Rerun()
    batches = _batches(200, [(2, 16)] * 6)
    model = _eager_then_graphed(tiny_llama, monkeypatch, batches, backend, after=move)
    assert (backend.captures, backend.replays) == (1, 2)
    assert not step_graph.replayed(model)


def test_accumulated_micro_batches_are_not_captured(tiny_llama, monkeypatch):
    backend = _Rerun()
    batches = _batches(200, [(2, 16)] * 8)
    _eager_then_graphed(tiny_llama, monkeypatch, batches, backend, per_step=2)
    assert backend.captures == 0


def test_a_preset_count_is_what_the_loss_reads():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    preset_counted_labels(labels, 3)  # not the true 4: shows which one is read
    counted = counted_labels(labels)
    assert counted.value() == 3
    assert CountedLabels.known(9).value() == 9
    labels.add_(0)  # written: the preset no longer holds, the count is made again
    assert counted_labels(labels).value() == 4 and counted_labels(labels) is not counted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_moe"])
def test_a_captured_cuda_step_trains_as_eager_ones(arch, request, monkeypatch):
    """The real thing: sloth's kernels, the offloaded checkpoints' copies and the loss
    captured into one CUDA graph and replayed, in fp32 (no rounding to hide behind); the
    MoE's routing (its schedule built on the device, no read-back) inside the graph too."""
    path = request.getfixturevalue(arch)
    monkeypatch.delenv("SLOTH_KERNELS")  # the Triton kernels, as a GPU trains
    batches = _batches(200, [(2, 64)] * 6)
    _, eager_losses, eager_params = _train(path, batches, device="cuda")
    monkeypatch.setenv("SLOTH_CUDA_GRAPH", "1")
    model, losses, params = _train(path, batches, device="cuda")
    assert step_graph.reason(model) is None
    assert step_graph.replayed(model)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(params, eager_params, rtol=1e-4, atol=1e-5)


def test_plain_rows_get_no_mask_in_a_capture_where_transformers_would_build_one():
    """Capturing counts as tracing to transformers: it neither finds rows unpacked nor
    skips the causal mask. Inside a capture of plain rows, sloth's mask function gives what
    an eager forward of them gets (no mask) and leaves a sliding window's alone."""
    from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask

    from sloth_core.patches.attention import plain_rows_captured, sloth_mask

    packed = torch.zeros(2, 8, dtype=torch.long)  # what a capture finds: one sequence a row

    def same_sequence(batch, head, q, kv):
        return packed[batch, q] == packed[batch, kv]

    traced = dict(batch_size=2, q_length=8, kv_length=8,
                  mask_function=and_masks(causal_mask_function, same_sequence),
                  attention_mask=None, allow_is_causal_skip=False)  # fmt: skip
    mask = sloth_mask(**traced)
    assert mask is not None and mask.shape == (2, 1, 8, 8)  # what transformers builds
    with plain_rows_captured():
        assert sloth_mask(**traced) is None
        window = sloth_mask(**traced, local_size=4)  # a window shorter than the rows
        assert window is not None and torch.equal(window, sdpa_mask(**traced, local_size=4))
        padding = sloth_mask(**{**traced, "attention_mask": torch.ones(2, 8, dtype=torch.bool)})
        assert padding is not None  # a padding mask is not plain rows: transformers decides
    assert sloth_mask(**traced) is not None


def test_a_capture_takes_the_warm_up_runs_host_buffers_again_in_order(monkeypatch):
    """Inside a capture the offloaded checkpoints pin no memory: they take the buffers an
    eager run of the step took, in its order, and those stay with the graph."""
    from sloth_core import checkpointing

    pinned, empty_strided = [], torch.empty_strided

    def pin(shape, strides, dtype, pin_memory):
        pinned.append((shape, dtype))
        return empty_strided(shape, strides, dtype=dtype)  # the CPU can pin nothing

    monkeypatch.setattr(checkpointing.torch, "empty_strided", pin)
    first, second = torch.empty(2, 3), torch.empty(4, 3).t()  # a transposed layout too
    with checkpointing.captured_host_buffers([first, second]) as kept:
        assert checkpointing._pinned((2, 3), (3, 1), torch.float32) is first
        assert checkpointing._pinned((3, 4), (1, 3), torch.float32) is second
        fresh = checkpointing._pinned((2, 3), (3, 1), torch.float32)  # none left: pinned
    assert pinned == [((2, 3), torch.float32)]
    assert kept == [first, second, fresh]
    with checkpointing.captured_host_buffers([first]):
        other = checkpointing._pinned((2, 3), (3, 1), torch.bfloat16)  # not the next's dtype
    assert other is not first and len(pinned) == 2

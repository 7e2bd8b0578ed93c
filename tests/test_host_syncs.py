"""A training step's forward and backward ask the device for nothing once work is queued:
a host-bound step (llama-1b's) loses its launches' lead over the GPU at each such sync
(the loss's row gather was one: docs/benchmarks.md, session 25). Held on the CPU through
sloth_core.testing.host_syncs."""

from __future__ import annotations

import pytest
import torch

from sloth_core import FastLanguageModel
from sloth_core.checkpointing import enable_checkpointing
from sloth_core.patches.lm_head import counted_labels
from sloth_core.testing.host_syncs import HostSyncs
from sloth_core.train.step import accumulate


def test_the_detector_sees_a_read_back_after_a_matmul():
    a = torch.randn(4, 4)
    with HostSyncs() as seen:
        mask = (a > 0).any(1)
        bool(mask.any())  # before any product: the forward's start, no queue to drain
        b = a @ a
        b[mask]  # a boolean index: nonzero underneath
        float(b.sum())
    assert [s.after_matmuls for s in seen.syncs][0] == 0
    assert len(seen.after_work()) >= 2, seen.syncs
    assert all(s.after_matmuls == 1 for s in seen.after_work())


#: The CPU (fp32, the kernels under the interpreter) and, on a GPU machine, CUDA in bf16
#: as the bench trains (flash or cuDNN attention, the offload's copies).
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
])]  # fmt: skip


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def _lora_model(make_tiny_model, device, dtype, arch="llama"):
    model, _ = FastLanguageModel.from_pretrained(
        str(make_tiny_model(arch, tie_word_embeddings=False)), dtype=dtype,
        device_map=None if device == "cpu" else device,
    )  # fmt: skip
    experts = arch == "qwen3_moe"  # LoRA on every expert too
    model = FastLanguageModel.get_peft_model(model, r=4, random_state=0, target_experts=experts)
    enable_checkpointing(model, offload=True)  # as on a GPU (the CPU would not offload)
    return model.train()


@pytest.mark.parametrize("device", DEVICES)
def test_a_lora_training_step_reads_nothing_back_after_its_first_product(make_tiny_model, device):
    """On CUDA in bf16, as the bench trains (flash or cuDNN attention, the offload's
    copies), with torch's own sync check besides."""
    dtype = _dtype(device)
    model = _lora_model(make_tiny_model, device, dtype)
    ids = torch.randint(
        3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt: its rows are cut before the head
    labels[1, -3:] = -100  # and padding
    ids, labels = ids.to(device), labels.to(device)
    for _ in range(2):  # the second step as the first: nothing memoized hides a sync
        with HostSyncs(device) as seen:
            loss = model(input_ids=ids, labels=labels.clone()).loss
            loss.backward()
        assert seen.matmuls > 0
        assert seen.after_work() == [], "\n".join(map(str, seen.after_work()))
    # and the loss is still the counted tokens' mean
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    )
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.detach().float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_a_mixture_of_experts_step_reads_nothing_back_after_its_first_product(
    make_tiny_model, device
):
    """The routed experts (their row schedule made on the device, the grouped GEMMs, LoRA
    on every expert): what a host-bound MoE step (qwen3-30b-a3b at batch 1) and its
    capture as one CUDA graph need."""
    model = _lora_model(make_tiny_model, device, _dtype(device), arch="qwen3_moe")
    ids = torch.randint(
        3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3)
    ).to(device)
    for _ in range(2):
        with HostSyncs(device) as seen:
            model(input_ids=ids, labels=ids).loss.backward()
        assert seen.matmuls > 0
        assert seen.after_work() == [], "\n".join(map(str, seen.after_work()))


@pytest.mark.parametrize("device", DEVICES)
def test_packed_rows_are_found_before_the_first_product(make_tiny_model, device):
    """Packed rows (position ids restarting, as the trainer packs): whether they are
    packed, and on CUDA the flash varlen kernels' sequence bounds, are read at the
    forward's start, not in the first attention layer after its projections."""
    dtype = _dtype(device)
    model = _lora_model(make_tiny_model, device, dtype)
    ids = torch.randint(
        3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2)
    )
    positions = torch.cat([torch.arange(9), torch.arange(15)])[None].expand(2, -1)
    ids = ids.to(device)
    # A first step unwatched: what runs once a process (on CUDA, whether varlen_attn takes
    # fewer key heads as they are: a probe of its own) is not a step's cost.
    model(input_ids=ids, labels=ids, position_ids=positions.to(device).clone()).loss.backward()
    for _ in range(2):
        with HostSyncs(device) as seen:  # fresh position ids each step, as the trainer's
            loss = model(input_ids=ids, labels=ids, position_ids=positions.to(device).clone()).loss
            loss.backward()
        assert seen.after_work() == [], "\n".join(map(str, seen.after_work()))
        assert any("packed" in s.where or "varlen" in s.where for s in seen.syncs), seen.syncs


def test_accumulation_reads_the_loss_back_once(make_tiny_model):
    """Three micro-batches of one optimizer step: their losses are read back together
    after the last backward, not one by one between them."""
    model = _lora_model(make_tiny_model, "cpu", torch.float32)
    draw = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=draw)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    with HostSyncs() as seen:
        loss = accumulate(model, batches)
    # (Each micro-batch's forward starts with reads of its own: transformers' packed-row
    # check, and on the CPU the label count the GPU reads from pinned memory.)
    mine = [s for s in seen.after_work() if s.where.startswith("step.py")]
    assert [s.after_matmuls for s in mine] == [seen.matmuls], seen.syncs
    with torch.no_grad():
        each = [model(**b, num_items_in_batch=torch.tensor(45)).loss for b in batches]
    assert loss == pytest.approx(float(sum(each)), rel=1e-5)


def test_the_label_count_is_kept_on_the_labels_until_they_change():
    """What the forward starts on entry the loss reads back: the shifted loss's count
    (never a row's first label), one per labels tensor, counted again once written."""
    labels = torch.tensor([[-100, 1, 2, -100], [5, -100, 3, 4]])
    first = counted_labels(labels)
    assert first.value() == 4  # 1, 2 and 3, 4: the 5 predicts nothing
    assert counted_labels(labels) is first
    assert counted_labels(labels, ignore_index=1).value() == 5  # another ignore_index
    labels[0, 3] = 7
    assert counted_labels(labels).value() == 5

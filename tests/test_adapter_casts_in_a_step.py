"""A bf16 model's fp32 adapters (PEFT's default) in sloth-kernels' fused projections,
in a step whose layers are offloaded and recomputed: each adapter is cast to bf16 once
a step, not in both the first pass and the recompute, with no autograd cast node
between it and its gradient, and the gradients are those of a step that casts at every
call."""

from __future__ import annotations

import collections
import os

import pytest
import torch
from sloth_kernels import adapter_casts
from sloth_kernels import lora as kernel_lora
from torch.utils._python_dispatch import TorchDispatchMode

from sloth_core import FastLanguageModel
from sloth_core.checkpointing import offloaded_checkpoint
from sloth_core.testing import assert_same_grads, repeated_step_grads

RANK = 4


class _AdapterCasts(TorchDispatchMode):
    """fp32 -> bf16 casts of rank-``RANK`` matrices (the adapters' shapes) and of flat
    tensors (a batch of them), by shape: ``elements`` counts what they cast."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: collections.Counter[tuple[int, ...]] = collections.Counter()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            x = args[0]
            if x.dtype == torch.float32 and kwargs.get("dtype") == torch.bfloat16:
                if (x.dim() == 2 and RANK in x.shape) or x.dim() == 1:
                    self.shapes[tuple(x.shape)] += 1
                    self.elements += x.numel()
        return func(*args, **kwargs)


#: The CPU (the kernels under the interpreter) and, on a GPU machine, CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
])]  # fmt: skip


def _model(make_tiny_model, device="cpu"):
    model, _ = FastLanguageModel.from_pretrained(
        str(make_tiny_model("llama", tie_word_embeddings=False)), dtype=torch.bfloat16,
        device_map=None if device == "cpu" else device,
    )  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, r=RANK, random_state=0)
    return model.train()


@pytest.mark.parametrize("device", DEVICES)
def test_each_adapter_is_cast_once_a_step_and_the_gradients_are_unchanged(
    make_tiny_model, monkeypatch, device
):
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("sloth-kernels serves the CPU under TRITON_INTERPRET=1 only")
    model = _model(make_tiny_model, device)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    with _AdapterCasts() as casts:
        kept = repeated_step_grads(model, offloaded_checkpoint, steps=2)
    # Two steps, each adapter once a step: one at a time in the first, all in one cast of
    # one buffer in the second (the groups the first step asked for).
    assert casts.elements == 2 * sum(p.numel() for p in adapters), casts.shapes
    assert sum(casts.shapes.values()) == len(adapters) + 1, casts.shapes

    # Every call casting afresh (no epoch kept) gives the very same gradients.
    monkeypatch.setattr(kernel_lora, "adapter_copies", adapter_casts._make)
    with _AdapterCasts() as fresh:
        again = repeated_step_grads(_model(make_tiny_model, device), offloaded_checkpoint, steps=2)
    # There the first pass, the recompute and the backward each cast every adapter.
    assert sum(fresh.shapes.values()) >= 3 * 2 * len(adapters), fresh.shapes
    # The same ops on the same values: bitwise on the CPU; cuBLAS may pick another
    # algorithm for a GEMM between the two models, so a rounding's worth there.
    assert_same_grads(kept, again, rtol=0.0 if device == "cpu" else 1e-2)


def test_no_cast_node_sits_between_an_adapter_and_its_gradient(make_tiny_model):
    model = _model(make_tiny_model)
    adapters = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=generator)
    loss = model(input_ids=ids, labels=ids).loss
    # Which nodes hand each adapter its gradient.
    feeding: collections.defaultdict[int, set[str]] = collections.defaultdict(set)
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for next_fn, _ in node.next_functions:
            variable = getattr(next_fn, "variable", None)
            if variable is not None and id(variable) in adapters:
                feeding[id(variable)].add(type(node).__name__)
            stack.append(next_fn)
    assert feeding.keys() == adapters  # every adapter gets a gradient
    assert all("ToCopyBackward0" not in names for names in feeding.values()), feeding

"""30 LoRA steps of the patched and the unpatched tiny llama on the bundled instruction
data: the per-step losses agree within ``CONVERGENCE_RTOL`` and fall."""

from __future__ import annotations

import pytest
import torch

from sloth_core.testing import installed_manager, tiny_config
from sloth_core.testing.convergence import assert_converges_alike


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_patched_llama_trains_like_the_unpatched_one(kernels):
    if kernels == "triton" and not torch.cuda.is_available():
        # ~400 s under Triton's interpreter; test_llama_parity covers the kernels there.
        pytest.skip("30 steps of Triton kernels need a GPU (the interpreter is too slow)")
    manager = installed_manager("sloth-llama")
    unpatched, patched = assert_converges_alike(
        tiny_config("llama"), manager=manager, kernels=kernels
    )
    assert len(unpatched) == len(patched) == 30

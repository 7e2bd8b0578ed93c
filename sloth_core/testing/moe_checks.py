"""What every mixture-of-experts architecture plugin checks, beside the dense checks.

:func:`check_moe_parity` runs :func:`~sloth_core.testing.plugin_checks.check_plugin_parity`
in one of the LoRA layouts of :data:`MOE_LORA` (every linear and every expert weight
through PEFT's ``target_parameters``; attention only) and checks the expert gradients
were compared when experts carry LoRA. :data:`ROUTER_LOSS` puts the router's
load-balancing loss in the compared loss, at a coefficient off its default.
:func:`assert_checkpointing_parity` compares loss and LoRA gradients of the patched and
unpatched model under gradient checkpointing, where the patched blocks are run twice.
"""

from __future__ import annotations

from typing import Any

import torch

from .models import init_tiny_model
from .parity import attach_lora, kernels_mode
from .plugin_checks import check_plugin_parity

__all__ = ["MOE_LORA", "ROUTER_LOSS", "assert_checkpointing_parity", "check_moe_parity"]

#: LoRA layouts of the parity runs: every linear and every expert weight; attention only.
MOE_LORA: dict[str, dict[str, Any]] = {
    "experts": {},
    "attention": {"expert_lora": False, "lora_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}
#: Config overrides that put the router loss in the compared loss (coefficient 0.05, off
#: transformers' 0.001).
ROUTER_LOSS: dict[str, Any] = {"output_router_logits": True, "router_aux_loss_coef": 0.05}


def check_moe_parity(
    manager: Any, config: Any, *, patched: dict[str, int], lora: str = "experts", **options: Any
):
    """Parity of ``config`` (torch references, ``sloth_attention`` unless ``options`` say
    otherwise) with LoRA as :data:`MOE_LORA` ``[lora]``; the report must count ``patched``."""
    options.setdefault("attn_implementation", "sloth_attention")
    options.setdefault("kernels", "torch")
    report = check_plugin_parity(manager, config, **MOE_LORA[lora], **options)
    assert report.patched == patched, report.patched
    expert_grads = [c.name for c in report.checks if c.name.startswith("grad experts")]
    assert bool(expert_grads) == (lora == "experts"), expert_grads
    return report


def assert_checkpointing_parity(
    manager: Any, config: Any, *, seed: int = 1, kernels: str = "torch"
) -> None:
    """Loss and every LoRA gradient (experts included) of the patched model equal the
    unpatched model's with gradient checkpointing on (the blocks recomputed in backward);
    ``kernels`` as :func:`~sloth_core.testing.parity.kernels_mode` takes it."""
    with kernels_mode(kernels):
        _checkpointing_parity(manager, config, seed)


def _checkpointing_parity(manager: Any, config: Any, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=generator)
    results = []
    for patch in (False, True):
        model = attach_lora(init_tiny_model(config), r=4, seed=0)
        if patch:
            manager.patch_layers(model=model)
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    assert grads.keys() == grads_ref.keys() and any("experts" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-6, rtol=1e-4)

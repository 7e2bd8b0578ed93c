"""How many matmul weights one token multiplies: the FLOPs a forward costs per token.

A token's forward through a linear map of ``n`` weights costs ``2 n`` FLOPs. Counting a
module's parameters overstates a mixture of experts: each token runs ``top_k`` of the
``E`` experts (``num_experts_per_tok`` of the config), so an expert stack
``[E, out, in]`` costs a token ``top_k / E`` of its weights, and so do the LoRA adapters
PEFT puts on such a stack (``target_parameters``: a ``ParamWrapper`` whose ``lora_A`` and
``lora_B`` hold every expert's rank, ``r x E`` wide). The benches' MFU and the memory
planner's recompute cost both count this way.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["matmul_params_per_token"]


def _numel(weight: torch.Tensor) -> int:
    """The weights a matmul multiplies: a 4-bit weight packs two a byte (its quant state
    keeps the real shape)."""
    state = getattr(weight, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else weight.numel()


def _expert_adapters(module: nn.Module, top_k: int) -> dict[int, float]:
    """``id(linear) -> top_k / E`` for the adapters of PEFT's wrappers of expert stacks."""
    share: dict[int, float] = {}
    for m in module.modules():
        experts = getattr(m, "num_experts", None)
        if not hasattr(m, "parameter_name") or not isinstance(experts, int) or experts < 1:
            continue
        for name in ("lora_A", "lora_B"):
            for linear in getattr(m, name, {}).values():
                share[id(linear)] = min(top_k / experts, 1.0)
    return share


def matmul_params_per_token(module: nn.Module, top_k: int | None = None) -> float:
    """The matmul weights of ``module`` one token runs through.

    Every ``nn.Linear``'s weight (LoRA's ``lora_A``/``lora_B`` included, a 4-bit one at its
    unpacked size), plus each 3-D expert stack ``[E, ...]`` at ``top_k / E`` of its size
    and the adapters on such stacks likewise. ``top_k``: the experts a token runs
    (``config.num_experts_per_tok``); ``None`` for a dense model, whose 3-D parameters, if
    any, are not counted.
    """
    share = _expert_adapters(module, top_k) if top_k else {}
    total = 0.0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += _numel(m.weight) * share.get(id(m), 1.0)
    if top_k:
        total += sum(p.numel() * min(top_k / p.shape[0], 1.0)
                     for p in module.parameters() if p.dim() == 3)  # fmt: skip
    return total

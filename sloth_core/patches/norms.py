"""RMSNorm modules routed through the ``rms_norm`` op."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sloth_core.patching import bind_forward

if TYPE_CHECKING:
    from sloth_core.ops import OpRegistry


def rms_norm_eps(module: torch.nn.Module) -> float:
    """The epsilon of an RMSNorm module: ``variance_epsilon`` (Llama, Mistral, Qwen) or ``eps``.

    Raises:
        ValueError: the module has neither attribute (not an RMSNorm transformers writes).
    """
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise ValueError(f"{type(module).__name__} has no variance_epsilon or eps")


def patch_rms_norm(
    module: torch.nn.Module,
    ops: OpRegistry,
    *,
    gemma: bool = False,
    cast_after_weight: bool = False,
) -> bool:
    """Route ``module``'s forward through ``ops.rms_norm``; ``False`` if it was patched already.

    Args:
        module: an RMSNorm with a ``weight`` ``[D]`` and ``variance_epsilon`` or ``eps``.
        ops: the op registry.
        gemma: the ``1 + weight`` variant (``GemmaRMSNorm``), normalised and scaled in fp32.
        cast_after_weight: scaled by ``weight`` in fp32 before the cast to the input dtype
            (``GptOssRMSNorm``); passed to the op only when set, so a kernel set that does
            not know the keyword still serves the other norms.

    Raises:
        ValueError: the module has no 1-D ``weight``, has a ``bias`` (a LayerNorm), or has
            no epsilon: it is not an RMSNorm, and routing it through ``rms_norm`` would be
            wrong.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"{type(module).__name__} has no 1-D weight: not an RMSNorm")
    if getattr(module, "bias", None) is not None:
        raise ValueError(
            f"{type(module).__name__} has a bias: a LayerNorm, which rms_norm does not compute"
        )
    eps = rms_norm_eps(module)

    # The weight is read at call time: it may be replaced (loading, casting) after patching.
    options = {"cast_after_weight": True} if cast_after_weight else {}

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(hidden_states, self.weight, eps, gemma=gemma, **options)

    return bind_forward(module, forward)

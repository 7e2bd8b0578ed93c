"""Undo bitsandbytes' CPU inference repacking of 4-bit weights before anything trains.

bitsandbytes (0.49 and later) speeds up CPU inference on processors with AVX512-BF16:
the first ``Linear4bit`` forward in eval mode on an input without grad (``model.eval()``
and ``torch.no_grad()``, e.g. an evaluation or a ``generate`` call) repacks the weight in
place for its fused kernel (``_convert_weight_packed_for_cpu``): the nibbles are
reordered, double-quantized absmax are expanded, transposed and rounded to bf16, and
``quant_state.packing_format_for_cpu`` is set. Nothing converts the weight back when the
model returns to training, and a packed weight is multiplied by ``gemv_4bit``, which has
no backward: input gradients stop at every 4-bit layer, so LoRA gradients come out
wrong, silently (and sloth's own LoRA ops, which dequantize the weight themselves,
refuse the packed layout). bitsandbytes' own inverse re-quantizes the bf16-rounded absmax,
so even the weights it restores differ from the loaded ones.

:func:`guard_cpu_layout` keeps the repacking for inference and makes it harmless: just
before bitsandbytes repacks a weight, its ``QuantState`` fields are remembered (a few
references, no copy: the repacking replaces them rather than writing into them); as soon
as the layer, or the whole model, runs in training mode or with gradients, the nibble
order is undone (a lossless permutation) and the remembered fields are put back, so the
weight is bit for bit the loaded one.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

#: Where a Linear4bit keeps its ``QuantState`` fields from before the repacking.
_SAVED = "_sloth_bnb_cpu_state"
_GUARDED = "_sloth_bnb_cpu_guard"


def _linear4bit_class() -> type | None:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - a dependency of the distribution
        return None
    return bnb.nn.Linear4bit


def _is_packed(state: Any) -> bool:
    return state is not None and bool(state.__dict__.get("packing_format_for_cpu", False))


def _packed_weight_inverse(data: torch.Tensor, state: Any) -> torch.Tensor:
    """The weight in bitsandbytes' standard layout; ``state`` is left untouched."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    scratch = object.__new__(type(state))
    scratch.__dict__.update(state.__dict__)
    scratch.original_nested = False  # the absmax come back from the snapshot instead
    weight, _ = _convert_weight_packed_for_cpu_inverse(data, scratch)
    return weight


@torch.no_grad()
def restore_layout(module: torch.nn.Module) -> bool:
    """Put one ``Linear4bit``'s weight back in the standard layout; ``True`` if it was packed.

    Bit-exact when :func:`guard_cpu_layout` saw the repacking; otherwise bitsandbytes'
    own inverse (double-quantized absmax re-quantized from bf16) with a warning.
    """
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if weight is None or state is None or not _is_packed(state):
        module.__dict__.pop(_SAVED, None)
        return False
    saved = module.__dict__.pop(_SAVED, None)
    if saved is None:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        warnings.warn(
            f"{type(module).__name__}: a 4-bit weight was repacked for CPU inference before "
            "sloth-bnb's guard was installed; bitsandbytes' inverse restores it with "
            "bf16-rounded block scales",
            stacklevel=2,
        )
        weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        return True
    data = _packed_weight_inverse(weight.data, state)
    # In place: the module, its weight and any LoRALinear lifted from it share the object.
    state.__dict__.clear()
    state.__dict__.update(saved)
    weight.data = data
    return True


def restore_cpu_layout(model: torch.nn.Module) -> int:
    """Put every repacked 4-bit weight of ``model`` back in the standard layout.

    Returns:
        how many weights were repacked.
    """
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    return sum(restore_layout(m) for m in model.modules() if isinstance(m, linear4bit))


def _inference_call(module: torch.nn.Module, x: torch.Tensor) -> bool:
    # bitsandbytes' own condition for the repacking (Linear4bit.forward, 0.49-0.50).
    return x.device.type == "cpu" and not module.training and not x.requires_grad


class CpuLayoutGuard:
    """The hooks :func:`guard_cpu_layout` installs on one model (plain data: deep-copies)."""

    def __init__(self, root: torch.nn.Module) -> None:
        self.root = root
        self.repacked = 0  # weights repacked since the last restore of the whole model

    def before_linear(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook of each Linear4bit: remember before a repack, restore before
        a training (or gradient-taking) call."""
        if not args or not isinstance(args[0], torch.Tensor):
            return
        state = getattr(module.weight, "quant_state", None)
        if state is None:
            return
        inference = _inference_call(module, args[0])
        if _is_packed(state):
            if not inference:
                restore_layout(module)
        elif inference and getattr(module, "support_avx512bf16_for_cpu", False):
            # bitsandbytes repacks in the forward that follows this hook.
            module.__dict__[_SAVED] = dict(state.__dict__)
            self.repacked += 1

    def before_model(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook of the model: after a switch back to training (or a call with
        gradients), restore every repacked weight before any layer runs. Needed where a
        patched forward reads the 4-bit weight without calling ``Linear4bit.forward``."""
        if self.repacked and (module.training or torch.is_grad_enabled()):
            restore_cpu_layout(self.root)
            self.repacked = 0


def _state_dict_pre_hook(module: torch.nn.Module, prefix: str, keep_vars: bool) -> None:
    # Before Linear4bit._save_to_state_dict, whose own inverse is not bit-exact.
    restore_layout(module)


def guard_cpu_layout(model: torch.nn.Module) -> CpuLayoutGuard | None:
    """Install the guard on ``model``'s ``Linear4bit`` layers; idempotent.

    Returns:
        the guard, or ``None`` when bitsandbytes has no CPU repacking (before 0.49) or
        ``model`` has no 4-bit layer.
    """
    import bitsandbytes.functional as bnb_functional

    linear4bit = _linear4bit_class()
    if linear4bit is None or not hasattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse"):
        return None
    existing = model.__dict__.get(_GUARDED)
    if existing is not None:
        return existing
    layers = [m for m in model.modules() if isinstance(m, linear4bit)]
    if not layers:
        return None
    guard = CpuLayoutGuard(model)
    for layer in layers:
        layer.register_forward_pre_hook(guard.before_linear)
        layer.register_state_dict_pre_hook(_state_dict_pre_hook)
    # PEFT calls the model through __call__, and a Hugging Face causal LM calls its
    # backbone (``base_model``) so; hooking both covers a caller that uses either.
    roots = {id(model): model}
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, torch.nn.Module):
        roots[id(backbone)] = backbone
    for root in roots.values():
        root.register_forward_pre_hook(guard.before_model)
    model.__dict__[_GUARDED] = guard
    return guard

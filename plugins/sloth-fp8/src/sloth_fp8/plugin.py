"""Hook implementations of sloth-fp8; the entry point names this module.

``quantize`` serves ``fp8``: the model loads in its 16-bit dtype as always, then
``finalize`` turns every linear layer but the output layer into an :class:`Fp8Linear`
(e4m3 values, one scale per row: :mod:`sloth_fp8.linear`) and stores a mixture-of-experts
model's 3-D expert weights in e4m3 with row scales too (:func:`convert_experts`; sloth's
``moe_experts`` op multiplies them dequantized, a layer at a time). LoRA, the norms, the
embeddings, the router, the output layer and the loss stay in the load dtype.
"""

from __future__ import annotations

from typing import Any

from sloth_core import hookimpl
from sloth_core.sdk import ModelSpec, QuantizationMethod, QuantizationPlan

PLUGIN = "sloth-fp8"
METHOD = "fp8"


@hookimpl
def register_quantizers(register):
    """Declare ``fp8`` (alias ``fp8_e4m3``)."""
    register(
        QuantizationMethod(
            METHOD,
            "frozen base weights in FP8 e4m3 with row scales, FP8 matmuls (LoRA)",
            aliases=("fp8_e4m3",),
            bytes_per_weight=1.0,
        )
    )


def finalize(model: Any) -> Any:
    """Run once on the loaded model: its linear layers and its experts' 3-D weights (a
    mixture-of-experts model's) to FP8."""
    from .linear import convert_experts, convert_linears

    if not convert_linears(model) + convert_experts(model):
        raise ValueError(f"{type(model).__name__}: no linear layer to store in FP8")
    return model


@hookimpl
def quantize(spec: ModelSpec) -> QuantizationPlan | None:
    """Plan ``fp8`` loading; ``None`` for other methods."""
    if spec.quantization not in (METHOD, "fp8_e4m3"):
        return None
    return QuantizationPlan(method=METHOD, provider=PLUGIN, load_kwargs={}, finalize=finalize)

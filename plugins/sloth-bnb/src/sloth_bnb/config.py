"""The methods sloth-bnb serves and the ``BitsAndBytesConfig`` each one loads with.

transformers quantizes each weight as it streams in from the checkpoint (on the device of
``device_map``; the GPU when there is one), so an 8B model in 4-bit never exists in
16-bit on the GPU: at most one tensor at a time does.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig

#: method -> description, as ``sloth plugins list`` shows them.
METHODS = {
    "nf4": "4-bit NormalFloat (QLoRA), double quantization, bf16 compute",
    "fp4": "4-bit float, double quantization, bf16 compute",
    "int8": "8-bit LLM.int8() with outlier decomposition",
}
#: Bytes per weight on disk and in memory: 4 bits plus a scale per block of 64 weights
#: (double quantization keeps it near 0.5 bits), 8 bits plus the outlier columns.
BYTES_PER_WEIGHT = {"nf4": 0.57, "fp4": 0.57, "int8": 1.07}
#: ``BitsAndBytesConfig`` fields a caller may pass through ``from_pretrained(**kwargs)``
#: (they are taken out of the load keywords and into the quantization config).
OPTION_PREFIXES = ("bnb_4bit_", "llm_int8_")


def _dtype(value: Any) -> Any:
    import torch

    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"bnb_4bit_compute_dtype: unknown dtype {value!r}")
    return value


def bnb_config(
    method: str, *, compute_dtype: torch.dtype | str | None = None, **options: Any
) -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` of ``method``.

    Args:
        method: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        compute_dtype: the dtype 4-bit matmuls run in; ``torch.bfloat16`` by default.
        **options: further ``BitsAndBytesConfig`` fields (``bnb_4bit_use_double_quant``,
            ``bnb_4bit_quant_storage``, ``llm_int8_skip_modules``, ...); they override
            the defaults (4-bit: double quantization on).

    Raises:
        ValueError: an unknown method, or an option ``BitsAndBytesConfig`` does not take.
    """
    import torch
    from transformers import BitsAndBytesConfig

    if method not in METHODS:
        raise ValueError(
            f"sloth-bnb: unknown quantization method {method!r}; choose one of {', '.join(METHODS)}"
        )
    accepted = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"sloth-bnb: BitsAndBytesConfig takes no option {', '.join(unknown)}")
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **options)
    fields: dict[str, Any] = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": method,
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": _dtype(compute_dtype) or torch.bfloat16,
    }
    fields.update(options)
    if "bnb_4bit_compute_dtype" in options:
        fields["bnb_4bit_compute_dtype"] = _dtype(options["bnb_4bit_compute_dtype"])
    return BitsAndBytesConfig(**fields)


def take_options(extra: dict[str, Any]) -> dict[str, Any]:
    """Remove the ``BitsAndBytesConfig`` fields from ``extra`` and return them."""
    names = [name for name in extra if name.startswith(OPTION_PREFIXES)]
    return {name: extra.pop(name) for name in names}

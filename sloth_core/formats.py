"""What an export format or quantization method says about itself when its plugin registers it.

A plugin passes an :class:`ExportFormat` to ``register_exporters``' ``register`` (and a
:class:`QuantizationMethod` to ``register_quantizers``'): its names, the weight types it
writes with their size and verify tolerance, the extra its verifier needs, and the
function that reloads and checks what it wrote. The core keeps no table of formats: the
CLI's help, ``sloth plugins list``, ``sloth train``'s option checks, the free-space check
and ``--verify`` all read these descriptors, so a new format needs no core edit.

The 16- and 32-bit float types (:data:`FLOAT_TYPES`) are the exception: they are torch's
dtypes, which every format that writes unquantized weights shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

__all__ = [
    "FLOAT_TYPES",
    "UNKNOWN_TOLERANCE",
    "ExportFormat",
    "QuantizationMethod",
    "Tolerance",
    "WeightType",
    "estimate_export_bytes",
    "float_type",
]


@dataclass(frozen=True)
class Tolerance:
    """How far an export of one weight type may drift from the in-memory model.

    ``max_rel``: the largest allowed max-abs / max-|reference| logit ratio, or ``None``
    where it is reported only; ``min_top1``: the least share of agreeing top-1 predictions
    at the confident positions (at every position when there are too few of those).
    """

    max_rel: float | None
    min_top1: float


#: A weight type that declares no tolerance: judged by top-1 agreement alone.
UNKNOWN_TOLERANCE = Tolerance(None, 0.9)


@dataclass(frozen=True)
class WeightType:
    """One weight type a format writes (its ``quantization`` option's values).

    :param bytes_per_weight: the size on disk per weight, block scales included (q8_0 is
        34 bytes per 32 weights: 1.07), for the free-space check; ``None``: unknown (the
        check assumes 2).
    :param tolerance: how close ``--verify`` requires the reloaded export to be.
    :param aliases: other spellings users type (``q8`` for ``q8_0``), matched without case.
    """

    name: str
    bytes_per_weight: float | None = None
    tolerance: Tolerance = UNKNOWN_TOLERANCE
    aliases: tuple[str, ...] = ()
    description: str = ""

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


#: torch's float dtypes as weight types: what an unquantized export is judged by. 16- and
#: 32-bit exports must match closely; bf16 keeps 8 bits of mantissa, so less closely.
FLOAT_TYPES: tuple[WeightType, ...] = (
    WeightType("f32", 4.0, Tolerance(1e-3, 0.99), ("float32", "fp32"), "float32"),
    WeightType("f16", 2.0, Tolerance(2e-3, 0.99), ("float16", "fp16"), "float16"),
    WeightType("bf16", 2.0, Tolerance(1e-2, 0.97), ("bfloat16",), "bfloat16"),
)


def _find(types: Iterable[WeightType], name: str | None) -> WeightType | None:
    key = (name or "").lower().removeprefix("torch.")
    return next((t for t in types if key in (n.lower() for n in t.names())), None)


def float_type(name: str | None) -> WeightType | None:
    """The float weight type ``name`` spells (``"torch.bfloat16"``, ``"F16"``), if any."""
    return _find(FLOAT_TYPES, name)


#: ``verify(request) -> VerifyReport``: reload what was written and compare it with the model
#: in memory (:mod:`sloth_core.verify` has the request, the report and the helpers).
Verifier = Callable[[Any], Any]


@dataclass(frozen=True)
class ExportFormat:
    """An export format, as its plugin declares it.

    :param quantizations: the weight types the format's ``quantization`` option takes
        (``()``: none; ``None``: not declared, so any value passes to the exporter).
    :param default_quantization: the one written when none is asked for.
    :param wraps: the format this one writes through (Ollama through ``gguf``): its
        quantizations, sizes and verifier are the wrapped format's unless given here.
    :param verify: reloads the export and checks it (``sloth export --verify``); ``None``:
        the format cannot be verified (or, with ``wraps``, the wrapped one's verifier).
    :param verify_needs: what to install for the verifier when it reports itself unable
        (``pip install 'sloth-gguf[llama-cpp]'``), shown by ``sloth plugins list``.
    """

    name: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    quantizations: tuple[WeightType, ...] | None = None
    default_quantization: str | None = None
    wraps: str | None = None
    verify: Verifier | None = None
    verify_needs: str = ""
    #: ``estimate_bytes(model, options) -> int``, where the format writes something other
    #: than every weight at its weight type's size (the LoRA adapter alone).
    estimate_bytes: Callable[[Any, dict[str, Any]], int] | None = None
    #: the plugin that registered it (set by the plugin manager)
    plugin: str = field(default="", compare=False)

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def weight_type(self, name: str | None) -> WeightType | None:
        """The declared weight type ``name`` spells (aliases and case allowed), else a float
        type (``f16``, ``torch.bfloat16``), else ``None``."""
        return _find(self.quantizations or (), name) or float_type(name)

    def quantization_names(self) -> tuple[str, ...] | None:
        return None if self.quantizations is None else tuple(q.name for q in self.quantizations)

    def quantization_label(self) -> str:
        """The weight types and the default for listings (``"f16, q8_0; default q8_0"``);
        ``""`` when the format declares none."""
        types = ", ".join(self.quantization_names() or ())
        if types and self.default_quantization:
            return f"{types}; default {self.default_quantization}"
        return types


@dataclass(frozen=True)
class QuantizationMethod:
    """A quantization method a ``quantize`` hook serves (``nf4``, ``int8``, ...).

    :param bytes_per_weight: the loaded model's bytes per quantized weight.
    """

    name: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    bytes_per_weight: float | None = None
    plugin: str = field(default="", compare=False)

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def _weights(model: Any) -> int:
    total = 0
    for p in model.parameters():
        # A bitsandbytes 4-bit parameter packs two weights per uint8 element.
        packed = p.dtype.itemsize == 1 and not p.is_floating_point() and hasattr(p, "quant_state")
        total += p.numel() * (2 if packed else 1)
    return total


def estimate_export_bytes(model: Any, format: ExportFormat, options: dict[str, Any]) -> int:
    """About how many bytes ``format`` writes for ``model``, for the free-space check: every
    weight at the size of the weight type asked for (or the format's default), at the
    ``dtype`` option's width, or at the model's own float width; 2 bytes when unknown."""
    if not hasattr(model, "parameters"):
        return 0
    if format.estimate_bytes is not None:
        return int(format.estimate_bytes(model, options))
    dtype = options.get("dtype")
    wanted = options.get("quantization") or format.default_quantization
    declared = format.weight_type(wanted) if wanted else None
    if dtype is not None and hasattr(dtype, "itemsize"):
        width = float(dtype.itemsize)
    elif declared is not None and declared.bytes_per_weight is not None:
        width = declared.bytes_per_weight
    elif wanted:
        width = 2.0  # a type the format did not size
    else:
        floats = [p.dtype.itemsize for p in model.parameters() if p.is_floating_point()]
        width = float(max(floats, default=2))
    return int(_weights(model) * width)


def as_weight_types(values: Iterable[WeightType | str]) -> tuple[WeightType, ...]:
    """``quantizations=`` as given: descriptors, or bare names (size and tolerance unknown)."""
    return tuple(v if isinstance(v, WeightType) else WeightType(str(v)) for v in values)


_Descriptor = TypeVar("_Descriptor", ExportFormat, QuantizationMethod)


def with_plugin(descriptor: _Descriptor, plugin: str) -> _Descriptor:
    return replace(descriptor, plugin=plugin)

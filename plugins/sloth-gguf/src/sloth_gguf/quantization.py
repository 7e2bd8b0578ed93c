"""The quantization types of the ``gguf`` export and the storage type of each tensor.

Types written by the ``gguf`` package alone (numpy, no llama.cpp): ``f32``, ``f16``,
``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``. The k-quants go through
llama.cpp's own quantizer (``llama-cpp-python``), from a 16-bit GGUF written first.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from sloth_core.sdk import FLOAT_TYPES, Tolerance, WeightType

__all__ = ["DEFAULT_QUANTIZATION", "QUANTIZATIONS", "Quantization", "resolve_quantization"]

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


@dataclass(frozen=True)
class Quantization:
    name: str
    file_type: gguf.LlamaFileType
    #: The type of the quantized weights, for types the gguf package writes itself.
    tensor_type: gguf.GGMLQuantizationType | None
    description: str
    #: Rough bits per weight of the result, for the free-space check.
    bits: float
    #: How close ``--verify`` requires llama.cpp's logits to be (see ``_TOLERANCES``).
    tolerance: Tolerance
    aliases: tuple[str, ...] = ()

    @property
    def needs_llama_cpp(self) -> bool:
        return self.tensor_type is None

    @property
    def weight_type(self) -> WeightType:
        """This type as the core's descriptor: size, tolerance and other spellings."""
        return WeightType(self.name, self.bits / 8, self.tolerance, self.aliases, self.description)


_FLOAT = {t.name: t for t in FLOAT_TYPES}


def _tolerance(name: str) -> Tolerance:
    """16-bit and 8-bit files must match closely; from 5 bits down the logits' error is
    large and the top-1 agreement carries the verdict (llama.cpp measures 92% to 95% same
    top-1 over every Wikitext position at q4_k_m for Llama 2 7B and Llama 3 8B)."""
    if name in _FLOAT:
        return _FLOAT[name].tolerance
    if name == "q8_0":
        return Tolerance(3e-2, 0.95)
    if name == "q6_k":
        return Tolerance(6e-2, 0.93)
    if name.startswith("q5"):
        return Tolerance(0.12, 0.9)
    if name.startswith("q4"):
        return Tolerance(None, 0.9)
    if name.startswith("q3"):
        return Tolerance(None, 0.8)
    return Tolerance(None, 0.7)


#: Shorter spellings users type, as llama.cpp's tools and other libraries take them.
_ALIASES = {
    **{t.name: t.aliases for t in FLOAT_TYPES},
    "q8_0": ("q8",), "q6_k": ("q6",), "q5_k_m": ("q5_k",), "q4_k_m": ("q4_k",),
    "q3_k_m": ("q3_k",),
}  # fmt: skip


def _q(name: str, file_type, tensor_type, description: str, bits: float) -> Quantization:
    return Quantization(
        name, file_type, tensor_type, description, bits, _tolerance(name), _ALIASES.get(name, ())
    )


#: Half the size of f16, near lossless, and written without llama.cpp: the default, as in
#: Unsloth's ``save_pretrained_gguf``.
DEFAULT_QUANTIZATION = "q8_0"

QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q
    for q in (
        _q("f32", F.ALL_F32, Q.F32, "float32, lossless", 32),
        _q("f16", F.MOSTLY_F16, Q.F16, "float16", 16),
        _q("bf16", F.MOSTLY_BF16, Q.BF16, "bfloat16", 16),
        _q("q8_0", F.MOSTLY_Q8_0, Q.Q8_0, "8-bit blocks, near lossless (default)", 8.5),
        _q("q5_1", F.MOSTLY_Q5_1, Q.Q5_1, "5-bit blocks with offsets", 6),
        _q("q5_0", F.MOSTLY_Q5_0, Q.Q5_0, "5-bit blocks", 5.5),
        _q("q4_1", F.MOSTLY_Q4_1, Q.Q4_1, "4-bit blocks with offsets", 5),
        _q("q4_0", F.MOSTLY_Q4_0, Q.Q4_0, "4-bit blocks", 4.5),
        _q("q6_k", F.MOSTLY_Q6_K, None, "6-bit k-quant (llama-cpp-python)", 6.6),
        _q("q5_k_m", F.MOSTLY_Q5_K_M, None, "5-bit k-quant, medium (llama-cpp-python)", 5.7),
        _q("q5_k_s", F.MOSTLY_Q5_K_S, None, "5-bit k-quant, small (llama-cpp-python)", 5.5),
        _q("q4_k_m", F.MOSTLY_Q4_K_M, None, "4-bit k-quant, medium (llama-cpp-python)", 4.9),
        _q("q4_k_s", F.MOSTLY_Q4_K_S, None, "4-bit k-quant, small (llama-cpp-python)", 4.6),
        _q("q3_k_l", F.MOSTLY_Q3_K_L, None, "3-bit k-quant, large (llama-cpp-python)", 4.3),
        _q("q3_k_m", F.MOSTLY_Q3_K_M, None, "3-bit k-quant, medium (llama-cpp-python)", 3.9),
        _q("q3_k_s", F.MOSTLY_Q3_K_S, None, "3-bit k-quant, small (llama-cpp-python)", 3.5),
        _q("q2_k", F.MOSTLY_Q2_K, None, "2-bit k-quant (llama-cpp-python)", 3.4),
    )
}


def resolve_quantization(name: str | None) -> Quantization:
    """The type ``name`` spells (an alias, any case); the default for ``None``."""
    key = (name or DEFAULT_QUANTIZATION).lower()
    for quant in QUANTIZATIONS.values():
        if key == quant.name or key in quant.aliases:
            return quant
    raise ValueError(
        f"unknown GGUF quantization {name!r}; choose one of: {', '.join(QUANTIZATIONS)}"
    )


# The 4- and 5-bit block types hurt most in the output projection; llama.cpp's quantizer
# keeps it at 6 bits (q6_k), which numpy cannot write: q8_0 here.
_OUTPUT_AT_8_BITS = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}


def tensor_type(
    gguf_name: str, shape: tuple[int, ...], weights: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    """The storage type of one tensor when the weights are ``weights``.

    Vectors, norms and the experts' router (``ffn_gate_inp``) stay float32, as llama.cpp's
    converter and quantizer keep them; a matrix whose rows do not split into whole blocks
    falls back to f16, as llama.cpp's converter does.
    """
    if len(shape) <= 1 or gguf_name.endswith(("_norm.weight", "ffn_gate_inp.weight")):
        return Q.F32
    if weights in (Q.F32, Q.F16, Q.BF16):
        return weights
    if gguf_name == "output.weight" and weights in _OUTPUT_AT_8_BITS:
        weights = Q.Q8_0
    block_size = gguf.GGML_QUANT_SIZES[weights][0]
    return weights if shape[-1] % block_size == 0 else Q.F16


def stored_shape_and_dtype(
    shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType
) -> tuple[tuple[int, ...], np.dtype]:
    """The numpy shape and dtype gguf's writer takes for a tensor stored as ``qtype``."""
    if qtype == Q.F32:
        return shape, np.dtype(np.float32)
    if qtype == Q.F16:
        return shape, np.dtype(np.float16)
    return tuple(gguf.quant_shape_to_byte_shape(shape, qtype)), np.dtype(np.uint8)


def stored_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    stored, dtype = stored_shape_and_dtype(shape, qtype)
    return int(np.prod(stored, dtype=np.int64)) * dtype.itemsize


def quantize_array(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """``data`` (float32) stored as ``qtype``."""
    if qtype == Q.F16 and data.size and float(np.abs(data).max()) > np.finfo(np.float16).max:
        raise ValueError(
            "a weight is beyond float16's range (65504); export with quantization='bf16' "
            "or 'f32' instead"
        )
    return gguf.quants.quantize(data, qtype)

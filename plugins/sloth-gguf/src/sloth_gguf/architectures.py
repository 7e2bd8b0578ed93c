"""What llama.cpp expects of each model type: its GGUF architecture, metadata and tensors.

Tensor names come from gguf's own ``TensorNameMap`` (the table llama.cpp's converter uses);
this module adds what differs per architecture, following llama.cpp's
``convert_hf_to_gguf.py``: the q/k row permutation of llama-style rope, Gemma's ``1 + w``
norms, the rope scaling tensors, and the metadata keys llama.cpp reads when it loads.

Mixtures of experts: transformers holds each layer's experts as 3-D parameters,
``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows first, then up) and
``mlp.experts.down_proj`` ``[E, H, I]``; llama.cpp wants ``ffn_gate_exps`` and
``ffn_up_exps`` ``[E, I, H]`` and ``ffn_down_exps`` ``[E, H, I]`` (in torch's order), the
router as ``ffn_gate_inp``, and the expert counts as metadata. Qwen3-MoE is llama.cpp's
``qwen3moe``; Mixtral its ``llama`` with experts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import torch

__all__ = ["ARCHITECTURES", "REFUSED", "Architecture", "architecture_for"]


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face ``model_type`` becomes a llama.cpp model."""

    gguf_arch: gguf.MODEL_ARCH
    #: llama.cpp's "normal" rope rotates adjacent pairs (2i, 2i+1) while Hugging Face's
    #: rotates (i, i + d/2): the q/k rows of each head are interleaved to match.
    permute_qk: bool = False
    #: Gemma's RMSNorm scales by ``1 + w``; llama.cpp's by ``w``.
    norm_offset: float = 0.0
    activations: tuple[str, ...] = ("silu",)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Architecture(gguf.MODEL_ARCH.QWEN3),
    "gemma": Architecture(gguf.MODEL_ARCH.GEMMA, norm_offset=1.0, activations=_GELU_TANH),
    "gemma2": Architecture(gguf.MODEL_ARCH.GEMMA2, norm_offset=1.0, activations=_GELU_TANH),
    "gemma3_text": Architecture(gguf.MODEL_ARCH.GEMMA3, norm_offset=1.0, activations=_GELU_TANH),
    "phi3": Architecture(gguf.MODEL_ARCH.PHI3),
    "qwen3_moe": Architecture(gguf.MODEL_ARCH.QWEN3MOE),
    "mixtral": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
}
#: Model types sloth knows but does not write as GGUF, and what to do instead.
REFUSED = {
    "gpt_oss": (
        "gpt_oss: sloth does not write gpt-oss as GGUF (llama.cpp's gpt-oss files keep the "
        "experts in MXFP4 and need its attention sinks and clamped SwiGLU, which this "
        "exporter does not produce); export --format merged_16bit (or lora) instead, and "
        "convert that folder with llama.cpp's convert_hf_to_gguf.py if you need a GGUF"
    ),
}


def architecture_for(config: Any) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise ValueError(REFUSED[model_type])
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"GGUF export does not support model_type {model_type!r}; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The rope settings of ``layer_type`` layers, from transformers 5's ``rope_parameters``
    (per layer type for Gemma 3) or the older ``rope_theta``/``rope_scaling`` fields."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params or "sliding_attention" in params:
        params = dict(params.get(layer_type) or params.get("full_attention") or {})
    for key, value in (getattr(config, "rope_scaling", None) or {}).items():
        params.setdefault(key, value)
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if params.get("rope_theta") is None and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def _partial_rotary(config: Any) -> float:
    params = rope_parameters(config)
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return float(factor) if factor is not None else 1.0


def _activation(config: Any) -> str | None:
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)


#: Rope scalings beyond linear and yarn, by the model types whose llama.cpp graph has them.
_ROPE_TYPES = {"llama": ("llama3",), "mistral": ("llama3",), "phi3": ("longrope", "su")}


def check_supported(config: Any, arch: Architecture) -> None:
    """Refuse what llama.cpp would compute differently; warn where it only approximates."""
    model_type = config.model_type
    act = _activation(config)
    if act not in arch.activations:
        raise ValueError(
            f"{model_type}: llama.cpp's {arch.name} graph uses {arch.activations[0]}, "
            f"this model uses {act!r}"
        )
    if arch.permute_qk and _partial_rotary(config) != 1.0:
        raise ValueError(f"{model_type}: llama.cpp's {arch.name} needs rope on whole heads")
    if model_type in ("gemma2", "gemma3_text"):
        # llama.cpp does not read the query scale: it is 1/sqrt(head_dim), or
        # 1/sqrt(hidden/heads) for the 27B models (found by layer count).
        big = config.num_hidden_layers == (46 if model_type == "gemma2" else 62)
        expected = config.hidden_size // config.num_attention_heads if big else head_dim(config)
        scalar = getattr(config, "query_pre_attn_scalar", None)
        if scalar is not None and scalar != expected:
            raise ValueError(
                f"{model_type}: query_pre_attn_scalar={scalar}, but llama.cpp scales queries "
                f"by 1/sqrt({expected}) for this shape"
            )
    rope_type = (rope_parameters(config).get("rope_type") or "default").lower()
    if rope_type not in _ROPE_TYPES.get(model_type, ()) + ("default", "linear", "yarn"):
        raise ValueError(f"{model_type}: llama.cpp's {arch.name} has no rope scaling {rope_type!r}")
    if model_type == "qwen3_moe":
        _check_qwen3_moe(config, arch)
    window = _unsupported_window(config)
    if window:
        warnings.warn(
            f"{model_type}: llama.cpp's {arch.name} has no sliding-window attention; "
            f"positions past the window of {window} tokens will attend further back than "
            f"in transformers",
            stacklevel=3,
        )


def _check_qwen3_moe(config: Any, arch: Architecture) -> None:
    if not getattr(config, "norm_topk_prob", False):
        raise ValueError(
            f"qwen3_moe: llama.cpp's {arch.name} graph always renormalises the top-k router "
            "weights, and this model has norm_topk_prob=False (its outputs would differ)"
        )
    dense = sorted(dense_layers(config))
    if dense:
        raise ValueError(
            f"qwen3_moe: llama.cpp's {arch.name} graph has experts in every layer, and this "
            f"model has dense MLP layers {dense} (mlp_only_layers="
            f"{list(getattr(config, 'mlp_only_layers', None) or [])}, decoder_sparse_step="
            f"{getattr(config, 'decoder_sparse_step', 1)}); export merged_16bit instead"
        )


def dense_layers(config: Any) -> set[int]:
    """The layers of a Qwen3-MoE model that have a dense MLP instead of experts."""
    only = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    experts = getattr(config, "num_experts", 0) or 0
    return {
        i
        for i in range(config.num_hidden_layers)
        if i in only or experts <= 0 or (i + 1) % step != 0
    }


def _unsupported_window(config: Any) -> int | None:
    """The sliding window transformers applies that llama.cpp's graph ignores, if any."""
    window = getattr(config, "sliding_window", None)
    if config.model_type in ("gemma2", "gemma3_text") or not window:
        return None
    if config.model_type in ("qwen2", "qwen3", "qwen3_moe"):
        layer_types = getattr(config, "layer_types", None) or []
        if (
            not getattr(config, "use_sliding_window", False)
            and "sliding_attention" not in layer_types
        ):
            return None
    if window >= config.max_position_embeddings:
        return None
    return int(window)


def _sliding_pattern(config: Any) -> list[bool]:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [t == "sliding_attention" for t in layer_types]
    # Gemma 2 without layer_types: local layers first, alternating.
    return [i % 2 == 0 for i in range(config.num_hidden_layers)]


def write_metadata(writer: gguf.GGUFWriter, config: Any, arch: Architecture) -> None:
    """The hyperparameters llama.cpp reads for ``arch`` (tokenizer and file type aside)."""
    hd = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    )
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(int(hd * _partial_rotary(config)))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    _write_rope_scaling(writer, rope)

    model_type = config.model_type
    if model_type in ("gemma2", "gemma3_text") and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern(_sliding_pattern(config))
    if model_type == "gemma3_text":
        local = rope_parameters(config, "sliding_attention")
        writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
    if model_type == "gemma2" and getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if model_type in ("qwen3_moe", "mixtral"):
        writer.add_expert_count(num_experts(config))
        writer.add_expert_used_count(config.num_experts_per_tok)
    if model_type == "qwen3_moe":
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if model_type == "phi3":
        original = rope.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", config.max_position_embeddings
        )
        writer.add_rope_scaling_orig_ctx_len(original)
        # As llama.cpp's converter writes it (llama.cpp turns Phi-3's window off anyway).
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)


def num_experts(config: Any) -> int:
    """Experts per layer: Qwen3-MoE's ``num_experts``, Mixtral's ``num_local_experts``."""
    return int(getattr(config, "num_experts", None) or config.num_local_experts)


def _write_rope_scaling(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    rope_type = (rope.get("rope_type") or "default").lower()
    if rope_type == "default":
        return
    # transformers requires a factor of linear and yarn scaling.
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        optional = {
            "extrapolation_factor": writer.add_rope_scaling_yarn_ext_factor,
            "attention_factor": writer.add_rope_scaling_yarn_attn_factor,
            "beta_fast": writer.add_rope_scaling_yarn_beta_fast,
            "beta_slow": writer.add_rope_scaling_yarn_beta_slow,
        }
        for key, add in optional.items():
            if rope.get(key) is not None:
                add(rope[key])
    elif rope_type in ("longrope", "su"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    # llama3: carried by the rope_freqs tensor (extra_tensors)


def extra_tensors(config: Any, writer: gguf.GGUFWriter) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors llama.cpp needs that the checkpoint does not hold: rope frequency factors."""
    rope = rope_parameters(config)
    rope_type = (rope.get("rope_type") or "default").lower()
    if rope_type == "llama3":
        yield _tensor_name(gguf.MODEL_TENSOR.ROPE_FREQS), _llama3_factors(config, rope)
    if rope_type in ("longrope", "su") and rope.get("long_factor"):
        original = (
            rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
        )
        scale = config.max_position_embeddings / original
        attn = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
        writer.add_rope_scaling_attn_factors(rope.get("attention_factor") or attn)
        for key, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):  # fmt: skip
            yield _tensor_name(tensor), torch.tensor(rope[key], dtype=torch.float32)


def _tensor_name(tensor: gguf.MODEL_TENSOR) -> str:
    return gguf.TENSOR_NAMES[tensor] + ".weight"


def _llama3_factors(config: Any, rope: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1's frequency-dependent scaling as per-frequency divisors (llama.cpp's form).
    dim = head_dim(config)
    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _interleave_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    # Per head, rows (x_0..x_{d/2-1}, y_0..y_{d/2-1}) become (x_0, y_0, x_1, y_1, ...).
    shape = weight.shape
    return (
        weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


#: transformers' fused expert parameters -> the llama.cpp tensors they hold, in the order
#: of their rows (gate_up_proj: the gate's I rows of each expert, then the up's).
_EXPERT_TENSORS = {
    "mlp.experts.gate_up_proj": (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP),
    "mlp.experts.down_proj": (gguf.MODEL_TENSOR.FFN_DOWN_EXP,),
}


def _expert_tensors(hf_name: str) -> tuple[int, tuple[gguf.MODEL_TENSOR, ...]] | None:
    """``(layer, llama.cpp tensors)`` of a fused expert parameter, else None."""
    prefix, _, rest = hf_name.partition(".layers.")
    layer, _, local = rest.partition(".")
    if not prefix or not layer.isdigit() or local not in _EXPERT_TENSORS:
        return None
    return int(layer), _EXPERT_TENSORS[local]


class TensorConverter:
    """Hugging Face tensor names and values to llama.cpp's, for one model."""

    def __init__(self, config: Any, arch: Architecture) -> None:
        self.config = config
        self.arch = arch
        self.names = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
        self.allowed = set(gguf.MODEL_TENSORS[arch.gguf_arch])

    def gguf_name(self, hf_name: str) -> str:
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(
                f"{self.config.model_type}: no llama.cpp tensor for {hf_name!r} "
                f"(GGUF architecture {self.arch.name})"
            )
        return name

    def gguf_parts(self, hf_name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        """The llama.cpp tensors (name, shape in torch's order) holding ``hf_name``: one,
        or two for transformers' fused ``gate_up_proj`` of the experts (split along its
        rows)."""
        experts = _expert_tensors(hf_name)
        if experts is None:
            return [(self.gguf_name(hf_name), tuple(shape))]
        layer, tensors = experts
        for tensor in tensors:
            if tensor not in self.allowed:
                raise ValueError(
                    f"{self.config.model_type}: llama.cpp's {self.arch.name} has no "
                    f"{gguf.TENSOR_NAMES[tensor]} for {hf_name!r}"
                )
        rows = shape[-2] // len(tensors)
        part = (*shape[:-2], rows, shape[-1])
        return [(gguf.TENSOR_NAMES[t].format(bid=layer) + ".weight", part) for t in tensors]

    def convert_part(self, hf_name: str, tensor: torch.Tensor, index: int) -> torch.Tensor:
        """Part ``index`` of :meth:`gguf_parts` as llama.cpp expects it."""
        experts = _expert_tensors(hf_name)
        if experts is not None:
            tensor = tensor.chunk(len(experts[1]), dim=-2)[index]
        return self.convert(hf_name, tensor)

    def restore_parts(self, hf_name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`convert_part` over every part: ``hf_name`` as Hugging Face
        holds it."""
        restored = [self.restore(hf_name, part) for part in parts]
        return restored[0] if len(restored) == 1 else torch.cat(restored, dim=-2)

    def has_output(self) -> bool:
        return gguf.MODEL_TENSOR.OUTPUT in self.allowed

    def _rope_heads(self, hf_name: str) -> int | None:
        """The head count of a q or k projection whose rows llama.cpp's rope needs
        interleaved, else None."""
        if not self.arch.permute_qk:
            return None
        n_head = self.config.num_attention_heads
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return n_head
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return getattr(self.config, "num_key_value_heads", None) or n_head
        return None

    def convert(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as llama.cpp expects it (still in torch's [out, in] layout)."""
        heads = self._rope_heads(hf_name)
        if heads:
            tensor = _interleave_rope_rows(tensor, heads)
        if self.arch.norm_offset and hf_name.endswith("norm.weight"):
            tensor = tensor.float() + self.arch.norm_offset
        return tensor

    def restore(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`convert`: a tensor read from the file, as Hugging Face holds
        it (q/k rows back in rotate-half order, Gemma's norms less their ``1``)."""
        heads = self._rope_heads(hf_name)
        if heads:
            tensor = _deinterleave_rope_rows(tensor, heads)
        if self.arch.norm_offset and hf_name.endswith("norm.weight"):
            tensor = tensor - self.arch.norm_offset
        return tensor


def _deinterleave_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    # Per head, rows (x_0, y_0, x_1, y_1, ...) become (x_0..x_{d/2-1}, y_0..y_{d/2-1}).
    shape = weight.shape
    return (
        weight.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )

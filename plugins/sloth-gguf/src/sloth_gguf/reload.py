"""``--verify``'s first level, in pure Python: the GGUF read back with the ``gguf`` package
(its ``GGUFReader`` and ``gguf.quants.dequantize``) and rebuilt as a Hugging Face model.

Three checks, each naming what is wrong:

- **metadata**: every hyperparameter the writer puts in the file (context, widths, head
  counts, rope theta and scaling, norm epsilon, softcaps, sliding window, vocabulary size)
  and the tokenizer's special ids and chat template, read back and compared with the
  model's config and the tokenizer (:data:`CONFIG_KEYS`, :data:`TOKENIZER_KEYS`);
- **tensors**: each tensor found under the name llama.cpp looks for, of the shape the
  model needs, its values (dequantized, q/k rows put back in Hugging Face's order,
  Gemma's norms less their ``1``) within :data:`TENSOR_TOLERANCE` of the model's;
- **logits and tokens**: the model rebuilt from the file alone (its config takes every
  value the file holds; what llama.cpp does not read, such as the activation, it keeps
  from the model in memory, which the export refuses when llama.cpp would differ)
  against the model in memory, by the core's ``compare_logits`` and each type's
  tolerance, and the file's vocabulary (transformers' GGUF tokenizer) against the tokenizer.

transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``) is not used for the
model: it has no ``gemma`` architecture, and it ignores what the Gemma 2/3 graphs (softcaps,
sliding-window pattern, local rope theta), Qwen 3 (the head width) and Phi-3 (partial rope)
need, so the mapping is this plugin's own tables inverted (:mod:`.architectures`). Its
tokenizer builder covers our vocabularies (byte-level BPE and SentencePiece BPE) and is used.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from sloth_core.sdk import (
    VerifyReport,
    compare_logits,
    compare_token_ids,
    merged_state_dict,
    model_logits,
)

from .architectures import (
    ARCHITECTURES,
    TensorConverter,
    _sliding_pattern,
    architecture_for,
    head_dim,
    rope_parameters,
)

__all__ = ["CONFIG_KEYS", "TENSOR_TOLERANCE", "TOKENIZER_KEYS", "check_reloaded"]

K = gguf.Keys
#: Largest ``|stored - model| / |model|`` (Frobenius norms) of one tensor. Quantization
#: stays under it (measured on a small trained LM: q4_0 0.09, q3_k_s 0.15, q2_k 0.30); a
#: tensor whose rows are in the wrong order (q/k not permuted), or another tensor, measures
#: about 1.4.
TENSOR_TOLERANCE = 0.8
#: Tensors llama.cpp needs that the model holds as config (rope frequency factors).
_EXTRA_TENSORS = {
    gguf.TENSOR_NAMES[t] + ".weight"
    for t in (
        gguf.MODEL_TENSOR.ROPE_FREQS,
        gguf.MODEL_TENSOR.ROPE_FACTORS_LONG,
        gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT,
    )
}

Getter = Callable[[Any], Any]
Setter = Callable[[Any, Any], None]


# -- the config keys: the inverse of architectures.write_metadata ------------------------------
def _attr(name: str) -> tuple[Getter, Setter]:
    return (lambda c: getattr(c, name, None), lambda c, v: setattr(c, name, v))


def _optional(name: str) -> tuple[Getter, Setter]:
    # Written only where set (a softcap, a window): 0 and None are not written.
    return (lambda c: getattr(c, name, None) or None, lambda c, v: setattr(c, name, v))


def _rope_dict(config: Any, layer_type: str) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = {}
        config.rope_parameters = params
    if "full_attention" in params or "sliding_attention" in params:
        params = params.setdefault(layer_type, {})
    return params


def _rope(
    key: str, layer_type: str = "full_attention", default: Any = None
) -> tuple[Getter, Setter]:
    def get(config: Any) -> Any:
        return rope_parameters(config, layer_type).get(key, default)

    def set_(config: Any, value: Any) -> None:
        _rope_dict(config, layer_type)[key] = value
        if key == "rope_theta" and layer_type == "full_attention" and hasattr(config, key):
            config.rope_theta = value  # transformers before 5

    return get, set_


def _kv_heads() -> tuple[Getter, Setter]:
    return (
        lambda c: getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        lambda c, v: setattr(c, "num_key_value_heads", v),
    )


def _head_dim() -> tuple[Getter, Setter]:
    return head_dim, lambda c, v: setattr(c, "head_dim", v)


def _rotary_dims() -> tuple[Getter, Setter]:
    def factor(config: Any) -> float:
        params = rope_parameters(config)
        value = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
        return float(value) if value is not None else 1.0

    def get(config: Any) -> int:
        return int(head_dim(config) * factor(config))

    def set_(config: Any, value: Any) -> None:
        partial = int(value) / head_dim(config)
        if partial != factor(config) or partial != 1.0:
            _rope_dict(config, "full_attention")["partial_rotary_factor"] = partial
            if hasattr(config, "partial_rotary_factor"):
                config.partial_rotary_factor = partial

    return get, set_


def _layer_types() -> tuple[Getter, Setter]:
    def set_(config: Any, value: Any) -> None:
        config.layer_types = [
            "sliding_attention" if sliding else "full_attention" for sliding in value
        ]

    def get(config: Any) -> list[bool] | None:
        if not getattr(config, "sliding_window", None):
            return None  # written with the window only
        return [bool(s) for s in _sliding_pattern(config)]

    return get, set_


def _scaling(key: str) -> tuple[Getter, Setter]:
    # Linear and yarn only: llama3's factors travel as a tensor, longrope's too.
    def get(config: Any) -> Any:
        params = rope_parameters(config)
        if (params.get("rope_type") or "default").lower() not in ("linear", "yarn"):
            return None
        return params.get(key)

    return get, _rope(key)[1]


def _rope_type() -> tuple[Getter, Setter]:
    names = {"linear": "linear", "yarn": "yarn", "longrope": "longrope", "su": "longrope"}

    def get(config: Any) -> Any:
        return names.get((rope_parameters(config).get("rope_type") or "default").lower())

    return get, lambda c, v: None  # the type is the model's; a different one is reported


_COMMON: dict[str, tuple[Getter, Setter]] = {
    K.LLM.CONTEXT_LENGTH: _attr("max_position_embeddings"),
    K.LLM.EMBEDDING_LENGTH: _attr("hidden_size"),
    K.LLM.BLOCK_COUNT: _attr("num_hidden_layers"),
    K.LLM.FEED_FORWARD_LENGTH: _attr("intermediate_size"),
    K.LLM.VOCAB_SIZE: _attr("vocab_size"),
    K.Attention.HEAD_COUNT: _attr("num_attention_heads"),
    K.Attention.HEAD_COUNT_KV: _kv_heads(),
    K.Attention.KEY_LENGTH: _head_dim(),
    K.Attention.VALUE_LENGTH: (head_dim, lambda c, v: None),  # one head width in HF
    K.Attention.LAYERNORM_RMS_EPS: _attr("rms_norm_eps"),
    K.Rope.DIMENSION_COUNT: _rotary_dims(),
    K.Rope.FREQ_BASE: _rope("rope_theta", default=10000.0),
    K.Rope.SCALING_TYPE: _rope_type(),
    K.Rope.SCALING_FACTOR: _scaling("factor"),
    K.LLM.FINAL_LOGIT_SOFTCAPPING: _optional("final_logit_softcapping"),
}
_GEMMA_WINDOW: dict[str, tuple[Getter, Setter]] = {
    K.Attention.SLIDING_WINDOW: _optional("sliding_window"),
    K.Attention.SLIDING_WINDOW_PATTERN: _layer_types(),
}
#: GGUF key (``{arch}`` filled in) -> how to read it from a config and set it on one, by
#: model type: what :func:`~.architectures.write_metadata` writes, inverted.
CONFIG_KEYS: dict[str, dict[str, tuple[Getter, Setter]]] = {
    "llama": _COMMON,
    "mistral": _COMMON,
    "qwen2": _COMMON,
    "qwen3": _COMMON,
    "gemma": _COMMON,
    "gemma2": {
        **_COMMON,
        **_GEMMA_WINDOW,
        K.LLM.ATTN_LOGIT_SOFTCAPPING: _optional("attn_logit_softcapping"),
    },
    "gemma3_text": {
        **_COMMON,
        **_GEMMA_WINDOW,
        K.Rope.FREQ_BASE_SWA: _rope("rope_theta", "sliding_attention", default=10000.0),
    },
    "phi3": _COMMON,
    "qwen3_moe": {
        **_COMMON,
        K.LLM.EXPERT_COUNT: _attr("num_experts"),
        K.LLM.EXPERT_USED_COUNT: _attr("num_experts_per_tok"),
        K.LLM.EXPERT_FEED_FORWARD_LENGTH: _attr("moe_intermediate_size"),
    },
    "mixtral": {
        **_COMMON,
        K.LLM.EXPERT_COUNT: _attr("num_local_experts"),
        K.LLM.EXPERT_USED_COUNT: _attr("num_experts_per_tok"),
    },
}
#: GGUF key -> the tokenizer attribute that holds the same thing (vocab.py's ``special_ids``).
TOKENIZER_KEYS = {
    K.Tokenizer.BOS_ID: "bos_token_id",
    K.Tokenizer.EOS_ID: "eos_token_id",
    K.Tokenizer.PAD_ID: "pad_token_id",
    K.Tokenizer.UNK_ID: "unk_token_id",
    K.Tokenizer.CHAT_TEMPLATE: "chat_template",
}


def _fields(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {name: field_.contents() for name, field_ in reader.fields.items()}


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        try:
            # Floats are stored as float32.
            return math.isclose(float(got), float(want), rel_tol=1e-6, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    if isinstance(want, (list, tuple)):
        return list(got) == list(want) if isinstance(got, (list, tuple)) else False
    return bool(got == want)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_metadata(
    report: VerifyReport, fields: dict[str, Any], config: Any, tokenizer: Any
) -> None:
    """Each key the writer puts in the file against the model's config and the tokenizer."""
    arch = architecture_for(config)
    written = fields.get(K.General.ARCHITECTURE)
    if written != arch.name:
        report.problems.append(
            f"{K.General.ARCHITECTURE} is {written!r}, llama.cpp's {arch.name!r} for a "
            f"{config.model_type} model"
        )
        return
    wanted: dict[str, Any] = {
        key.format(arch=arch.name): get(config)
        for key, (get, _) in CONFIG_KEYS[config.model_type].items()
    }
    if tokenizer is not None:
        for key, attribute in TOKENIZER_KEYS.items():
            value = getattr(tokenizer, attribute, None)
            wanted[key] = value if isinstance(value, (int, str)) else None
    for key, want in wanted.items():
        got = fields.get(key)
        if want is None:
            continue  # the writer writes nothing for it
        if got is None:
            report.problems.append(f"{key} is missing from the file (the model has {_shown(want)})")
        elif not _same(got, want):
            report.problems.append(
                f"{key} is {_shown(got)} in the file, {_shown(want)} in the model"
            )
    tokens = fields.get(K.Tokenizer.LIST) or []
    if len(tokens) != config.vocab_size:
        report.problems.append(
            f"{K.Tokenizer.LIST} holds {len(tokens)} tokens, the model {config.vocab_size}"
        )


# -- the model, rebuilt from the file -----------------------------------------------------------
def _rebuilt_config(fields: dict[str, Any], config: Any, names: set[str]) -> Any:
    """``config`` with every value the file holds put in, as llama.cpp reads the file."""
    rebuilt = copy.deepcopy(config)
    arch = architecture_for(config)
    for key, (_, set_) in CONFIG_KEYS[config.model_type].items():
        value = fields.get(key.format(arch=arch.name))
        if value is not None:
            set_(rebuilt, value)
    # llama.cpp ties the output to the embeddings when the file has no output tensor.
    rebuilt.tie_word_embeddings = "output.weight" not in names
    if config.model_type not in ("gemma2", "gemma3_text") and hasattr(rebuilt, "sliding_window"):
        rebuilt.sliding_window = None  # llama.cpp's graphs for these have no window
        if hasattr(rebuilt, "use_sliding_window"):
            rebuilt.use_sliding_window = False
    return rebuilt


def _empty_model(config: Any, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    skip_init: Any
    try:  # every weight is overwritten: skip the random initialisation
        from transformers.initialization import no_init_weights as skip_init
    except ImportError:  # older transformers
        from contextlib import nullcontext as skip_init
    with skip_init():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    return model.eval()


def _relative(stored: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(want.float().norm())
    error = float((stored.float() - want.float()).norm())
    return error / scale if scale else (0.0 if error == 0 else math.inf)


def rebuild_model(
    reader: gguf.GGUFReader, fields: dict[str, Any], model: Any, report: VerifyReport
) -> Any:
    """The model the file holds, as a transformers model (``None`` where it cannot be built:
    the reasons are in ``report.problems``)."""
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    tensors = {t.name: t for t in reader.tensors}
    config = _rebuilt_config(fields, base.config, set(tensors))
    reference = base.get_input_embeddings().weight
    # The dtype the model computes in (its embeddings': other weights may be packed 4-bit).
    dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
    rebuilt = _empty_model(config, dtype)
    converter = TensorConverter(config, architecture_for(config))
    want = merged_state_dict(model)
    used: set[str] = set()
    broken = False  # a tensor missing or misshapen: no model to run (values that differ
    # are reported, and the model still runs, for the logits to say how much it matters)
    for name, param in rebuilt.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        try:
            parts = converter.gguf_parts(name, tuple(param.shape))
        except ValueError as exc:
            report.problems.append(str(exc))
            broken = True
            continue
        pieces = []
        for gguf_name, shape in parts:
            used.add(gguf_name)
            values = _stored(tensors.get(gguf_name), gguf_name, name, shape, report)
            if values is not None:
                pieces.append(values)
        if len(pieces) < len(parts):
            broken = True
            continue
        restored = converter.restore_parts(name, pieces)
        if name in want:  # each llama.cpp tensor against its rows of the model's
            target = want[name].detach().cpu()
            for (gguf_name, _), got, expected in zip(
                parts, _rows(restored, len(parts)), _rows(target, len(parts)), strict=True
            ):
                error = _relative(got, expected)
                if error > TENSOR_TOLERANCE:
                    report.problems.append(
                        f"tensor {gguf_name} ({tensors[gguf_name].tensor_type.name}) differs "
                        f"from the model's {name}: relative error {error:.3g} > "
                        f"{TENSOR_TOLERANCE} (wrong order or wrong tensor)"
                    )
        with torch.no_grad():
            param.data = restored.to(param.dtype)
    for name in sorted(set(tensors) - used - _EXTRA_TENSORS):
        report.problems.append(f"tensor {name} in the file has no place in the model")
    if broken:
        return None
    if config.tie_word_embeddings:  # the output is the embeddings' tensor, as in llama.cpp
        rebuilt.get_output_embeddings().weight = rebuilt.get_input_embeddings().weight
    return _placed(rebuilt, reference.device, report)


def _rows(tensor: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """``tensor`` split along its rows as :meth:`TensorConverter.gguf_parts` splits it."""
    return tensor.chunk(count, -2) if count > 1 else (tensor,)


def _stored(
    stored: Any, gguf_name: str, name: str, shape: tuple[int, ...], report: VerifyReport
) -> torch.Tensor | None:
    """The values of the file's tensor ``gguf_name``, dequantized, in torch's order; None,
    with the reason in ``report``, where it is missing, of a type gguf cannot read, or not
    of the ``shape`` the model's ``name`` needs of it."""
    if stored is None:
        report.problems.append(f"tensor {gguf_name} ({name}) is missing from the file")
        return None
    try:
        values = gguf.quants.dequantize(stored.data, stored.tensor_type)
    except NotImplementedError:
        report.problems.append(
            f"tensor {gguf_name}: the gguf package cannot dequantize its type "
            f"{stored.tensor_type.name}"
        )
        return None
    if tuple(values.shape) != tuple(shape):
        report.problems.append(
            f"tensor {gguf_name} has shape {tuple(values.shape)}, {name} needs {tuple(shape)}"
        )
        return None
    return torch.from_numpy(np.array(values, dtype=np.float32))


def _placed(rebuilt: Any, device: torch.device, report: VerifyReport) -> Any:
    """``rebuilt`` on the model's device where it fits beside it, else on the CPU."""
    if device.type != "cuda":
        return rebuilt.to(device)
    need = sum(p.numel() * p.element_size() for p in rebuilt.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    if need * 1.2 < free:
        return rebuilt.to(device)
    report.notes.append(
        f"the model rebuilt from the file ({need / 2**30:.1f} GiB) runs on the CPU: "
        f"{free / 2**30:.1f} GiB free on {device}"
    )
    return rebuilt


def _file_tokenizer(path: Path, fields: dict[str, Any]) -> Any:
    """The file's vocabulary as transformers builds it from a GGUF, splitting text as
    llama.cpp does: for a SentencePiece vocabulary (``tokenizer.ggml.model`` ``llama``),
    spaces become ``▁`` after one is put in front where ``add_space_prefix`` says so
    (transformers picks Metaspace by architecture instead, which differs on text that
    starts with spaces)."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    if fields.get(K.Tokenizer.MODEL) == "llama":
        steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "\u2581")]
        if fields.get(K.Tokenizer.ADD_PREFIX, True):
            steps.insert(0, normalizers.Prepend("\u2581"))
        backend = tokenizer.backend_tokenizer
        backend.normalizer = normalizers.Sequence(steps)
        backend.pre_tokenizer = None
    return tokenizer


def check_reloaded(
    report: VerifyReport, path: Path, model: Any, tokenizer: Any, prompts: tuple[str, ...]
) -> None:
    """The pure-Python level on the GGUF at ``path``, into ``report``."""
    if getattr(model, "config", None) is None:
        report.problems.append("the model in memory has no config to compare the file with")
        return
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    if base.config.model_type not in ARCHITECTURES:
        report.problems.append(f"no GGUF mapping for model_type {base.config.model_type!r}")
        return
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # a damaged file fails in struct, numpy, anywhere
        report.problems.append(f"the gguf package cannot read {path}: {exc}")
        return
    fields = _fields(reader)
    check_metadata(report, fields, base.config, tokenizer)
    rebuilt = rebuild_model(reader, fields, model, report)
    if rebuilt is None:
        return
    compare_logits(report, model, tokenizer, prompts, lambda lists: model_logits(rebuilt, lists))
    if tokenizer is None:
        return
    try:
        exported = _file_tokenizer(path, fields)
    except Exception as exc:  # transformers' builders raise anything on an odd file
        report.problems.append(f"transformers cannot build a tokenizer from the file: {exc}")
        return
    compare_token_ids(report, tokenizer, lambda texts: [exported(t).input_ids for t in texts])

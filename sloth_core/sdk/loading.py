"""Loading a Hugging Face causal LM as every loader does: safetensors unless pickle is
allowed, the model's own code only when trusted, the quantizer's load arguments, the
tokenizer with a pad token. Architecture plugins' ``load_model`` builds on
:func:`load_hf_model` (through ``load_with_sloth_attention``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from sloth_core.errors import ModelNotFoundError, UnsafeWeightsError
from sloth_core.types import ModelSpec

__all__ = ["check_local_weights", "load_hf_model", "load_kwargs", "load_tokenizer"]

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_local_weights(directory: Path, allow_pickle: bool) -> None:
    """Refuse a directory without weights, or with only pickled ones unless allowed."""
    names = {p.name for p in directory.iterdir()}
    if names & set(SAFE_WEIGHTS) or any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(n for n in names if n in PICKLED_WEIGHTS or n.endswith(".bin"))
    if pickled:
        if allow_pickle:
            return
        raise UnsafeWeightsError(
            f"{directory} holds only pickled weights ({', '.join(pickled)}), which can run "
            "arbitrary code when loaded. Convert them to safetensors, or, if you trust their "
            "source, pass --allow-pickle (allow_pickle=True in Python)."
        )
    raise ModelNotFoundError(
        f"{directory} has a config.json but no model weights "
        f"(looked for {', '.join(SAFE_WEIGHTS)} or *.safetensors)"
    )


def load_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments common to every loader, for plugins too."""
    kwargs: dict[str, Any] = {
        "config": spec.config,
        "dtype": spec.dtype,
        "trust_remote_code": spec.trust_remote_code,
        # Without pickle permission transformers is told to take safetensors or nothing.
        "use_safetensors": None if spec.allow_pickle else True,
    }
    for key in ("revision", "token", "device_map"):
        value = getattr(spec, key)
        if value is not None:
            kwargs[key] = value
    if spec.quantization_plan is not None:
        kwargs.update(spec.quantization_plan.load_kwargs)
    kwargs.update(spec.extra)
    return kwargs


def load_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer of ``spec``'s model, with a pad token and ``max_seq_length`` set;
    ``spec.tokenizer`` itself when the caller loaded it already (``sloth train``'s, which
    prepared the data: one tokenizer per run)."""
    if spec.tokenizer is not None:
        return spec.tokenizer
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    for key in ("revision", "token"):
        if getattr(spec, key) is not None:
            kwargs[key] = getattr(spec, key)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_name, **kwargs)
    if spec.max_seq_length:
        tokenizer.model_max_length = spec.max_seq_length
    if tokenizer.pad_token is None:
        # Batching needs a pad id; padded positions are masked out of attention and loss.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_hf_model(spec: ModelSpec) -> tuple[Any, Any]:
    """Load ``spec`` with transformers' auto classes (what every loader builds on)."""
    from transformers import AutoModelForCausalLM

    if spec.is_local:
        check_local_weights(Path(spec.model_name).expanduser(), spec.allow_pickle)
    if spec.empty:
        model = _empty_model(spec)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.model_name, **load_kwargs(spec))
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if spec.max_seq_length and max_positions and spec.max_seq_length > max_positions:
        warnings.warn(
            f"max_seq_length={spec.max_seq_length} exceeds the model's "
            f"max_position_embeddings={max_positions}; quality past it depends on the "
            "model's rope scaling",
            stacklevel=2,
        )
    return model, load_tokenizer(spec)


def _empty_model(spec: ModelSpec) -> Any:
    """The model of ``spec.config`` with its parameters on the meta device (no memory, no
    weights read) and its buffers real: the rotary tables and other non-persistent buffers
    are computed in the modules' ``__init__`` and are not in the weight files."""
    if spec.quantization_plan is not None:
        raise ValueError(f"{spec.model_name}: an empty (meta-device) model cannot be quantized")
    kwargs = {key: spec.extra[key] for key in ("attn_implementation",) if key in spec.extra}
    return empty_causal_lm(spec.config, spec.dtype, spec.trust_remote_code, **kwargs)


def empty_causal_lm(config: Any, dtype: Any, trust_remote_code: bool, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_config`` with the parameters on the meta device and the
    buffers computed (accelerate's ``init_empty_weights(include_buffers=False)``)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )

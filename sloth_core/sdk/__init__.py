"""The plugin SDK: what plugins build on, and all they import of sloth_core besides
``hookimpl``, ``sloth_core.ops.reference`` (the kernels' contract) and ``sloth_core.testing``
(their tests).

Architecture plugins: :func:`patch_architecture` (or :func:`patch_modeling` with a table of
:class:`ArchitectureSpec`), :func:`load_with_sloth_attention`,
:func:`sliding_window_kwargs`, :func:`model_type_of`, the loader helpers
(:func:`load_hf_model`, :func:`load_kwargs`). Kernels: what an op keeps from an
offloaded layer's first pass instead of computing it again in the recompute
(:func:`keep_for_backward`, :func:`kept_for_backward`), and what a layer hands out beside
its output that must pass gradients back through the checkpoint (:func:`side_output`: the
router logits of the load-balancing loss). Exporters: the merge and the merged-model
writer (:func:`merged_state_dict`, :func:`write_merged`), the stop tokens (one table for
every format and for ``sloth chat``), atomic outputs and free-space checks, the llama.cpp
runner (:mod:`sloth_core.sdk.llama_cpp`), the chat-template resolver; the descriptors a
format or quantization method registers with (:class:`ExportFormat`, :class:`WeightType`,
:class:`QuantizationMethod`) and the pieces of a verifier (:class:`VerifyRequest`,
:func:`compare_logits`, :func:`compare_token_ids`, :func:`verify_safetensors`). And the value
types and errors that cross the hook boundary.

Names load on first use, so importing the SDK costs nothing until a name is used (and
the core's own modules can import its parts without cycles).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Every name of the SDK and the module that holds it.
_EXPORTS: dict[str, str] = {
    # plugins' hooks and the types crossing them
    "hookimpl": "sloth_core",
    "ModelSpec": "sloth_core.types",
    "PatchReport": "sloth_core.types",
    "QuantizationPlan": "sloth_core.types",
    "ExportResult": "sloth_core.types",
    # errors
    "SlothError": "sloth_core.errors",
    "PluginMissingError": "sloth_core.errors",
    "ModelNotFoundError": "sloth_core.errors",
    "OutputExistsError": "sloth_core.errors",
    "DiskFullError": "sloth_core.errors",
    "UnsafeWeightsError": "sloth_core.errors",
    "UntrustedCodeError": "sloth_core.errors",
    # architecture plugins
    "patch_architecture": "sloth_core.patches",
    "patch_modeling": "sloth_core.patches",
    "ArchitectureSpec": "sloth_core.patches",
    "DENSE_KINDS": "sloth_core.patches",
    "load_with_sloth_attention": "sloth_core.patches",
    "sliding_window_kwargs": "sloth_core.patches",
    "SLOTH_ATTENTION": "sloth_core.patches",
    "patch_rms_norm": "sloth_core.patches",
    "patch_gated_mlp": "sloth_core.patches",
    "patch_attention": "sloth_core.patches",
    "patch_causal_lm": "sloth_core.patches",
    "lift_linear": "sloth_core.patches",
    "patch_moe_block": "sloth_core.patches",
    "moe_block_mismatch": "sloth_core.patches",
    "expert_parameter_names": "sloth_core.patches",
    "model_type_of": "sloth_core.patching",
    "is_patched": "sloth_core.patching",
    "bind_forward": "sloth_core.patching",
    "call_original": "sloth_core.patching",
    "restorer": "sloth_core.patching",
    "unwrap_model": "sloth_core.patching",
    "load_hf_model": "sloth_core.sdk.loading",
    "load_kwargs": "sloth_core.sdk.loading",
    "load_tokenizer": "sloth_core.sdk.loading",
    "check_local_weights": "sloth_core.sdk.loading",
    "check_remote_code": "sloth_core.trust",
    # exporters
    "DEFAULT_SHARD_SIZE": "sloth_core.sdk.merge",
    "merged_state_dict": "sloth_core.sdk.merge",
    "write_merged": "sloth_core.sdk.merge",
    "save_tokenizer": "sloth_core.sdk.merge",
    "is_peft": "sloth_core.sdk.merge",
    "END_OF_TURN_TOKENS": "sloth_core.sdk.stop",
    "stop_tokens": "sloth_core.sdk.stop",
    "stop_token_ids": "sloth_core.sdk.stop",
    "eos_token_ids": "sloth_core.sdk.stop",
    "chat_template_text": "sloth_core.sdk.stop",
    "resolve_chat_template": "sloth_core.data",
    "atomic_directory": "sloth_core.io",
    "refuse_existing": "sloth_core.io",
    "check_free_space": "sloth_core.io",
    "as_published": "sloth_core.io",
    "format_bytes": "sloth_core.io",
    "llama_cpp": "sloth_core.sdk.llama_cpp",
    "install_command": "sloth_core.catalog",
    # kernels: what an op keeps from an offloaded layer's first pass for its recompute
    "keep_for_backward": "sloth_core.checkpointing",
    "kept_for_backward": "sloth_core.checkpointing",
    # architectures: a tensor a checkpointed layer hands out beside its output (router logits)
    "side_output": "sloth_core.checkpointing",
    # kernels: a span in which no trainable weight changes (what is cast from one is reused)
    "weight_epoch": "sloth_core.weight_epochs",
    # formats that describe themselves, and their verifiers
    "ExportFormat": "sloth_core.formats",
    "QuantizationMethod": "sloth_core.formats",
    "WeightType": "sloth_core.formats",
    "Tolerance": "sloth_core.formats",
    "FLOAT_TYPES": "sloth_core.formats",
    "VerifyRequest": "sloth_core.verify",
    "VerifyReport": "sloth_core.verify",
    "VerifyLevel": "sloth_core.verify",
    "compare_logits": "sloth_core.verify",
    "compare_token_ids": "sloth_core.verify",
    "model_logits": "sloth_core.verify",
    "verify_safetensors": "sloth_core.verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'sloth_core.sdk' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith(f".{name}") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

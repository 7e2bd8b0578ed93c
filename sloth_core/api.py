"""The public Python API: the names fine-tuning users already type, over the hooks."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from sloth_core.checkpointing import (  # noqa: F401  (enable_checkpointing: public here too)
    Checkpointing,
    apply_checkpointing,
    enable_checkpointing,
)
from sloth_core.errors import ModelNotFoundError, PluginMissingError, SlothError
from sloth_core.host_embedding import keep_input_embedding_on_host
from sloth_core.io import refuse_existing
from sloth_core.plugins import SlothPluginManager, get_plugin_manager
from sloth_core.quiet import peft_calls
from sloth_core.types import ExportResult, ModelSpec, PatchReport

DEFAULT_TARGET_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip


def _missing(what: str, name: str, table: dict[str, str]) -> PluginMissingError:
    from sloth_core.catalog import distribution_for, install_command

    dist = distribution_for("formats" if what == "export format" else "quantizers", name)
    hint = f"install it with `{install_command(dist)}`" if dist else "no known plugin serves it"
    known = ", ".join(sorted(table)) or "none"
    return PluginMissingError(
        f"{what} {name!r} needs a plugin that is not installed: {hint} "
        f"(installed plugins serve: {known}; see `sloth plugins list`)"
    )


def default_dtype(device: str | None = None) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older ones, fp32 on the CPU."""
    if torch.cuda.is_available() and device != "cpu":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _read_config(spec: ModelSpec, manager: SlothPluginManager) -> Any:
    """The model's config; ``None`` for a model type only a plugin knows."""
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": spec.trust_remote_code}
    kwargs.update({k: getattr(spec, k) for k in ("revision", "token") if getattr(spec, k)})
    local = Path(spec.model_name).expanduser()
    if local.exists():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise ModelNotFoundError(f"{local} is not a model directory: it has no config.json")
        try:
            spec.model_type = json.loads(config_file.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelNotFoundError(f"{config_file} is not valid JSON: {exc}") from exc
    try:
        return AutoConfig.from_pretrained(spec.model_name, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        if spec.model_type in manager.architectures:
            return None  # a third-party architecture that transformers does not know
        raise ModelNotFoundError(
            f"cannot read the config of {spec.model_name!r}: neither a local model "
            f"directory with a known model_type nor a reachable hub model ({exc})"
        ) from exc


def load_model(
    spec: ModelSpec, manager: SlothPluginManager | None = None
) -> tuple[Any, Any, list[PatchReport]]:
    """Run ``quantize``, ``load_model`` and ``patch_layers`` for ``spec``.

    :return: the model, its tokenizer, and what each plugin patched.
    """
    from sloth_core.trust import check_remote_code

    manager = manager or get_plugin_manager()
    check_remote_code(spec.model_name, spec.trust_remote_code)
    spec.config = spec.config or _read_config(spec, manager)
    spec.model_type = getattr(spec.config, "model_type", None) or spec.model_type
    if spec.dtype is None:
        # No device_map: transformers loads onto the CPU, except a quantized model, which
        # bitsandbytes puts on the GPU (an fp32 lm_head and embeddings there would cost an
        # 8B model 2 GB more than bf16).
        where = "cuda" if spec.quantization else "cpu"
        spec.dtype = default_dtype(str(spec.device_map) if spec.device_map else where)
    if spec.quantization:
        if spec.quantization not in manager.quantizers:
            raise _missing("quantization", spec.quantization, manager.quantizers)
        plan = manager.quantize(spec=spec)
        if plan is None:
            raise _missing("quantization", spec.quantization, manager.quantizers)
        spec.quantization_plan = plan
    try:
        loaded = manager.load_model(spec=spec)
    except Exception as exc:
        # A weight file cut short or not safetensors at all: safetensors' own error type,
        # whose message names no file.
        if type(exc).__name__ != "SafetensorError":
            raise
        raise ModelNotFoundError(
            f"{spec.model_name}: a weight file is damaged or not a safetensors file ({exc}); "
            "copy or download the model again"
        ) from exc
    if loaded is None:
        raise SlothError(f"no plugin loaded {spec.model_name!r} (is the builtin loader blocked?)")
    model, tokenizer = loaded
    if spec.quantization_plan is not None and spec.quantization_plan.finalize is not None:
        model = spec.quantization_plan.finalize(model) or model
    reports = manager.patch_layers(model=model)
    model.sloth_spec = spec
    model.sloth_patches = reports
    return model, tokenizer, reports


def export(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | Path,
    format: str = "merged_16bit",
    *,
    quantization: str | None = None,
    force: bool = False,
    manager: SlothPluginManager | None = None,
    **options: Any,
) -> ExportResult:
    """Write ``model`` to ``path`` in ``format`` through the plugin that serves it.

    ``quantization`` (``"q4_k_m"`` for gguf, ``"nf4"`` for merged_4bit, ...) reaches the
    exporter as ``options["quantization"]``. Nothing is overwritten without ``force``, and
    the export is refused up front when the disk has no room for it.
    """
    from sloth_core.formats import estimate_export_bytes
    from sloth_core.io import check_free_space, disk_full_error, is_disk_full

    manager = manager or get_plugin_manager()
    declared = manager.export_format(format)
    if declared is None:
        raise _missing("export format", format, manager.exporters)
    path = Path(path).expanduser()
    refuse_existing(path, force)
    if quantization is not None:
        options["quantization"] = _weight_type(declared, quantization)
    needed = estimate_export_bytes(model, declared, options)
    check_free_space(path, needed, f"the {format} export")
    try:
        result = manager.export(
            model=model, tokenizer=tokenizer, format=format, path=path,
            options={**options, "force": force},
        )  # fmt: skip
    except Exception as exc:
        if is_disk_full(exc) and not isinstance(exc, SlothError):
            raise disk_full_error(
                f"the {format} export", path.parent, ": nothing was kept"
            ) from exc
        raise
    if result is None:
        raise _missing("export format", format, manager.exporters)
    return result


def _weight_type(format: Any, quantization: str) -> str:
    """``quantization`` as ``format`` names it (``q8`` -> ``q8_0``); refused when the format
    declares its types and this is none of them."""
    declared = format.weight_type(quantization)
    names = format.quantization_names()
    if names is None:
        return declared.name if declared else quantization
    if declared is None or declared.name not in names:
        takes = f"one of {', '.join(names)}" if names else "no quantization"
        raise SlothError(f"format {format.name!r} takes {takes}, not quantization={quantization!r}")
    return declared.name


#: Unsloth's spellings of the checkpointing modes (the only place they are read).
_UNSLOTH_CHECKPOINTING = {
    False: Checkpointing.OFF, True: Checkpointing.ON,
    "sloth": Checkpointing.OFFLOAD, "unsloth": Checkpointing.OFFLOAD,
}  # fmt: skip


def _checkpointing(value: Any) -> Checkpointing:
    if isinstance(value, bool) or value in ("sloth", "unsloth"):
        return _UNSLOTH_CHECKPOINTING[value]
    try:
        return Checkpointing(value)
    except ValueError:
        raise ValueError(
            f"use_gradient_checkpointing={value!r}: use True, False or 'sloth' (or 'off', "
            "'on', 'offload')"
        ) from None


class FastLanguageModel:
    """Load, adapt and export models with the API Unsloth users know."""

    @staticmethod
    def from_pretrained(
        model_name: str,
        max_seq_length: int | None = 2048,
        dtype: torch.dtype | None = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        *,
        quantization: str | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        device_map: Any = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        tokenizer: Any = None,
        empty: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """Load ``model_name`` (a local directory or hub id), quantized if asked, patched.

        ``load_in_4bit`` means NF4 (``quantization="fp4"`` picks the other 4-bit type);
        ``load_in_8bit`` means int8. Both need a quantizer plugin (``sloth-bnb``).
        ``empty``: patched, with every parameter on the meta device and no weight read
        (:attr:`sloth_core.types.ModelSpec.empty`; the sharded loader fills it).
        """
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit exclude each other")
        if full_finetuning and (load_in_4bit or load_in_8bit or quantization):
            raise ValueError("full_finetuning trains every weight: it cannot be quantized")
        method = quantization or ("nf4" if load_in_4bit else "int8" if load_in_8bit else None)
        spec = ModelSpec(
            model_name=str(model_name),
            dtype=dtype,
            max_seq_length=max_seq_length,
            quantization=method,
            full_finetuning=full_finetuning,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            device_map=device_map,
            revision=revision,
            token=token,
            tokenizer=tokenizer,
            extra=kwargs,
            empty=empty,
        )
        model, tokenizer, _ = load_model(spec)
        if full_finetuning:
            model.requires_grad_(True)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model: Any,
        r: int = 16,
        target_modules: list[str] | str | None = None,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: Literal["none", "all", "lora_only"] = "none",
        use_gradient_checkpointing: bool | str = "sloth",
        random_state: int = 3407,
        use_rslora: bool = False,
        modules_to_save: list[str] | None = None,
        init_lora_weights: bool | str = True,
        max_seq_length: int | None = None,
        target_parameters: list[str] | None = None,
        target_experts: bool = False,
        embedding_on_host: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Attach LoRA adapters through PEFT, then re-run ``patch_layers`` on the result.

        Mixture-of-experts models keep each layer's experts as 3-D parameters
        (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj``), which
        ``target_modules`` cannot name: ``target_parameters`` passes names of parameters
        to PEFT's ``LoraConfig(target_parameters=...)`` (one rank-``r`` adapter per expert,
        stored as PEFT stores it, so the saved adapter loads in plain PEFT), and
        ``target_experts=True`` adds every 3-D expert weight of the model at hand (see
        :func:`sloth_core.patches.expert_parameter_names`); with
        ``target_modules="all-linear"`` that is every linear layer and every expert.
        Adapters on parameters take no dropout (PEFT cannot apply it): ``lora_dropout``
        must then be 0.

        ``use_gradient_checkpointing``: ``"sloth"`` (default; ``"unsloth"`` is accepted
        for familiarity) recomputes activations in backward and, on a GPU, keeps the layer
        inputs in pinned host memory meanwhile; ``True`` recomputes with the inputs on the
        device; ``False`` keeps every activation. A :class:`Checkpointing` value (or its
        name: ``"off"``, ``"on"``, ``"offload"``) is taken as well.

        ``embedding_on_host``: keep the frozen input embedding in pinned host memory, read
        by the GPU in place (:mod:`sloth_core.host_embedding`; untied embeddings on CUDA,
        one process). ``None`` (default): where the layer inputs are offloaded too (the
        memory-lean default on a GPU).
        """
        from peft import LoraConfig, get_peft_model

        spec = getattr(model, "sloth_spec", None)
        if spec is not None and spec.full_finetuning:
            raise ValueError("the model was loaded with full_finetuning=True: it takes no LoRA")
        if hasattr(model, "peft_config"):
            raise ValueError("the model already has LoRA adapters")
        checkpointing = _checkpointing(use_gradient_checkpointing)
        parameters = _target_parameters(model, target_parameters, target_experts, lora_dropout)
        if lora_dropout > 0:
            # Many recipes copy 0.05 from PEFT's examples; the cost should not be silent.
            warnings.warn(_SLOW_DROPOUT.format(lora_dropout), stacklevel=2)
        random.seed(random_state)
        torch.manual_seed(random_state)
        config = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=list(DEFAULT_TARGET_MODULES)
            if target_modules is None
            else target_modules,
            bias=bias,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            # PEFT's Literal leaves out the "pissa_niter_<n>" strings it accepts.
            init_lora_weights=init_lora_weights,  # type: ignore[arg-type]
            task_type="CAUSAL_LM",
            target_parameters=parameters or None,
            **kwargs,
        )
        with peft_calls():
            try:
                peft_model = get_peft_model(model, config)
            except ValueError as exc:
                # PEFT maps gate_proj/up_proj/down_proj and "all-linear" to the experts'
                # 3-D weights of Qwen3-MoE and Mixtral itself; its refusal names no option.
                if "lora_dropout" not in str(exc):
                    raise
                raise ValueError(_NO_DROPOUT.format(lora_dropout) + f" ({exc})") from None
        offloaded = apply_checkpointing(peft_model, checkpointing)
        # The plugins that patched the model patch its adapters too (the process-wide
        # manager only for a model loaded elsewhere).
        manager = getattr(model, "sloth_host", None) or get_plugin_manager()
        # torch types Module.__setattr__'s value as Tensor | Module; it takes any object.
        peft_model.sloth_spec = spec  # type: ignore[assignment]
        peft_model.sloth_patches = manager.patch_layers(model=peft_model)  # type: ignore[assignment]
        if offloaded if embedding_on_host is None else embedding_on_host:
            keep_input_embedding_on_host(peft_model)
        if max_seq_length and spec is not None:
            spec.max_seq_length = max_seq_length
        return peft_model

    @staticmethod
    def for_inference(model: Any, tokenizer: Any = None) -> Any:
        """Generation mode: eval, checkpointing off, KV cache on, ``tokenizer`` padding left.

        What it changes is remembered on the model and :meth:`for_training` restores it
        exactly (see :func:`sloth_core.inference.for_inference`). Returns ``model``.
        """
        from sloth_core.modes import for_inference

        return for_inference(model, tokenizer)

    @staticmethod
    def for_training(model: Any, tokenizer: Any = None) -> Any:
        """Back to training after :meth:`for_inference`: train mode, checkpointing as it was
        (plain or offloaded), ``use_cache`` and padding side as they were, LoRA trainable.
        Returns ``model``."""
        from sloth_core.modes import for_training

        return for_training(model, tokenizer)


_SLOW_DROPOUT = (
    "lora_dropout={}: the fused LoRA kernels take no dropout, so in training every adapted "
    "projection runs PEFT's way (the reference ops: slower, more memory); lora_dropout=0 "
    "is sloth's fast path"
)
_NO_DROPOUT = (
    "lora_dropout={}: LoRA on an MoE model's expert weights (PEFT's target_parameters, which "
    "target_experts, and on Qwen3-MoE/Mixtral gate_proj/up_proj/down_proj or all-linear, "
    "select) cannot apply dropout; set lora_dropout=0"
)


def _target_parameters(
    model: Any, names: list[str] | None, experts: bool, lora_dropout: float
) -> list[str]:
    """``get_peft_model``'s ``target_parameters``: ``names`` plus, with ``experts``, every
    3-D expert weight of ``model``; refused with dropout, or ``experts`` on a dense model."""
    from sloth_core.patches import expert_parameter_names

    if isinstance(names, str):
        names = [names]
    parameters = list(names or [])
    if experts:
        found = expert_parameter_names(model)
        if not found:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise ValueError(f"target_experts=True: {model_type} has no 3-D expert weights")
        parameters += [name for name in found if name not in parameters]
    if parameters and lora_dropout:
        raise ValueError(_NO_DROPOUT.format(lora_dropout))
    return parameters

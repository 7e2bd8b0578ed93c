"""The hook specifications: the whole contract between the sloth core and its plugins.

A plugin is any object or module with functions marked ``@sloth_core.hookimpl`` whose
names and parameters match the specs below (it may accept a subset of the parameters).
Plugins are found through the entry-point group ``sloth``. ``firstresult`` hooks stop at
the first implementation that returns something other than ``None``; pluggy calls the
plugin registered last first, and the core registers its built-ins before entry points,
so installed plugins win over the built-in fallbacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from sloth_core import PROJECT_NAME

if TYPE_CHECKING:
    import torch

    from sloth_core.ops import OpRegistry
    from sloth_core.types import (
        ArchitectureRegistrar,
        ExportResult,
        Host,
        KernelRegistrar,
        ModelSpec,
        NamedRegistrar,
        PatchReport,
        QuantizationPlan,
    )

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


# -- discovery: cheap, run once when plugins load, never touch a model ------------------
@hookspec
def register_architectures(register: ArchitectureRegistrar) -> None:
    """Declare the Hugging Face ``model_type`` values this plugin makes fast.

    Called once for every plugin when plugins load; ``sloth plugins list`` shows the
    result. Declaring a model type does not load anything.

    :param register: call ``register("llama", description="...")`` once per model type.
    """


@hookspec
def register_kernels(register: KernelRegistrar) -> None:
    """Register faster implementations of the core's named ops.

    Called once for every plugin when plugins load. The op registry picks, per call, the
    highest ``priority`` implementation that serves the tensor's device and dtype and
    whose ``available()`` returns true, else the core's torch reference.

    :param register: call ``register(op, fn, devices=("cuda",), dtypes=(torch.bfloat16,),
        priority=10, available=callable)``; ``fn`` takes the op's reference signature
        (see ``sloth_core.ops``). Unknown op names raise ``KeyError``.
    """


@hookspec
def register_quantizers(register: NamedRegistrar) -> None:
    """Declare the quantization methods this plugin serves through ``quantize``.

    Called once for every plugin when plugins load, so that the CLI can list methods and
    the API can name the plugin to install without running anything.

    :param register: call it once per method with a
        :class:`~sloth_core.formats.QuantizationMethod` (name, aliases, bytes per weight),
        or ``register("nf4", description="...")``.
    """


@hookspec
def register_exporters(register: NamedRegistrar) -> None:
    """Declare the export formats this plugin serves through ``export``.

    Called once for every plugin when plugins load. Everything the core knows of a format
    comes from here: the CLI's help and ``sloth plugins list``, the check of ``sloth
    train``'s export options before training, the free-space check, ``--verify``.

    :param register: call it once per format with a
        :class:`~sloth_core.formats.ExportFormat`: its name and aliases, its weight types
        (``quantizations``, each a :class:`~sloth_core.formats.WeightType` with its bytes per
        weight and verify tolerance; ``()``: it takes none), the default one, the format it
        writes through (``wraps="gguf"`` for Ollama) and its verifier. Keywords
        (``register("gguf", description=..., quantizations=("q8_0", ...))``) build one.
    """


# -- the fine-tuning pipeline -----------------------------------------------------------
@hookspec(firstresult=True)
def quantize(spec: ModelSpec) -> QuantizationPlan | None:
    """Plan the quantization of the model ``spec`` names, before it loads.

    Called when ``spec.quantization`` is set, before ``load_model``; stops at the first
    non-``None`` result. The core stores the plan in ``spec.quantization_plan``; loaders
    pass ``plan.load_kwargs`` to ``from_pretrained`` so weights are quantized as they
    stream in (an 8B model in 4-bit never exists in 16-bit on the GPU), and the core runs
    ``plan.finalize(model)`` on the loaded model.

    Return ``None`` if this plugin does not serve ``spec.quantization``.

    :param spec: the load request; ``spec.quantization`` names the method ("nf4", ...).
    """


@hookspec(firstresult=True)
def load_model(spec: ModelSpec) -> tuple[Any, Any] | None:
    """Load the model and tokenizer that ``spec`` names.

    Stops at the first non-``None`` result. The core's generic Hugging Face loader is the
    ``trylast`` fallback, so any causal LM loads; an architecture plugin returns a result
    only for the ``spec.model_type`` values it handles.

    Return ``None`` if this plugin does not handle ``spec``.

    :param spec: the load request, with ``model_type`` and ``config`` filled in.
    :return: ``(model, tokenizer)``.
    """


@hookspec
def patch_layers(model: torch.nn.Module, ops: OpRegistry, host: Host) -> PatchReport | None:
    """Swap the forwards of the modules this plugin knows for calls into ``ops``.

    Called on every plugin (collect-all) after loading, and again once LoRA adapters are
    attached: implementations must be idempotent. Architecture plugins look at
    ``model.config.model_type`` and patch only their own.

    Return ``None`` if nothing was patched.

    :param model: the loaded (possibly PEFT-wrapped) model, changed in place.
    :param ops: the op registry; call ops by name, e.g. ``ops.rms_norm(x, w, eps)``.
    :param host: the plugin manager running the hook (``host.compute_loss``, ...): what a
        patched forward needs from it is bound now, never looked up at run time (the
        manager binds its ``compute_loss`` to causal LMs patched with ``patch_causal_lm``).
    :return: a ``PatchReport`` saying what was patched, with an ``undo`` callable.
    """


@hookspec(firstresult=True)
def compute_loss(
    model: torch.nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    ops: OpRegistry,
    num_items_in_batch: int | torch.Tensor | None,
    ignore_index: int,
) -> torch.Tensor | None:
    """Compute the causal-LM loss from the last hidden states, without full logits.

    Stops at the first non-``None`` result. The core's chunked torch loss (through the
    ``fused_linear_cross_entropy`` op, which kernel sets accelerate) is the ``trylast``
    fallback; an architecture plugin overrides it only when its model needs more.

    Return ``None`` if this plugin does not handle ``model``.

    :param model: the causal LM (its output embeddings are the lm_head).
    :param hidden_states: ``[batch, seq, hidden]`` after the final norm.
    :param labels: ``[batch, seq]`` token ids, unshifted (as ``input_ids``); positions equal
        to ``ignore_index`` count for nothing.
    :param ops: the op registry.
    :param num_items_in_batch: when given, the sum of token losses is divided by it
        (gradient accumulation over micro-batches); else the mean over counted tokens.
    :param ignore_index: the label value that is ignored (-100).
    :return: a scalar loss tensor.
    """


@hookspec(firstresult=True)
def export(
    model: torch.nn.Module,
    tokenizer: Any,
    format: str,
    path: Path,
    options: dict[str, Any],
    host: Host,
) -> ExportResult | None:
    """Write ``model`` and ``tokenizer`` to ``path`` in ``format``.

    Stops at the first non-``None`` result. The core has already refused an existing
    ``path`` unless ``options["force"]``; implementations write into a temporary sibling
    and move it into place, so a failure leaves nothing half-written.

    Return ``None`` if this plugin does not serve ``format``.

    :param model: the trained model (PEFT-wrapped or plain).
    :param tokenizer: its tokenizer.
    :param format: the format name as registered through ``register_exporters``.
    :param path: the output directory or file.
    :param options: format options (``quantization``, ``max_shard_size``, ``force``, ...).
    :param host: the plugin manager running the hook: a format that writes through another
        calls ``host.export(...)`` (Ollama through GGUF) and reads ``host.export_format``.
    """

"""A family plugin's architectures as one table: per ``model_type``, its description and
which classes of transformers' modeling file :func:`~sloth_core.patches.patch_architecture`
patches.

transformers names a modeling file's classes after its prefix (``Qwen3MoeRMSNorm``,
``Qwen3MoeMLP``, ``Qwen3MoeAttention``, ``Qwen3MoeSparseMoeBlock``,
``Qwen3MoeForCausalLM`` in ``transformers.models.qwen3_moe.modeling_qwen3_moe``), so a
plugin says the prefix and the kinds once, and the file is imported only when a model of
that type is patched.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sloth_core.patching import model_type_of

if TYPE_CHECKING:
    import torch

    from sloth_core.ops import OpRegistry
    from sloth_core.types import PatchReport

#: The class-name suffix of each kind of :func:`patch_architecture` in transformers' files.
SUFFIXES = {
    "rms_norm": "RMSNorm",
    "mlp": "MLP",
    "attention": "Attention",
    "moe": "SparseMoeBlock",
    "causal_lm": "ForCausalLM",
}
#: The kinds of a Llama-like dense model.
DENSE_KINDS = ("rms_norm", "mlp", "attention", "causal_lm")


@dataclass(frozen=True)
class ArchitectureSpec:
    """One architecture of a family plugin: what ``register_architectures`` declares and
    which classes :func:`patch_modeling` patches in models of ``model_type``.

    Attributes:
        model_type: the ``config.model_type``; its file is
            ``transformers.models.<model_type>.modeling_<model_type>``.
        prefix: the file's class-name prefix (``"Qwen3Moe"``).
        description: for ``register_architectures`` (``sloth plugins list``).
        kinds: which :data:`SUFFIXES` kinds exist and are patched.
        moe_options: :func:`patch_moe_block`'s keywords (``{"normalize": True}``), if any.
    """

    model_type: str
    prefix: str
    description: str = ""
    kinds: tuple[str, ...] = DENSE_KINDS
    moe_options: dict[str, Any] | None = None

    def classes(self) -> dict[str, type]:
        """``{kind: class}``, importing the modeling file."""
        name = f"transformers.models.{self.model_type}.modeling_{self.model_type}"
        module = importlib.import_module(name)
        return {kind: getattr(module, self.prefix + SUFFIXES[kind]) for kind in self.kinds}


def patch_modeling(
    model: torch.nn.Module,
    ops: OpRegistry,
    *,
    plugin: str,
    architectures: Iterable[ArchitectureSpec],
    **options: Any,
) -> PatchReport | None:
    """:func:`patch_architecture` with the classes of the entry of ``architectures`` for
    the model's type (and its ``moe_options``); ``None`` for a model of another type, before
    any modeling file is imported. ``options``: the other keywords of
    :func:`patch_architecture` (``attention_kwargs``, ``gemma_norm``...)."""
    from . import patch_architecture  # the package imports this module

    model_type = model_type_of(model)
    entry = next((a for a in architectures if a.model_type == model_type), None)
    if entry is None:
        return None
    if entry.moe_options is not None:
        options["moe_options"] = entry.moe_options
    classes: dict[str, Any] = entry.classes()
    return patch_architecture(
        model, ops, plugin=plugin, model_types=entry.model_type, **classes, **options
    )

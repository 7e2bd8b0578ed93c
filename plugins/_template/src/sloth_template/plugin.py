"""Hook implementations of sloth-template; the entry point names this module."""

from __future__ import annotations

from sloth_core import hookimpl
from sloth_core.patching import replace_forward, restorer
from sloth_core.types import PatchReport

#: The Hugging Face ``model_type`` values this plugin makes fast.
MODEL_TYPES = ("template",)


@hookimpl
def register_architectures(register):
    for model_type in MODEL_TYPES:
        register(model_type, description="example architecture of the plugin template")


@hookimpl
def patch_layers(model, ops):
    """Route every ``*RMSNorm`` of a supported model through the ``rms_norm`` op."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        return None
    patched = []
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))

            def forward(x, module=module, eps=eps):
                return ops.rms_norm(x, module.weight, eps)

            if replace_forward(module, forward):
                patched.append(module)
    return PatchReport("sloth-template", model_type, {"rms_norm": len(patched)}, restorer(patched))

"""The ``sloth`` entry point of sloth-kernels: registers its kernels into the op registry."""

from __future__ import annotations

import importlib

from sloth_core import hookimpl
from sloth_kernels._utils import kernel_devices, triton_available

#: Modules under ``sloth_kernels`` that define ``REGISTRATIONS``: a list of dicts with
#: ``op``, ``fn`` and optionally ``dtypes`` and ``priority``. Imported on registration
#: only, so that a broken Triton fails this plugin (listed as failed), never the core.
KERNEL_MODULES: tuple[str, ...] = (
    "norms",
    "rope",
    "activations",
    "cross_entropy",
    "fused_linear_cross_entropy",
    "log_probs",
    "nf4",
    "lora",
    "lora_mlp",
    "moe",
)

PRIORITY = 10


@hookimpl
def register_kernels(register):
    """Register every Triton kernel of this distribution (CUDA; CPU under the interpreter)."""
    devices = kernel_devices()
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"sloth_kernels.{module_name}")
        for entry in module.REGISTRATIONS:
            register(
                entry["op"],
                entry["fn"],
                devices=devices,
                dtypes=entry.get("dtypes"),
                priority=entry.get("priority", PRIORITY),
                available=triton_available,
            )

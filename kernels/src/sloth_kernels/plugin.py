"""The ``sloth`` entry point of sloth-kernels: registers its kernels into the op registry."""

from __future__ import annotations

from sloth_core import hookimpl

# Each entry: (op, module under sloth_kernels that defines ``OP_IMPL``). Kernels are
# imported on registration only, so a missing Triton fails this plugin, not the core.
KERNELS: tuple[tuple[str, str], ...] = ()


@hookimpl
def register_kernels(register):
    """Register every Triton kernel of this distribution for CUDA devices."""
    import importlib

    for op, module_name in KERNELS:
        module = importlib.import_module(f"sloth_kernels.{module_name}")
        register(op, module.OP_IMPL, **module.OP_OPTIONS)

"""Launching a Triton kernel through its compiled handle, past ``JITFunction.run``.

``kernel[grid](...)`` binds and specializes every argument in Python on every call before
the launch: measured on an H100 (docs/benchmarks.md, session 26) that costs the host 35 to
96 µs a launch (``rope``, with 30 arguments, the most), where an aten op costs 12. A
host-bound step (llama-1b's, 250 Triton launches) spends 15 ms so. :func:`launch` keeps
the compiled kernel of each specialization under a key of its own, a superset of what
Triton specializes on (each tensor's dtype and 16-byte alignment, each integer's width
class, divisibility by 16 and equality to 1, each constexpr's value, the launch
options and the device), and launches through ``CompiledKernel[grid](*args)`` with every
argument in the kernel's signature order, as ``JITFunction.run`` passes them.

Opt-in with ``SLOTH_FAST_LAUNCH=1`` until measured on a GPU against the JIT path. Under the
interpreter, and from the first launch the compiled handle refuses (a Triton whose
launcher takes another argument list), every launch goes through ``kernel[grid]``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from sloth_kernels._utils import interpreting

ENV = "SLOTH_FAST_LAUNCH"
_compiled: dict[tuple, Any] = {}
_refused = False


def enabled() -> bool:
    """Whether launches take the compiled handle (``SLOTH_FAST_LAUNCH=1``, not interpreting)."""
    return not _refused and not interpreting() and os.environ.get(ENV, "0") == "1"


def _spec(arg: Any) -> Any:
    """What Triton specializes ``arg`` on, or more."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.device.index, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return "b", arg
    if isinstance(arg, int):
        width = "i32" if -(2**31) <= arg < 2**31 else "u64" if arg >= 2**63 else "i64"
        return width, arg % 16 == 0, arg == 1
    if isinstance(arg, float):
        return "f"
    return "v", arg  # None, a constexpr's value (a number, a string, a dtype)


def _ordered(kernel: Any, args: tuple, kwargs: dict) -> list | None:
    """Every argument in ``kernel``'s signature order (defaults filled in), or ``None``
    where one is neither given nor defaulted."""
    ordered = list(args)
    for param in kernel.params[len(args) :]:
        name = param.name
        if name in kwargs:
            ordered.append(kwargs[name])
        elif param.has_default:
            ordered.append(param.default)
        else:
            return None
    return ordered


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, through the compiled kernel of this
    specialization once there is one (see the module docstring)."""
    global _refused
    if not enabled():
        kernel[grid](*args, **kwargs)
        return
    # Keywords that name no parameter are launch options (num_warps, num_stages, ...):
    # every one of them is in the key, whatever this Triton offers.
    names = {param.name for param in kernel.params}
    arguments = {k: v for k, v in kwargs.items() if k in names}
    options = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in names))
    ordered = _ordered(kernel, args, arguments)
    if ordered is None:
        kernel[grid](*args, **kwargs)
        return
    # A constexpr is compiled in: its value is the key (a parameter that does not say
    # what it is counts as one).
    specs = (
        ("c", arg) if getattr(param, "is_constexpr", True) else _spec(arg)
        for param, arg in zip(kernel.params, ordered, strict=True)
    )
    key = (kernel, torch.cuda.current_device(), options, *specs)
    compiled = _compiled.get(key)
    if compiled is None:
        # The JIT path compiles (or finds) it and launches; its handle serves the next.
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None:
            _compiled[key] = compiled
        return
    grid3 = (*grid, 1, 1)[:3]
    try:
        compiled[grid3](*ordered)
    except TypeError:  # this Triton's launcher takes other arguments: the JIT path from now
        _refused = True
        _compiled.clear()
        kernel[grid](*args, **kwargs)

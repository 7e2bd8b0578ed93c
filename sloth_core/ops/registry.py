"""The op registry: named ops, their torch references, and faster implementations.

Architecture plugins call ops by name (``ops.rms_norm(x, w, eps)``); kernel sets register
implementations per op for the devices and dtypes they serve, with a priority. The
registry picks, per call, the highest-priority implementation that serves the tensor's
device and dtype and says it is available, and falls back to the reference, which serves
everything. ``SLOTH_KERNELS=torch`` forces the references; ``SLOTH_KERNELS=<provider>``
allows only that provider's implementations (plus the references).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

REFERENCE = "torch"

#: Every dtype a kernel may claim to serve when it passes no ``dtypes``.
FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


@dataclass(frozen=True)
class OpImpl:
    """One implementation of a named op."""

    op: str
    fn: Callable[..., Any]
    provider: str
    devices: frozenset[str] | None = None  # None: every device type
    dtypes: frozenset[torch.dtype] | None = None  # None: every dtype
    priority: int = 0
    available: Callable[[], bool] | None = None  # e.g. "triton imports and finds a GPU"

    def serves(self, device: str, dtype: torch.dtype | None) -> bool:
        if self.devices is not None and device not in self.devices:
            return False
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return False
        return self.available is None or bool(self.available())


@dataclass
class OpDef:
    """A named op: its documented signature and its reference implementation."""

    name: str
    reference: Callable[..., Any]
    doc: str
    impls: list[OpImpl] = field(default_factory=list)


def _forced_provider() -> str | None:
    value = os.environ.get("SLOTH_KERNELS", "").strip()
    return value or None


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
        tensor = getattr(value, "weight", None)  # LoRA weight bundles carry their base weight
        if isinstance(tensor, torch.Tensor):
            return tensor
    return None


class OpRegistry:
    """Named ops with a reference each and any number of registered implementations."""

    def __init__(self) -> None:
        self._ops: dict[str, OpDef] = {}
        self._cache: dict[tuple[str, str, torch.dtype | None, str | None], OpImpl] = {}

    # -- definition and registration -------------------------------------------------
    def define(self, name: str, reference: Callable[..., Any], doc: str | None = None) -> None:
        """Declare op ``name`` with its plain-torch reference (core only)."""
        if name in self._ops:
            raise ValueError(f"op {name!r} is already defined")
        self._ops[name] = OpDef(name, reference, doc or (reference.__doc__ or "").strip())
        self._cache.clear()

    def register(
        self,
        op: str,
        fn: Callable[..., Any],
        *,
        provider: str,
        devices: Iterable[str] | None = ("cuda",),
        dtypes: Iterable[torch.dtype] | None = None,
        priority: int = 0,
        available: Callable[[], bool] | None = None,
    ) -> None:
        """Register ``fn`` as an implementation of ``op`` by ``provider``."""
        if op not in self._ops:
            known = ", ".join(sorted(self._ops))
            raise KeyError(f"{provider} registers unknown op {op!r}; known ops: {known}")
        if provider == REFERENCE:
            raise ValueError(f"provider name {REFERENCE!r} is reserved for the references")
        impl = OpImpl(
            op=op,
            fn=fn,
            provider=provider,
            devices=None if devices is None else frozenset(devices),
            dtypes=None if dtypes is None else frozenset(dtypes),
            priority=priority,
            available=available,
        )
        self._ops[op].impls.append(impl)
        self._cache.clear()

    # -- lookup ----------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._ops

    def names(self) -> list[str]:
        return sorted(self._ops)

    def definition(self, name: str) -> OpDef:
        try:
            return self._ops[name]
        except KeyError:
            raise KeyError(f"unknown op {name!r}; known ops: {', '.join(self.names())}") from None

    def reference(self, name: str) -> Callable[..., Any]:
        return self.definition(name).reference

    def resolve(
        self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> OpImpl:
        """The implementation that serves ``device``/``dtype`` best, the reference last."""
        device_type = torch.device(device).type
        forced = _forced_provider()
        key = (name, device_type, dtype, forced)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        definition = self.definition(name)
        chosen = OpImpl(name, definition.reference, REFERENCE)
        if forced != REFERENCE:
            candidates = [
                impl
                for impl in definition.impls
                if (forced is None or impl.provider == forced) and impl.serves(device_type, dtype)
            ]
            if candidates:
                chosen = max(candidates, key=lambda impl: impl.priority)
        self._cache[key] = chosen
        return chosen

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run op ``name``, dispatching on the device and dtype of its first tensor."""
        tensor = _first_tensor(args, kwargs)
        if tensor is None:
            impl = self.resolve(name)
        else:
            impl = self.resolve(name, tensor.device, tensor.dtype)
        return impl.fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # ``ops.rms_norm(...)``: the spelling architecture plugins use.
        if name.startswith("_") or name not in self.__dict__.get("_ops", {}):
            raise AttributeError(name)

        def dispatch(*args: Any, **kwargs: Any) -> Any:
            return self(name, *args, **kwargs)

        dispatch.__name__ = name
        dispatch.__doc__ = self._ops[name].doc
        return dispatch

    def table(
        self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> dict[str, str]:
        """``{op: provider}`` as :meth:`resolve` chooses for ``device``/``dtype``."""
        return {name: self.resolve(name, device, dtype).provider for name in self.names()}

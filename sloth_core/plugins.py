"""The plugin manager: built-ins first, then entry points of group ``sloth``, each isolated.

A plugin that fails to import, whose distribution's declared requirements are not met,
that implements a hook no spec defines, or whose discovery hook raises, is recorded as
``failed`` with the reason and left out; the other plugins load as if it were not there.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
from packaging.requirements import InvalidRequirement, Requirement

from sloth_core import PROJECT_NAME, hookspecs
from sloth_core.formats import (
    ExportFormat,
    QuantizationMethod,
    WeightType,
    as_weight_types,
    with_plugin,
)

if TYPE_CHECKING:
    import torch

    from sloth_core.ops import OpRegistry
    from sloth_core.types import ExportResult, ModelSpec, PatchReport, QuantizationPlan

ENTRY_POINT_GROUP = "sloth"

#: Built-in plugins, registered before entry points so that installed plugins win.
BUILTIN_PLUGINS = (
    "sloth_core.default_plugins.hf_loader",
    "sloth_core.default_plugins.torch_loss",
    "sloth_core.default_plugins.exporters",
)

# A plugin's kind, for listing, follows from the hooks it implements.
_KIND_OF_HOOK = {
    "register_architectures": "architecture",
    "load_model": "loader",
    "patch_layers": "architecture",
    "register_kernels": "kernels",
    "register_quantizers": "quantizer",
    "quantize": "quantizer",
    "register_exporters": "exporter",
    "export": "exporter",
    "compute_loss": "loss",
}
_KIND_ORDER = ("architecture", "kernels", "quantizer", "exporter", "loader", "loss")


@dataclass
class PluginRecord:
    """What the manager knows of one plugin, active or not."""

    name: str
    source: str  # "builtin", "entrypoint" or "manual"
    status: str = "active"  # "active", "failed" or "disabled"
    reason: str = ""
    module: str = ""
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    architectures: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    quantizers: list[str] = field(default_factory=list)
    exporters: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        kinds = {_KIND_OF_HOOK[h] for h in self.hooks if h in _KIND_OF_HOOK}
        if "architecture" in kinds:  # an architecture plugin loads its models too
            kinds.discard("loader")
        return ", ".join(k for k in _KIND_ORDER if k in kinds) or "-"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "source": self.source,
            "status": self.status,
            "reason": self.reason,
            "module": self.module,
            "distribution": self.distribution,
            "hooks": list(self.hooks),
            "architectures": list(self.architectures),
            "ops": list(self.ops),
            "quantizers": list(self.quantizers),
            "exporters": list(self.exporters),
        }


def disabled_plugins() -> set[str]:
    """Plugin names blocked through ``SLOTH_DISABLE_PLUGINS=a,b``."""
    raw = os.environ.get("SLOTH_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def unmet_requirements(dist: metadata.Distribution) -> list[str]:
    """The requirements ``dist`` declares that the environment does not satisfy."""
    problems = []
    for line in dist.requires or ():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            problems.append(f"unparsable requirement {line!r}")
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # optional extra or another platform's dependency
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req} (installed: {installed})")
    return problems


def _error_summary(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


class SlothPluginManager:
    """pluggy's manager with sloth's loading rules and a typed, keyword-only call site.

    :param entry_points: load installed plugins (group ``sloth``); off in unit tests.
    :param builtins: register the core's default plugins.
    """

    def __init__(self, *, entry_points: bool = True, builtins: bool = True) -> None:
        from sloth_core.ops import default_registry

        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.ops: OpRegistry = default_registry()
        self.architectures: dict[str, str] = {}  # model_type -> plugin
        self.quantizers: dict[str, str] = {}  # method -> plugin
        self.exporters: dict[str, str] = {}  # format or alias -> plugin
        #: Every export format and quantization method as its plugin described it, under
        #: each of its names (:mod:`sloth_core.formats`).
        self.formats: dict[str, ExportFormat] = {}
        self.quantization_methods: dict[str, QuantizationMethod] = {}
        if os.environ.get("SLOTH_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[sloth] {msg}"))
            self.pm.enable_tracing()
        if builtins:
            for module_name in BUILTIN_PLUGINS:
                name = "builtin:" + module_name.rsplit(".", 1)[-1]
                self._add(name, partial(importlib.import_module, module_name), "builtin")
        if entry_points:
            self.load_entry_points()
        # Every plugin was checked on its own above; this is the belt to those braces.
        self.pm.check_pending()

    # -- loading ---------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Register every plugin of entry-point group ``sloth`` that is not blocked."""
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in self.records:
                continue  # two distributions claiming one name: the first wins
            dist = getattr(ep, "dist", None)
            self._add(ep.name, ep.load, "entrypoint", dist=dist, module=ep.value)

    def register(self, plugin: object, name: str | None = None) -> PluginRecord:
        """Register an object or module as a plugin by hand (tests, notebooks)."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        return self._add(name, lambda: plugin, "manual")

    def _add(
        self,
        name: str,
        load: Callable[[], object],
        source: str,
        *,
        dist: metadata.Distribution | None = None,
        module: str = "",
    ) -> PluginRecord:
        record = PluginRecord(
            name=name,
            source=source,
            module=module,
            distribution=dist.name if dist else None,
            version=dist.version if dist else None,
        )
        self.records[name] = record
        if source != "manual" and name in disabled_plugins():
            record.status, record.reason = "disabled", "blocked by SLOTH_DISABLE_PLUGINS"
            return record
        if source == "builtin":
            from sloth_core import __version__

            record.version = __version__
        if dist is not None:
            unmet = unmet_requirements(dist)
            if unmet:
                return self._fail(record, "requirements not met: " + "; ".join(unmet))
        try:
            plugin = load()
        except Exception as exc:  # a broken plugin must not take the others down
            return self._fail(record, "import failed: " + _error_summary(exc))
        record.module = record.module or getattr(plugin, "__name__", type(plugin).__name__)
        unknown = self._unknown_hooks(plugin)
        if unknown:
            return self._fail(record, "; ".join(unknown))
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # pluggy's validation: wrong argument names, ...
            return self._fail(record, "invalid hooks: " + _error_summary(exc))
        record.hooks = sorted(impl.name for impl in self.pm.get_hookcallers(plugin) or ())
        try:
            self._discover(plugin, record)
        except Exception as exc:
            self.pm.unregister(plugin)
            self._forget(name)
            return self._fail(record, "registration failed: " + _error_summary(exc))
        return record

    @staticmethod
    def _fail(record: PluginRecord, reason: str) -> PluginRecord:
        record.status = "failed"
        record.reason = reason
        print(f"sloth: plugin {record.name!r} failed: {reason}", file=sys.stderr)
        return record

    def _unknown_hooks(self, plugin: object) -> list[str]:
        """Hook implementations in ``plugin`` that match no spec (misspelt names)."""
        known = self.hook_specs()
        problems = []
        for attr in dir(plugin):
            value = getattr(plugin, attr, None)
            if not callable(value) or not hasattr(value, f"{PROJECT_NAME}_impl"):
                continue
            opts = getattr(value, f"{PROJECT_NAME}_impl") or {}
            hook_name = opts.get("specname") or attr
            if hook_name in known or opts.get("optionalhook"):
                continue
            close = difflib.get_close_matches(hook_name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown hook {hook_name!r}{hint}")
        return problems

    def _discover(self, plugin: object, record: PluginRecord) -> None:
        """Run ``plugin``'s own ``register_*`` hooks, crediting what they declare to it."""

        def arch(model_type: str, *, description: str = "") -> None:
            record.architectures.append(model_type)
            self.architectures.setdefault(model_type, record.name)

        def kernel(op: str, fn: Callable[..., Any], **options: Any) -> None:
            self.ops.register(op, fn, provider=record.name, **options)
            record.ops.append(op)

        def exporter(
            format: ExportFormat | str, *, quantizations: Iterable[WeightType | str] | None = None,
            aliases: Iterable[str] = (), **fields: Any,
        ) -> None:  # fmt: skip
            if not isinstance(format, ExportFormat):
                weight_types = None if quantizations is None else as_weight_types(quantizations)
                format = ExportFormat(
                    format, aliases=tuple(aliases), quantizations=weight_types, **fields
                )
            format = with_plugin(format, record.name)
            record.exporters.append(format.name)
            for key in format.names():
                if key not in self.exporters:  # the first plugin to claim a name keeps it
                    self.exporters[key] = record.name
                    self.formats[key] = format

        def quantizer(method: QuantizationMethod | str, **fields: Any) -> None:
            if not isinstance(method, QuantizationMethod):
                fields["aliases"] = tuple(fields.get("aliases", ()))
                method = QuantizationMethod(method, **fields)
            method = with_plugin(method, record.name)
            record.quantizers.append(method.name)
            for key in method.names():
                if key not in self.quantizers:
                    self.quantizers[key] = record.name
                    self.quantization_methods[key] = method

        registrars = {
            "register_architectures": arch,
            "register_kernels": kernel,
            "register_quantizers": quantizer,
            "register_exporters": exporter,
        }
        for hook_name, registrar in registrars.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=registrar)

    def _forget(self, name: str) -> None:
        tables = (
            self.architectures, self.quantizers, self.exporters, self.formats,
            self.quantization_methods,
        )  # fmt: skip
        for table in tables:
            for key in [k for k, v in table.items() if getattr(v, "plugin", v) == name]:
                del table[key]
        for op in self.ops.names():
            definition = self.ops.definition(op)
            definition.impls[:] = [i for i in definition.impls if i.provider != name]

    # -- queries ---------------------------------------------------------------------
    def export_format(self, name: str) -> ExportFormat | None:
        """The format ``name`` (or an alias) as its plugin declared it, with what it leaves
        out (quantizations, default, verifier) taken from the format it wraps."""
        format = self.formats.get(name)
        seen = {name}
        wrapped = format
        while wrapped is not None and wrapped.wraps and wrapped.wraps not in seen:
            seen.add(wrapped.wraps)
            wrapped = self.formats.get(wrapped.wraps)
            if wrapped is None:
                break
            assert format is not None  # wrapped was format, then what it wraps
            format = replace(
                format,
                quantizations=format.quantizations
                if format.quantizations is not None
                else wrapped.quantizations,
                default_quantization=format.default_quantization or wrapped.default_quantization,
                verify=format.verify or wrapped.verify,
                verify_needs=format.verify_needs or wrapped.verify_needs,
            )
        return format

    def plugins(self, *, include_builtins: bool = False) -> list[PluginRecord]:
        return [r for r in self.records.values() if include_builtins or r.source != "builtin"]

    def implementers(self, hook_name: str) -> list[str]:
        """Names of the active plugins implementing ``hook_name``, in call order."""
        caller = getattr(self.pm.hook, hook_name)
        return [impl.plugin_name for impl in reversed(caller.get_hookimpls())]

    @staticmethod
    def hook_specs() -> list[str]:
        """The hooks :mod:`sloth_core.hookspecs` specifies (not the other names it holds)."""
        marker = f"{PROJECT_NAME}_spec"
        return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), marker))

    def hook_names(self) -> list[str]:
        return sorted(n for n in dir(self.pm.hook) if not n.startswith("_"))

    # -- the typed call site: every hook called with keywords, its result typed ------
    def load_model(self, *, spec: ModelSpec) -> tuple[Any, Any] | None:
        return self.pm.hook.load_model(spec=spec)

    def quantize(self, *, spec: ModelSpec) -> QuantizationPlan | None:
        return self.pm.hook.quantize(spec=spec)

    def patch_layers(self, *, model: torch.nn.Module) -> list[PatchReport]:
        """Run every ``patch_layers`` hook, then bind this manager to what they patched
        (its ``compute_loss`` on patched causal LMs; ``model.sloth_host``): a patched model
        calls the plugins it was patched with, never a process-wide global."""
        from sloth_core.patches.causal_lm import bind_loss
        from sloth_core.patches.lm_head import causal_lm_log_probs

        reports = [r for r in self.pm.hook.patch_layers(model=model, ops=self.ops, host=self) if r]
        _check_quantized_experts(model, reports)
        # Log-probs are a core service over the token_log_probs op (kernel sets accelerate
        # it), not a hook: no architecture has needed its own yet.
        bind_loss(model, self.compute_loss, partial(causal_lm_log_probs, ops=self.ops))
        model.sloth_host = self  # type: ignore[assignment]  # torch: setattr takes any object
        return reports

    def compute_loss(
        self,
        *,
        model: torch.nn.Module,
        hidden_states: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        loss = self.pm.hook.compute_loss(
            model=model,
            hidden_states=hidden_states,
            labels=labels,
            ops=self.ops,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
        )
        if loss is None:
            raise RuntimeError("no plugin computed the loss (is the builtin torch_loss blocked?)")
        return loss

    def export(
        self, *, model: torch.nn.Module, tokenizer: Any, format: str, path: Path, options: dict
    ) -> ExportResult | None:
        return self.pm.hook.export(
            model=model, tokenizer=tokenizer, format=format, path=path, options=options,
            host=self,
        )  # fmt: skip

    def __deepcopy__(self, memo: dict) -> SlothPluginManager:
        # A copied model (TRL's reference model, an EMA copy) keeps the plugins it was
        # patched with: the manager is a service, not part of the model's state.
        return self


_manager: SlothPluginManager | None = None
_lock = threading.Lock()


def get_plugin_manager() -> SlothPluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = SlothPluginManager()
        return _manager


def reset_plugin_manager(
    manager: SlothPluginManager | None = None,
) -> SlothPluginManager | None:
    """Replace the process-wide manager (``None``: reload on next use); returns the one it
    replaced, to put back. For tests and notebooks."""
    global _manager
    with _lock:
        previous, _manager = _manager, manager
    return previous


@contextlib.contextmanager
def using_plugin_manager(manager: SlothPluginManager) -> Iterator[SlothPluginManager]:
    """Make ``manager`` the process-wide default for the block: what ``FastLanguageModel``
    and ``sloth_core.export`` start from when given no manager. A model keeps the manager
    that patched it afterwards (its forward never looks the default up)."""
    previous = reset_plugin_manager(manager)
    try:
        yield manager
    finally:
        reset_plugin_manager(previous)


def _check_quantized_experts(model: torch.nn.Module, reports: list[PatchReport]) -> None:
    """Refuse a model whose quantized experts (FP8) sit in an MoE block no plugin patched:
    it would load, then fail (or compute garbage) at its first forward."""
    from sloth_core.errors import SlothError
    from sloth_core.patches.moe import unpatched_quantized_experts
    from sloth_core.patching import model_type_of

    blocks = unpatched_quantized_experts(model)
    if not blocks:
        return
    why = {name: reason for report in reports for name, reason in report.skipped.items()}
    block = blocks[0]
    reason = why.get(block) or f"no installed plugin patches {model_type_of(model)!r} MoE blocks"
    more = f" (and {len(blocks) - 1} more)" if len(blocks) > 1 else ""
    raise SlothError(
        f"{block}{more}: its experts are stored quantized (quantization='fp8'), which only "
        f"sloth's patched MoE block computes, and it was left unpatched: {reason}. Load the "
        "model without quantization='fp8'"
    )

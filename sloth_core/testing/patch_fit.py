"""Which of sloth's patchers compute what a model's modules compute: ``sloth plugins new``
asks this before it names a class in the ``patch_layers`` it writes.

Each patcher assumes a shape of module (see :mod:`sloth_core.patches`): an RMSNorm
(``w * x / rms(x)``, or Gemma's ``(1 + w)``), a gated MLP (``gate_proj``/``up_proj``/
``down_proj`` with an activation ``lora_mlp`` implements), a Llama-style attention
(``q_proj``... with q/k norms per head, the module's ``scaling``), and a causal LM whose
logits are the output head's (softcapped where the config says). A model can break any of
these in ways its class names do not show: a norm over the whole projection (OLMo 2), a
plain MLP (StarCoder 2), a LayerNorm, a config scalar the patched forward never reads
(Granite's ``logits_scaling``, Cohere's ``logit_scale``), a dropout it skips.

So every candidate is first looked at (the cheap, explainable checks: attributes and
parameter shapes), then patched alone in a tiny model and run through the parity harness
against the unpatched model, on the tiny config and on :func:`~.varied.varied_config`
(every float off its default, every flag flipped), and in training with each dropout at 1
(dropout is random, but at 1 it is exact: it zeroes). Only what passes is patched; every
other candidate gets the reason, for the table ``sloth plugins new`` prints and the
comments it writes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .models import TINY_CONFIGS, init_tiny_model, tiny_config
from .parity import ParityError, check_parity, kernels_mode
from .varied import DROPOUT, config_variations, field_defaults, varied_config

__all__ = ["ArchitectureFit", "Finding", "fit_architecture", "tiny_arguments"]

#: What a patched row says: it was checked, not assumed.
_PASSES = "; parity holds on the tiny and varied configs"
#: The activations ``lora_mlp`` implements, by transformers' names.
_GATED = "silu/swish, gelu, gelu_pytorch_tanh"


@dataclass
class Finding:
    """One row of the table: a module kind, its class, whether it is patched and why."""

    kind: str  # norm, mlp, attention, causal_lm
    cls: str
    argument: str | None  # the patch_architecture argument (rms_norm, fused_mlp...)
    patched: bool = False
    why: str = ""


@dataclass
class ArchitectureFit:
    """What :func:`fit_architecture` found: the rows, and the arguments they make."""

    findings: list[Finding] = field(default_factory=list)
    gemma_norm: bool = False

    @property
    def arguments(self) -> dict[str, list[str]]:
        """``patch_architecture`` argument -> the classes that pass, in table order."""
        out: dict[str, list[str]] = {}
        for row in self.findings:
            if row.patched and row.argument:
                out.setdefault(row.argument, []).append(row.cls)
        return out

    def table(self) -> str:
        rows = [("module kind", "class", "patched", "why")]
        rows += [(r.kind, r.cls, "yes" if r.patched else "no", r.why) for r in self.findings]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        return "\n".join(
            " | ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row))
            for row in rows
        )


def tiny_arguments(model_type: str) -> tuple[str, str | None]:
    """``(arch, model_type)`` of the tiny config a generated test builds: the model type's
    own tiny config where sloth has one, else the tiny Llama's sizes as that type."""
    return (model_type, None) if model_type in TINY_CONFIGS else ("llama", model_type)


# -- the cheap checks: attributes and shapes -----------------------------------------------


def _linears(module: torch.nn.Module) -> str:
    names = [n for n, m in module.named_children() if isinstance(m, torch.nn.Linear)]
    return ", ".join(names) or "none"


def _norm_problem(module: torch.nn.Module) -> str | None:
    weight = getattr(module, "weight", None)
    if getattr(module, "bias", None) is not None:
        return "subtracts the mean and adds a bias (a LayerNorm): rms_norm does neither"
    if not isinstance(weight, torch.Tensor):
        return "no weight: rms_norm scales by one"
    if weight.dim() != 1:
        return f"a weight of shape {tuple(weight.shape)}: rms_norm takes one [D] weight"
    if not any(isinstance(getattr(module, n, None), float) for n in ("variance_epsilon", "eps")):
        return "no variance_epsilon or eps: not an RMSNorm sloth knows"
    return None


def _mlp_argument(module: torch.nn.Module, config: Any) -> tuple[str | None, str]:
    from sloth_core.patches import mlp_activation

    if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
        argument = "fused_mlp"
    elif all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
        argument = "mlp"
    else:
        return None, f"not gated (projections: {_linears(module)}): lora_mlp is gated only"
    if mlp_activation(config) is None:
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        return None, f"activation {act!r}: lora_mlp implements {_GATED}"
    return argument, ""


def _attention_argument(module: torch.nn.Module) -> tuple[str | None, str]:
    if getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None) is None:
        return None, "its modeling file has no eager_attention_forward to fall back on"
    if hasattr(module, "qkv_proj") and hasattr(module, "o_proj"):
        argument = "fused_attention"
    elif all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        argument = "attention"
    else:
        return None, f"not q/k/v/o_proj (projections: {_linears(module)})"
    head_dim = getattr(module, "head_dim", None)
    for name in ("q_norm", "k_norm"):
        weight = getattr(getattr(module, name, None), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.shape[-1] != head_dim:
            return None, (
                f"{name} spans the whole projection ({weight.shape[-1]} = heads x head_dim), "
                "not one head: patch_attention normalises per head"
            )
    return argument, ""


# -- the behaviour checks: each candidate patched alone, through the parity harness --------


@dataclass
class _Probe:
    model_type: str
    argument: str
    cls: type
    options: dict[str, Any]

    def manager(self):
        from sloth_core import hookimpl
        from sloth_core.patches import patch_architecture
        from sloth_core.plugins import SlothPluginManager

        def patch_layers(model, ops):
            return patch_architecture(
                model, ops, plugin="sloth-probe", model_types=(self.model_type,),
                **{self.argument: self.cls}, **self.options,
            )  # fmt: skip

        plugin = types.ModuleType("sloth_probe")
        plugin.patch_layers = hookimpl(patch_layers)
        manager = SlothPluginManager(entry_points=False)
        manager.register(plugin, name="sloth-probe")
        return manager


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # transformers' warnings about the tiny configs are not the user's business here.
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def _parity_problem(probe: _Probe, config: Any) -> str | None:
    """``None`` if the candidate patched alone passes parity on ``config``; else why not."""
    from sloth_core.patches import SLOTH_ATTENTION

    try:
        with _quiet():
            report = check_parity(
                config, manager=probe.manager(), attn_implementation=SLOTH_ATTENTION
            )
    except ParityError:
        return "the patcher leaves it alone (a shape it does not handle)"
    except Exception as exc:  # noqa: BLE001 - whatever breaks, the patch is not for this model
        return f"the patched forward raises {type(exc).__name__}: {str(exc)[:120]}"
    if report.ok:
        return None
    check = report.failures[0]
    return f"{check.name} off by {check.error:.1e} (bound {check.bound:.0e})"


def _dropout_ignored(probe: _Probe, config: Any, name: str) -> bool:
    """Whether, in training with ``name`` at 1 (everything it drops is zeroed: no chance
    involved), the patched model differs from the unpatched one."""
    config = copy.deepcopy(config)
    setattr(config, name, 1.0)
    ids = torch.arange(1, 13)[None]
    logits = []
    with _quiet(), kernels_mode("torch"):
        for manager in (None, probe.manager()):
            model = init_tiny_model(config)
            if manager is not None:
                manager.patch_layers(model=model)
            model.train()
            with torch.no_grad():
                logits.append(model(input_ids=ids, use_cache=False).logits)
    reference, patched = logits
    if not torch.isfinite(reference).all():
        return False  # nothing to compare against
    return not torch.allclose(patched, reference, rtol=1e-5, atol=1e-5)


def _probe_problem(probe: _Probe, configs: dict[str, Any], tiny: tuple[str, str | None]) -> str:
    """Why the candidate cannot be patched, or ``""``: parity on each config (naming the
    varied fields it ignores), then every dropout of the config at 1 in training."""
    for name, config in configs.items():
        problem = _parity_problem(probe, config)
        if problem is None:
            continue
        if name == "varied":
            arch, model_type = tiny
            ignored = [
                f"{field}={value}"
                for field, value in config_variations(arch, model_type=model_type).items()
                if _parity_problem(
                    probe, tiny_config(arch, model_type=model_type, **{field: value})
                )
            ]
            if ignored:
                return f"differs once {', '.join(ignored)} ({problem}): a config value it ignores"
        return f"differs on the {name} config: {problem}"
    fields = field_defaults(type(configs["tiny"]))
    for name, (default, _) in fields.items():
        if isinstance(default, float) and any(part in name for part in DROPOUT):
            if _dropout_ignored(probe, configs["tiny"], name):
                return f"ignores {name} (differs in training with {name}=1)"
    return ""


def _module_types(model: torch.nn.Module) -> Iterator[tuple[str, type, torch.nn.Module]]:
    """``(kind, class, an instance)`` of every candidate, in table order, each class once."""
    seen: set[type] = set()
    norms, mlps, attentions = [], [], []
    for name, module in model.named_modules():
        cls = type(module)
        if cls in seen:
            continue
        last = name.rsplit(".", 1)[-1]
        if "norm" in cls.__name__.lower():
            norms.append(("norm", cls, module))
        elif last in ("mlp", "feed_forward"):
            mlps.append(("mlp", cls, module))
        elif last in ("self_attn", "attention", "attn"):
            attentions.append(("attention", cls, module))
        else:
            continue
        seen.add(cls)
    yield from norms
    yield from mlps
    yield from attentions


def _norm_options(probe_for: Callable[[dict[str, Any]], str], gemma: bool | None) -> tuple:
    """Try the norm as a plain RMSNorm and as Gemma's ``1 + w`` (or only ``gemma`` if the
    other norms already decided it): ``(gemma_norm or None, problem)``."""
    modes = [False, True] if gemma is None else [gemma]
    problems = []
    for mode in modes:
        problem = probe_for({"gemma_norm": mode})
        if not problem:
            return mode, ""
        problems.append(problem)
    return None, problems[0]


@functools.lru_cache(maxsize=16)
def fit_architecture(model_type: str, window: bool) -> ArchitectureFit:
    """The table of ``model_type``'s modules: which of sloth's patchers computes what each
    computes (see the module docstring). ``window``: its attention passes a
    ``sliding_window`` (probed with ``sliding_window_kwargs`` and a short window).

    Raises:
        Exception: whatever stops transformers building the tiny model of this type.
    """
    from sloth_core.patches import sliding_window_kwargs

    tiny = tiny_arguments(model_type)
    arch, tiny_type = tiny
    with _quiet():
        configs = {  # names for the table: "differs on the tiny config"...
            "tiny": tiny_config(arch, model_type=tiny_type),
            "varied": varied_config(arch, model_type=tiny_type),
        }
        if window:
            configs["window"] = tiny_config(arch, model_type=tiny_type, sliding_window=6)
        model = init_tiny_model(configs["tiny"])
    config = model.config
    fit = ArchitectureFit()
    modeling = sys.modules[type(model).__module__]
    options = {"attention_kwargs": sliding_window_kwargs} if window else {}

    def problem(argument: str, cls: type, extra: dict[str, Any]) -> str:
        probe = _Probe(model_type, argument, cls, {**options, **extra})
        return _probe_problem(probe, configs, tiny)

    gemma: bool | None = None
    for kind, cls, module in _module_types(model):
        row = Finding(kind, cls.__name__, None)
        fit.findings.append(row)
        if sys.modules.get(cls.__module__) is not modeling:
            row.why = f"{cls.__module__}.{cls.__name__}, not a class of the model's modeling file"
            if kind == "norm":
                owner = cls.__module__.split(".")[0]  # torch's LayerNorm...
                row.why = f"{owner}'s {cls.__name__}: " + (
                    _norm_problem(module) or "not the model's"
                )
            continue
        if kind == "norm":
            row.why = _norm_problem(module) or ""
            if not row.why:
                mode, row.why = _norm_options(functools.partial(problem, "rms_norm", cls), gemma)
                row.argument = "rms_norm"
                if mode is not None:
                    gemma, row.patched = mode, True
                    row.why = "RMSNorm" + (", (1 + w): gemma_norm" if mode else "") + _PASSES
            continue
        argument, row.why = (_mlp_argument(module, config) if kind == "mlp"
                             else _attention_argument(module))  # fmt: skip
        if argument is not None:
            row.argument, row.why = argument, problem(argument, cls, {})
            row.patched = not row.why
            row.why = row.why or f"{argument}{_PASSES}"
    causal_lm = type(model)
    row = Finding("causal_lm", causal_lm.__name__, "causal_lm")
    row.why = problem("causal_lm", causal_lm, {})
    row.patched, row.why = not row.why, row.why or f"logits: the output head's{_PASSES}"
    fit.findings.append(row)
    fit.gemma_norm = bool(gemma)
    return fit

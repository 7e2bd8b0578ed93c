"""Parity of a patched model with the unpatched Hugging Face model: the check every
architecture plugin runs on its tiny configs.

Two models are built from the same weights; one goes through ``patch_layers`` of the
installed plugins (or of the ``manager`` given). In eval the logits are compared; then
both get the same LoRA adapters (``lora_B`` non-zero, so adapters change the output and
get gradients), the patched one is patched again (as ``get_peft_model`` of the API does),
and in train mode the loss and the gradient of every LoRA parameter are compared.

In fp32 the two must agree to rounding. In bf16 (or fp16) exact agreement means nothing,
so both run in bf16 and are measured against an fp32 run of the unpatched model with the
same (bf16-rounded) weights: the patched model may be at most ``factor`` times as far off
as the unpatched model, plus a small floor. See :data:`TOLERANCES` for the numbers and why.

With ``packed=True`` rows hold several sequences (positions restarting, no attention
mask); the harness first checks that the unpatched model keeps them apart.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from sloth_core.plugins import SlothPluginManager
from sloth_core.quiet import peft_calls

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from .datasets import Batch, make_batch
from .models import init_tiny_model

try:  # a ParitySkipped raised inside a test is reported by pytest as a skip
    import pytest

    _SkipBase: type[BaseException] = pytest.skip.Exception
except ImportError:  # pragma: no cover - pytest is not a runtime dependency
    _SkipBase = Exception

__all__ = [
    "TOLERANCES",
    "Check",
    "ParityError",
    "ParityReport",
    "ParitySkipped",
    "Tolerance",
    "assert_parity",
    "attach_lora",
    "check_parity",
    "kernels_mode",
]


class ParitySkipped(_SkipBase):  # type: ignore[misc, valid-type]
    """The asked-for kernels cannot run here (pytest reports it as a skip)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ParityError(AssertionError):
    """The harness cannot compare anything: no plugin patched the model, or one patched
    globally (a class or module of transformers) so the reference is not unpatched."""


@dataclass(frozen=True)
class Tolerance:
    """Bounds of one dtype. fp32: logits and loss are absolute errors, gradients relative
    (``max |patched - ref| / max |ref|`` per LoRA tensor, so near-zero entries do not blow
    up). With ``factor`` (low precision), each bound is ``factor * unpatched error + floor``
    and every error is relative: the loss's ``|x - ref| / |ref|``, the logits' and
    gradients' ``||x - ref|| / ||ref||`` (L2)."""

    logits: float
    loss: float
    grad: float
    factor: float | None = None


# Measured with sloth-llama on the tiny llama configs (untied, tied, GQA, llama3 rope,
# vocab 1007; CPU), worst case over them:
# fp32: only the summation order may differ. Torch references: logits 0 (bit for bit),
#   loss 4.8e-7, gradients 6.3e-7 relative. Triton kernels (interpreter): logits 3.8e-6
#   (of logits up to ~5), loss 4.8e-7, gradients 2.2e-6. The bounds leave 2.5-20x room
#   for other summation orders (GPU GEMM tiling); a 1e-3 relative bug (an MLP output
#   scaled by 1.001) lands 20-400x above them, an eps of 1e-5 for 1e-6 or a backward 1 %
#   off further still.
# bf16: the unpatched model's own error against fp32 (relative L2) is 1.1-1.4e-2 on
#   logits and 2.3-4.2e-2 on the worst gradient; below 8e-4 relative on the loss, whose
#   rounding errors mostly cancel in the mean. Patched with the torch references it is
#   within 15 % of that. A kernel that rounds as PyTorch does should stay near 1x, hence
#   ``factor=2`` (on a GPU; not measured here). The loss's floor is bf16's unit roundoff
#   (2^-8): no bf16 path can promise a loss closer than one rounding of itself. bf16
#   catches gross and bf16-only bugs (a lost LoRA scaling, garbage from a wrong cast); a
#   1 % bug hides in bf16's noise at this size: the fp32 bounds are there for those.
#: Triton's CPU interpreter truncates fp32 -> bf16 casts instead of rounding to nearest
#: (the rms_norm kernel's bf16 output equals truncation bit for bit): twice the error, and
#: biased. Measured up to 2.5x the unpatched error (worst gradient group, 12-token rows),
#: median 1.5x; the loss, whose biased errors do not cancel, up to 2.7e-3 relative.
#: Used instead of ``factor`` for kernels on the CPU.
INTERPRETER_FACTOR = 3.0

TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(logits=1e-5, loss=5e-6, grad=5e-5),
    torch.bfloat16: Tolerance(logits=2e-3, loss=2**-8, grad=5e-3, factor=2.0),
    # fp16: 3 more mantissa bits than bf16, ~8x smaller errors (unpatched: 1.4e-3 on
    # logits, 2.9e-3 on gradients; the interpreter rounds fp16 right). Floor 2^-11.
    torch.float16: Tolerance(logits=3e-4, loss=2**-11, grad=6e-4, factor=2.0),
}


@dataclass
class Check:
    """One compared quantity: the patched error, the unpatched one (bf16), the bound."""

    name: str
    error: float
    bound: float
    baseline: float | None = None
    absolute: float | None = None  # for gradients: the absolute error next to the relative

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # nan and inf fail


@dataclass
class ParityReport:
    """The numbers of one parity run; ``str(report)`` is a table for resolution notes."""

    model_type: str
    dtype: torch.dtype
    device: str
    kernels: str
    packed: bool
    factor: float | None = None  # low precision: bound = factor * unpatched error + floor
    attn: str = "sdpa"  # the patched model's attention implementation
    patched: dict[str, int] = field(default_factory=dict)
    providers: dict[str, str] = field(default_factory=dict)  # op -> who served its calls
    op_table: dict[str, str] = field(default_factory=dict)  # manager.ops.table(...)
    #: How the patched model's ``sloth_attention`` calls went (varlen, sdpa, softcap).
    attention_paths: dict[str, int] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def worst(self, prefix: str) -> float:
        """The largest error among the checks whose name starts with ``prefix``."""
        return max((c.error for c in self.checks if c.name.startswith(prefix)), default=0.0)

    def table(self) -> str:
        """The report as text: what was patched, who served each op, one line per check."""
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [
            f"parity {self.model_type} {dtype} kernels={self.kernels} attn={self.attn} "
            f"device={self.device}"
            + (" packed" if self.packed else "")
            + (f" (bound = {self.factor:g} x unpatched + floor)" if self.factor else ""),
            "patched: " + ", ".join(f"{k}={v}" for k, v in sorted(self.patched.items())),
            "ops: " + (", ".join(f"{k}={v}" for k, v in sorted(self.providers.items())) or "-"),
            "attention: "
            + (", ".join(f"{k}={v}" for k, v in sorted(self.attention_paths.items())) or "-"),
            f"{'check':<24} {'patched':>10} {'unpatched':>10} {'bound':>10}  {'abs':>9}  ok",
        ]
        for c in self.checks:
            base = "-" if c.baseline is None else f"{c.baseline:.3e}"
            absolute = "" if c.absolute is None else f"{c.absolute:.2e}"
            lines.append(
                f"{c.name:<24} {c.error:>10.3e} {base:>10} {c.bound:>10.3e}  {absolute:>9}  "
                + ("yes" if c.ok else "NO")
            )
        if self.factor:
            lines.append("relative to fp32: loss |x - ref| / |ref|; logits, grad L2 norms")
        else:
            lines.append("logits, loss: absolute error; grad: max |diff| / max |ref| per tensor")
        return "\n".join(lines)

    __str__ = table


# -- inputs, adapters and one model's run ----------------------------------------------


def lora_targets(model: PreTrainedModel) -> list[str]:
    """Names of every linear projection of the architecture (all ``nn.Linear`` but the
    output head): q/k/v/o and gate/up/down for llama, qkv_proj/gate_up_proj for phi3."""
    head = model.get_output_embeddings()
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
         if isinstance(m, torch.nn.Linear) and m is not head}
    )  # fmt: skip


def attach_lora(
    model: PreTrainedModel,
    *,
    r: int,
    seed: int,
    random_b: bool = True,
    experts: bool = True,
    modules: Sequence[str] | None = None,
):
    """Wrap ``model`` with PEFT LoRA (``lora_alpha = 2r``, no dropout) on every projection,
    with weights drawn from ``seed`` alone, name by name: the same on every model of the
    same architecture whatever its dtype or device. ``random_b=False`` keeps LoRA's usual
    ``B = 0`` start (for training); non-zero ``B`` makes adapters change the output.
    ``experts``: LoRA on every 3-D expert weight of an MoE model too, through PEFT's
    ``target_parameters`` (see :func:`~sloth_core.patches.expert_parameter_names`).
    ``modules``: the ``target_modules`` instead of every linear projection (``["q_proj",
    "k_proj", "v_proj", "o_proj"]``: attention-only LoRA)."""
    from peft import LoraConfig, get_peft_model

    from sloth_core.patches import expert_parameter_names

    parameters = expert_parameter_names(model) if experts else []
    config = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0,
        target_modules=lora_targets(model) if modules is None else list(modules),
        target_parameters=parameters or None, task_type="CAUSAL_LM",
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # PEFT's own init must not move the caller's RNG
        with peft_calls():
            peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                # A: unit-variance outputs; B: the adapter adds about half the base output.
                scale = 1.0 if "lora_A" in name else (0.25 if random_b else 0.0)
                values = torch.randn(param.shape, generator=gen) * scale / math.sqrt(param.shape[1])
                param.copy_(values)
    return peft_model


def grad_group(name: str) -> str:
    """``...layers.1.self_attn.q_proj.lora_A.default.weight`` -> ``q_proj.lora_A``
    (PEFT's nested expert wrappers, ``experts.base_layer.lora_A``: ``experts.lora_A``)."""
    parts = [part for part in name.split(".") if part != "base_layer"]
    i = next(i for i, p in enumerate(parts) if p in ("lora_A", "lora_B"))
    return f"{parts[i - 1]}.{parts[i]}"


@dataclass
class RunResult:
    logits: torch.Tensor
    loss: float
    loss_items: float
    grads: dict[str, torch.Tensor]
    patched: dict[str, int]
    providers: dict[str, str]
    attention_paths: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def _recording(ops: Any) -> Iterator[dict[str, set[str]]]:
    # Resolution happens per call, so wrapping it shows who served what the model called.
    seen: dict[str, set[str]] = {}
    resolve = ops.resolve

    def recording(name: str, device: Any = "cpu", dtype: Any = None) -> Any:
        impl = resolve(name, device, dtype)
        seen.setdefault(name, set()).add(impl.provider)
        return impl

    ops.resolve = recording
    try:
        yield seen
    finally:
        del ops.resolve


def run_model(
    model,
    batch: Batch,
    *,
    lora_r: int,
    seed: int,
    manager=None,
    attn: str | None = None,
    expert_lora: bool = True,
    lora_modules: Sequence[str] | None = None,
) -> RunResult:
    """Eval logits, then (with LoRA) the train loss, LoRA gradients and the loss with
    ``num_items_in_batch`` (Trainer's spelling); patched through ``manager`` if given,
    before and after LoRA, as the API does; with ``attn`` as attention implementation,
    set after the first patch (which may register it). ``expert_lora``, ``lora_modules``:
    :func:`attach_lora`'s ``experts`` and ``modules``."""
    patched: dict[str, int] = {}
    # Training keeps no cache, and transformers detects packed rows only without one.
    inputs = {**batch.inputs, "use_cache": False}

    def patch(m: torch.nn.Module) -> None:
        for report in manager.patch_layers(model=m) if manager is not None else ():
            for what, count in report.patched.items():
                patched[what] = patched.get(what, 0) + count

    from sloth_core.patches.attention import ATTENTION_PATHS

    paths_before = dict(ATTENTION_PATHS)
    spy: contextlib.AbstractContextManager[dict[str, set[str]]] = (
        _recording(manager.ops) if manager is not None else contextlib.nullcontext({})
    )
    with spy as seen:
        patch(model)
        if attn is not None:
            model.set_attn_implementation(attn)
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits[batch.valid].float()
        model = attach_lora(model, r=lora_r, seed=seed, experts=expert_lora, modules=lora_modules)
        patch(model)
        model.train()
        loss = model(**inputs, labels=batch.labels).loss
        if loss.requires_grad:  # else no LoRA parameter is in the graph: all grads missing
            loss.backward()
        with torch.no_grad():
            items = torch.tensor(int((batch.labels != -100).sum()) + 5, device=batch.labels.device)
            loss_items = model(**inputs, labels=batch.labels, num_items_in_batch=items).loss
    grads = {
        n: p.grad.detach().float() for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }  # fmt: skip
    providers = {op: "+".join(sorted(names)) for op, names in seen.items()}
    paths = {k: v - paths_before.get(k, 0) for k, v in ATTENTION_PATHS.items()}
    paths = {k: v for k, v in paths.items() if v}
    return RunResult(logits, loss.item(), loss_items.item(), grads, patched, providers, paths)


@contextlib.contextmanager
def kernels_mode(kernels: str) -> Iterator[None]:
    """Set ``SLOTH_KERNELS`` for the block: ``"torch"`` forces the references, ``"triton"``
    lets the registry pick the registered kernels, any other name allows only that
    provider. The previous value is restored afterwards."""
    previous = os.environ.get("SLOTH_KERNELS")
    if kernels == "triton":
        os.environ.pop("SLOTH_KERNELS", None)
    else:
        os.environ["SLOTH_KERNELS"] = kernels
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SLOTH_KERNELS", None)
        else:
            os.environ["SLOTH_KERNELS"] = previous


def _require_kernels(manager: SlothPluginManager, device: torch.device, dtype: torch.dtype):
    table = manager.ops.table(device, dtype)
    if any(provider != "torch" for provider in table.values()):
        return table
    dt = str(dtype).removeprefix("torch.")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ParitySkipped(
            "no kernel serves the CPU: the Triton kernels run on the CPU only under "
            "Triton's interpreter (set TRITON_INTERPRET=1 before Python starts)"
        )
    raise ParitySkipped(f"no installed kernel plugin (sloth-kernels) serves {device.type}/{dt}")


def _global_state(model: torch.nn.Module) -> dict[str, int]:
    """Identities of the forwards of the model's classes and of its modeling module's
    functions: a plugin that swaps them patches every model, the reference included."""
    state = {}
    for module in model.modules():
        cls = type(module)
        state[f"{cls.__qualname__}.forward"] = id(cls.__dict__.get("forward", cls.forward))
    modeling = sys.modules.get(type(model).__module__)
    if modeling:
        for name, value in vars(modeling).items():
            if callable(value) and not isinstance(value, type):
                state[f"{modeling.__name__}.{name}"] = id(value)
    return state


def _check_packed_reference(model: PreTrainedModel, batch: Batch) -> None:
    """Each packed sequence must get the logits it gets alone: else the unpatched model
    (this transformers release, this attention) is no reference for packed rows."""
    ids, positions = batch.inputs["input_ids"], batch.inputs["position_ids"]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        for row in range(ids.shape[0]):
            starts = (positions[row] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            for a, b in zip(starts, starts[1:], strict=False):
                alone = model(input_ids=ids[row : row + 1, a:b], use_cache=False).logits
                if not torch.allclose(alone[0], packed[row, a:b], rtol=1e-3, atol=1e-3):
                    raise ParityError(
                        "the unpatched model lets packed sequences attend to each other "
                        f"(attn_implementation={model.config._attn_implementation!r}): "
                        "no reference for packed rows"
                    )


def _build(config: Any, seed: int, dtype: torch.dtype, device: torch.device, compute=None):
    model = init_tiny_model(config, seed=seed, dtype=dtype)
    if compute is not None and compute != dtype:  # fp32 copy of the bf16-rounded weights
        model = model.to(compute)
        model.config.dtype = compute
    # transformers types PreTrainedModel.to as @wraps(nn.Module.to), unbound: self is device
    return model.to(device)  # type: ignore[arg-type]


def _compare(ref: RunResult, run: RunResult, base: RunResult | None, tol: Tolerance):
    def maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a - b).abs().max().item()

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        # fp32: the worst element, scaled by the tensor's largest. Low precision: the
        # relative L2 error; a max over many rounding errors jitters too much to compare.
        if base is None:
            return maxabs(a, b) / max(b.abs().max().item(), 1e-30)
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    def row(name: str, fixed: float, error_of) -> Check:
        if base is None:
            return Check(name, error_of(run), fixed)
        baseline = error_of(base)
        return Check(name, error_of(run), tol.factor * baseline + fixed, baseline)

    logits = maxabs if base is None else relative
    scale = 1.0 if base is None else abs(ref.loss)
    checks = [
        row("logits (eval)", tol.logits, lambda r: logits(r.logits, ref.logits)),
        row("loss (train)", tol.loss, lambda r: abs(r.loss - ref.loss) / scale),
        row("loss (num_items)", tol.loss, lambda r: abs(r.loss_items - ref.loss_items) / scale),
    ]
    for group in sorted({grad_group(name) for name in ref.grads}):
        names = [n for n in ref.grads if grad_group(n) == group]

        def worst(r: RunResult, distance=relative, names=names) -> float:
            if any(r.grads.get(n) is None for n in names):
                return math.inf  # the patched path dropped a LoRA parameter from the graph
            return max(distance(r.grads[n], ref.grads[n]) for n in names)

        check = row(f"grad {group}", tol.grad, worst)
        check.absolute = worst(run, maxabs)
        checks.append(check)
    return checks


def check_parity(
    config: Any,
    *,
    manager: SlothPluginManager | None = None,
    dtype: torch.dtype = torch.float32,
    kernels: str = "torch",
    seed: int = 0,
    lora_r: int = 4,
    batch_size: int = 2,
    seq_len: int = 24,
    packed: bool = False,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    tolerance: Tolerance | None = None,
    expert_lora: bool = True,
    lora_modules: Sequence[str] | None = None,
) -> ParityReport:
    """Compare the patched model with the unpatched one built from ``config``.

    Args:
        config: a ``transformers.PretrainedConfig``, e.g. ``tiny_config("llama")``.
        manager: the plugins to patch with; by default every installed plugin.
        dtype: the models' dtype; below fp32, errors are measured against fp32.
        kernels: ``"torch"`` (references forced), ``"triton"`` (registered kernels,
            required to serve the device), or a provider name.
        seed: weights, LoRA weights and batch all follow from it.
        lora_r: LoRA rank (``lora_alpha = 2 * r``, so a lost scaling shows).
        batch_size, seq_len: the batch; with ``packed=False`` the last row is right-padded.
        packed: rows of several sequences, positions restarting, no attention mask.
        device: default cuda when available, else cpu.
        attn_implementation: the patched model's attention, e.g. the one a plugin's
            ``load_model`` picks (``"sloth_attention"``); the reference keeps the default.
        tolerance: bounds instead of :data:`TOLERANCES` for ``dtype``.
        expert_lora: LoRA on an MoE model's 3-D expert weights too (PEFT's
            ``target_parameters``), beside every linear projection; ``False``: the
            linear projections only.
        lora_modules: LoRA's ``target_modules`` instead of every linear projection.

    Returns:
        The report; check ``report.ok`` or use :func:`assert_parity`.

    Raises:
        ParitySkipped: ``kernels`` asks for kernels that do not serve this device/dtype.
        ParityError: no plugin patched the model, or a plugin patched globally.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    manager = manager if manager is not None else SlothPluginManager(entry_points=True)
    tol = tolerance or TOLERANCES[dtype]
    if tolerance is None and tol.factor and kernels != "torch" and device.type == "cpu":
        tol = replace(tol, factor=INTERPRETER_FACTOR)
    batch: Batch = make_batch(config, batch_size, seq_len, packed=packed, seed=seed, device=device)
    lowp = dtype != torch.float32

    def build(compute: torch.dtype | None = None) -> PreTrainedModel:
        return _build(config, seed, dtype, device, compute)

    report = ParityReport(config.model_type, dtype, device.type, kernels, packed, tol.factor)
    report.attn = attn_implementation or config._attn_implementation or "sdpa"
    with kernels_mode(kernels):
        if kernels != "torch":
            report.op_table = _require_kernels(manager, device, dtype)
        else:
            report.op_table = manager.ops.table(device, dtype)
        # The references run first, so nothing the patching does can reach them.
        ref_model = build(torch.float32 if lowp else None)
        if packed:
            _check_packed_reference(ref_model, batch)
        before = _global_state(ref_model)
        adapters: dict[str, Any] = dict(
            lora_r=lora_r, seed=seed, expert_lora=expert_lora, lora_modules=lora_modules
        )
        ref = run_model(ref_model, batch, **adapters)
        base = run_model(build(), batch, **adapters) if lowp else None
        run = run_model(build(), batch, **adapters, manager=manager, attn=attn_implementation)
    report.patched, report.providers = run.patched, run.providers
    report.attention_paths = run.attention_paths
    if not any(run.patched.values()):
        raise ParityError(
            f"no plugin patched model_type {config.model_type!r} (plugins implementing "
            f"patch_layers: {', '.join(manager.implementers('patch_layers')) or 'none'})"
        )
    changed = sorted(k for k, v in _global_state(ref_model).items() if before.get(k, v) != v)
    if changed:
        raise ParityError(f"patching changed shared code, not instances: {', '.join(changed)}")
    report.checks = _compare(ref, run, base, tol)
    return report


def assert_parity(
    config: Any, *, tolerance: Tolerance | None = None, **kwargs: Any
) -> ParityReport:
    """:func:`check_parity`, raising ``AssertionError`` with the table when a bound fails.

    ``tolerance`` replaces the defaults; ``**kwargs`` go to :func:`check_parity`.
    """
    report = check_parity(config, tolerance=tolerance, **kwargs)
    if not report.ok:
        failed = ", ".join(c.name for c in report.failures)
        raise AssertionError(f"parity failed ({failed}):\n{report.table()}")
    return report

"""What every mixture-of-experts architecture plugin checks, beside the dense checks.

:func:`check_moe_parity` runs :func:`~sloth_core.testing.plugin_checks.check_plugin_parity`
in one of the LoRA layouts of :data:`MOE_LORA` (every linear and every expert weight
through PEFT's ``target_parameters``; attention only) and checks the expert gradients
were compared when experts carry LoRA. :data:`ROUTER_LOSS` puts the router's
load-balancing loss in the compared loss, at a coefficient off its default.
:func:`assert_checkpointing_parity` compares loss and LoRA gradients of the patched and
unpatched model under gradient checkpointing, where the patched blocks are run twice
(torch's checkpointing, and sloth's own on device and offloaded).

A plugin's test module names its architecture once as an :class:`MoEArchitecture` and
runs the checks of :data:`MOE_CHECKS` it shares with the others through
:func:`run_moe_check` (``manager`` as in :mod:`.plugin_checks`)::

    QWEN3_MOE = MoEArchitecture("sloth-qwen", "qwen3_moe", patched={...})


    @pytest.mark.parametrize("check", MOE_CHECKS)
    def test_moe_check(manager, check):
        run_moe_check(manager, QWEN3_MOE, check)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .convergence import assert_converges_alike
from .models import init_tiny_model, tiny_config
from .parity import attach_lora, kernels_mode
from .plugin_checks import check_plugin_parity, parity_shape

__all__ = [
    "MOE_CHECKS",
    "MOE_LORA",
    "ROUTER_LOSS",
    "MoEArchitecture",
    "assert_checkpointing_parity",
    "check_moe_parity",
    "run_moe_check",
]

#: LoRA layouts of the parity runs: every linear and every expert weight; attention only.
MOE_LORA: dict[str, dict[str, Any]] = {
    "experts": {},
    "attention": {"expert_lora": False, "lora_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}
#: Config overrides that put the router loss in the compared loss (coefficient 0.05, off
#: transformers' 0.001).
ROUTER_LOSS: dict[str, Any] = {"output_router_logits": True, "router_aux_loss_coef": 0.05}


def check_moe_parity(
    manager: Any, config: Any, *, patched: dict[str, int], lora: str = "experts", **options: Any
):
    """Parity of ``config`` (torch references, ``sloth_attention`` unless ``options`` say
    otherwise) with LoRA as :data:`MOE_LORA` ``[lora]``; the report must count ``patched``."""
    options.setdefault("attn_implementation", "sloth_attention")
    options.setdefault("kernels", "torch")
    report = check_plugin_parity(manager, config, **MOE_LORA[lora], **options)
    assert report.patched == patched, report.patched
    expert_grads = [c.name for c in report.checks if c.name.startswith("grad experts")]
    assert bool(expert_grads) == (lora == "experts"), expert_grads
    return report


def assert_checkpointing_parity(
    manager: Any, config: Any, *, seed: int = 1, kernels: str = "torch"
) -> None:
    """Loss and every LoRA gradient (experts included) of the patched model equal the
    unpatched model's with gradient checkpointing on (the blocks recomputed in backward),
    under torch's checkpointing and under sloth's (``device_checkpoint``,
    ``offloaded_checkpoint``), two steps each;
    ``kernels`` as :func:`~sloth_core.testing.parity.kernels_mode` takes it."""
    with kernels_mode(kernels):
        _checkpointing_parity(manager, config, seed)


def _checkpointing_parity(manager: Any, config: Any, seed: int) -> None:
    from sloth_core.checkpointing import device_checkpoint, offloaded_checkpoint

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=generator)
    results = {}
    # The unpatched model under torch's checkpointing; the patched one under torch's and
    # under sloth's own (the recompute's skips; the offloaded inputs, sloth's default on a
    # GPU), whose first pass runs without gradients: the router loss must still reach the
    # routers and the attention before them. Two steps each: the skips start on the second.
    runs = {"unpatched": None, "torch": None, "device": device_checkpoint,
            "offloaded": offloaded_checkpoint}  # fmt: skip
    for run, function in runs.items():
        model = attach_lora(init_tiny_model(config), r=4, seed=0)
        if run != "unpatched":
            manager.patch_layers(model=model)
        if function is None:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            model.get_base_model()._set_gradient_checkpointing(
                enable=True, gradient_checkpointing_func=function
            )
        model.enable_input_require_grads()
        model.train()
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[run] = (loss.detach(), grads)
    loss_ref, grads_ref = results.pop("unpatched")
    for run, (loss, grads) in results.items():
        torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0, msg=f"{run}: loss")
        assert grads.keys() == grads_ref.keys() and any("experts" in n for n in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(
                grad, grads_ref[name], atol=1e-6, rtol=1e-4, msg=f"{run}: {name}"
            )


@dataclass(frozen=True)
class MoEArchitecture:
    """An MoE architecture as its plugin's tests check it.

    Attributes:
        plugin: the plugin that claims it (its report names it).
        arch: the tiny config's architecture (``tiny_config(arch)``), its ``model_type``.
        patched: what the plugin's report must count on the tiny model.
        attention_paths: ``sloth_attention`` paths every parity run of :meth:`parity`
            must have taken (gpt-oss: ``"sinks"``).
        patched_modules: modules the ``"report"`` check expects patched.
        train_overrides: config fields of the ``"trains_alike"`` check.
    """

    plugin: str
    arch: str
    patched: dict[str, int]
    attention_paths: tuple[str, ...] = ()
    patched_modules: tuple[str, ...] = ()
    train_overrides: dict[str, Any] = field(default_factory=dict)

    def parity(self, manager: Any, config: Any = None, **options: Any):
        """:func:`check_moe_parity` of ``config`` (the tiny config with :data:`ROUTER_LOSS`
        by default), then the :attr:`attention_paths` check."""
        config = tiny_config(self.arch, **ROUTER_LOSS) if config is None else config
        report = check_moe_parity(manager, config, patched=self.patched, **options)
        for path in self.attention_paths:
            assert report.attention_paths.get(path), report.attention_paths
        return report


def _parity(manager: Any, moe: MoEArchitecture, **options: Any) -> None:
    moe.parity(manager, **options)


def _triton_parity(manager: Any, moe: MoEArchitecture, lora: str) -> None:
    """sloth-kernels' kernels (interpreted on the CPU), moe_experts's where it serves it."""
    moe.parity(manager, lora=lora, kernels="triton", **parity_shape("triton"))


def _checkpointing(manager: Any, moe: MoEArchitecture) -> None:
    assert_checkpointing_parity(manager, tiny_config(moe.arch, **ROUTER_LOSS))


def _report_idempotence_and_undo(manager: Any, moe: MoEArchitecture) -> None:
    """One report naming the plugin and counting :attr:`MoEArchitecture.patched`; a second
    patch patches nothing; ``undo`` leaves no module patched."""
    from sloth_core.patching import is_patched

    model = init_tiny_model(tiny_config(moe.arch))
    (report,) = manager.patch_layers(model=model)
    assert (report.plugin, report.model_type, report.skipped) == (moe.plugin, moe.arch, {})
    assert report.patched == moe.patched
    modules = dict(model.named_modules())
    assert all(is_patched(modules[name]) for name in moe.patched_modules)
    (again,) = manager.patch_layers(model=model)
    assert again.total == 0
    report.undo()
    assert not any(is_patched(m) for m in model.modules())


def _trains_alike(manager: Any, moe: MoEArchitecture) -> None:
    config = tiny_config(moe.arch, **{**ROUTER_LOSS, **moe.train_overrides})
    unpatched, patched = assert_converges_alike(config, manager=manager, kernels="torch")
    assert len(unpatched) == len(patched) == 30


#: The checks :func:`run_moe_check` runs, by name: parity with the router loss in each LoRA
#: layout (:data:`MOE_LORA`), with sloth-kernels' kernels, on packed rows; gradient
#: checkpointing; the report, idempotence and undo; 30 training steps alike.
CHECKS: dict[str, Callable[[Any, MoEArchitecture], None]] = {
    "router_loss-experts": partial(_parity, lora="experts"),
    "router_loss-attention": partial(_parity, lora="attention"),
    "triton-experts": partial(_triton_parity, lora="experts"),
    "triton-attention": partial(_triton_parity, lora="attention"),
    "packed": partial(_parity, packed=True, batch_size=3),
    "checkpointing": _checkpointing,
    "report": _report_idempotence_and_undo,
    "trains_alike": _trains_alike,
}
#: What every MoE plugin runs; a module adds from :data:`CHECKS` (``"triton-attention"``,
#: ``"trains_alike"``) or leaves out what its architecture cannot (gpt-oss: ``"packed"``).
MOE_CHECKS = ("router_loss-experts", "router_loss-attention", "triton-experts", "packed",
              "checkpointing", "report")  # fmt: skip


def run_moe_check(manager: Any, moe: MoEArchitecture, check: str) -> None:
    """Run the check of :data:`CHECKS` named ``check`` on ``moe`` with ``manager``."""
    CHECKS[check](manager, moe)

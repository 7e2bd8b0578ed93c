"""What every architecture plugin's parity tests share: the installed plugins with this
one active, a batch that Triton's CPU interpreter runs in reasonable time, and a parity
run with the checks every plugin makes of its report.

A plugin's test module uses them as the template's tests do::

    pytestmark = pytest.mark.usefixtures("single_thread")  # the pytest plugin's fixture


    @pytest.fixture(scope="module")
    def manager():
        return installed_manager("sloth-yourname")


    @pytest.mark.parametrize("kernels", ["torch", "triton"])
    def test_parity(manager, kernels):
        config = tiny_config("llama", model_type="yourtype")
        check_plugin_parity(manager, config, kernels=kernels, **parity_shape(kernels))
"""

from __future__ import annotations

import os
from typing import Any

import torch

from sloth_core.plugins import SlothPluginManager

from .parity import ParityReport, ParitySkipped, assert_parity

__all__ = ["check_plugin_parity", "installed_manager", "parity_shape"]

#: The batch under Triton's CPU interpreter, which runs each program in Python (the rope
#: kernel's one per token, ~25 ms): 12 tokens a row keep a plugin's tests near a minute.
INTERPRETER_SHAPE = (2, 12)


def installed_manager(*plugin_names: str) -> SlothPluginManager:
    """Every installed plugin, as users get them (entry points: sloth-kernels too).

    Raises ``AssertionError`` naming the plugin and why unless each of ``plugin_names`` is
    active: not installed (``pip install -e .`` of the plugin), failed (its import or its
    requirements, with the reason) or disabled (``SLOTH_DISABLE_PLUGINS``).
    """
    manager = SlothPluginManager(entry_points=True)
    for name in plugin_names:
        record = manager.records.get(name)
        if record is None:
            installed = ", ".join(sorted(manager.records)) or "none"
            raise AssertionError(f"plugin {name} is not installed (installed: {installed})")
        if record.status != "active":
            raise AssertionError(f"plugin {name} is {record.status}: {record.reason}")
    return manager


def parity_shape(
    kernels: str,
    batch_size: int = 2,
    seq_len: int = 24,
    *,
    interpreted: tuple[int, int] = INTERPRETER_SHAPE,
) -> dict[str, int]:
    """``batch_size`` and ``seq_len`` for :func:`check_plugin_parity`.

    Triton kernels on the CPU run only under Triton's interpreter: without
    ``TRITON_INTERPRET=1`` the test is skipped, with it the batch is ``interpreted``
    (rows, tokens a row), short because the interpreter runs each program in Python.
    Anywhere else (torch references, or a GPU) the batch is as asked.
    """
    if kernels != "triton" or torch.cuda.is_available():
        return {"batch_size": batch_size, "seq_len": seq_len}
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise ParitySkipped("Triton on the CPU runs only under TRITON_INTERPRET=1 (nox sets it)")
    rows, tokens = interpreted
    return {"batch_size": rows, "seq_len": tokens}


def _varlen_expected(report: ParityReport, config: Any) -> bool:
    from sloth_core.patches import SLOTH_ATTENTION

    if not (report.packed and report.device == "cuda" and report.attn == SLOTH_ATTENTION):
        return False
    if report.dtype not in (torch.float16, torch.bfloat16):
        return False
    if getattr(config, "attn_logit_softcapping", None):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    return getattr(config, "sliding_window", None) is None or "full_attention" in layer_types


def check_plugin_parity(
    manager: SlothPluginManager,
    config: Any,
    *,
    kernels: str,
    rms_norms: int | None = None,
    **options: Any,
) -> ParityReport:
    """:func:`~sloth_core.testing.parity.assert_parity` of ``config`` with ``manager``'s
    plugins, then what every plugin checks of the report.

    The report's table is printed (``pytest -rA`` or ``-s`` shows it). With
    ``kernels="triton"`` every op the model called must have been served, on every call,
    by the kernel the registry holds for this device and dtype: a rope or LoRA kernel
    falling back to its torch reference computes the same numbers, so parity alone cannot
    show it. Packed rows in half precision on CUDA through ``sloth_attention`` must have
    gone through ``varlen_attn`` wherever a layer has neither window nor softcap. With
    ``rms_norms`` the report must count that many patched RMSNorms (a norm left unpatched
    still computes Hugging Face's result, so parity cannot show it).
    ``**options`` go to ``assert_parity``: ``dtype``, ``packed``, ``attn_implementation``,
    ``batch_size`` and ``seq_len`` (see :func:`parity_shape`)...
    """
    report = assert_parity(config, manager=manager, kernels=kernels, **options)
    print(report)
    if kernels == "triton":
        assert "sloth-kernels" in report.providers.values(), report.providers
        fallbacks = {
            op: who for op, who in report.providers.items()
            if report.op_table.get(op, "torch") not in ("torch", who)
        }  # fmt: skip
        assert not fallbacks, f"ops that fell back from their kernel: {fallbacks}"
    if _varlen_expected(report, config):
        assert report.attention_paths.get("varlen"), report.attention_paths
    if rms_norms is not None:
        assert report.patched.get("rms_norm") == rms_norms, report.patched
    return report

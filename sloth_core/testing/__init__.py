"""Test helpers for sloth and for plugin authors.

Installed with sloth-core as the pytest plugin ``sloth`` (see :mod:`.pytest_plugin`):
fixtures ``plugin_manager``, ``register_plugin``, ``make_tiny_model`` and
``single_thread``. Tiny random models of real architectures with a tokenizer trained on
the spot come from :func:`tiny_model`, and :func:`varied_config` moves every float field of
a tiny config off its default and flips every flag; nothing is downloaded. :func:`assert_parity`
compares a patched model with the unpatched Hugging Face model (logits, loss, LoRA
gradients) and :func:`assert_converges_alike` trains both side by side: every
architecture plugin's tests, which take the installed plugins from
:func:`installed_manager` and run parity through :func:`check_plugin_parity` on batches
of :func:`parity_shape` (:mod:`.plugin_checks`); mixture-of-experts plugins add the checks
they share, :func:`~sloth_core.testing.moe_checks.run_moe_check` on an
:class:`~sloth_core.testing.moe_checks.MoEArchitecture`, and :func:`check_moe_parity`
and :func:`assert_checkpointing_parity` (:mod:`.moe_checks`). The checkpointing tests
compare :func:`repeated_step_grads` with and without a checkpoint function
(:func:`assert_same_grads`).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "tiny_model": "sloth_core.testing.models",
    "tiny_config": "sloth_core.testing.models",
    "init_tiny_model": "sloth_core.testing.models",
    "TINY_CONFIGS": "sloth_core.testing.models",
    "varied_config": "sloth_core.testing.varied",
    "config_variations": "sloth_core.testing.varied",
    "build_tokenizer": "sloth_core.testing.tokenizer",
    "check_parity": "sloth_core.testing.parity",
    "assert_parity": "sloth_core.testing.parity",
    "ParityReport": "sloth_core.testing.parity",
    "installed_manager": "sloth_core.testing.plugin_checks",
    "parity_shape": "sloth_core.testing.plugin_checks",
    "check_plugin_parity": "sloth_core.testing.plugin_checks",
    "check_moe_parity": "sloth_core.testing.moe_checks",
    "assert_checkpointing_parity": "sloth_core.testing.moe_checks",
    "convergence_losses": "sloth_core.testing.convergence",
    "assert_converges_alike": "sloth_core.testing.convergence",
    "load_tiny_instructions": "sloth_core.testing.datasets",
    "repeated_step_grads": "sloth_core.testing.checkpoint_grads",
    "assert_same_grads": "sloth_core.testing.checkpoint_grads",
    "sloth_attention_lora_model": "sloth_core.testing.checkpoint_grads",
}


def __getattr__(name: str) -> Any:
    # torch and transformers load only when a test asks for a model.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sloth_core.testing' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = list(_LAZY)

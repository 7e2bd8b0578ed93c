"""Other libraries' noise stays out of sloth's output, and only for as long as asked."""

from __future__ import annotations

import warnings

from sloth_core import FastLanguageModel
from sloth_core.quiet import peft_calls, progress_bars
from sloth_core.testing import init_tiny_model, tiny_config


def test_lora_attaches_without_transformers_deprecation_noise():
    model = init_tiny_model(tiny_config("llama"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FastLanguageModel.get_peft_model(model, r=4, lora_alpha=4)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], caught


def test_peft_calls_drop_only_the_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with peft_calls():
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("something else", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]


def test_progress_bars_off_inside_the_block_and_back_after():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging

    logging.enable_progress_bar()  # whatever an earlier test in this process left
    with progress_bars(False):
        assert not logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    assert logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    with progress_bars(True):
        assert logging.is_progress_bar_enabled()

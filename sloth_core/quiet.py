"""What keeps other libraries' noise out of sloth's output.

- PEFT reads ``model.is_gradient_checkpointing``, which transformers 5 deprecated: every
  ``get_peft_model`` printed a FutureWarning the user can do nothing about.
- ``--quiet`` means no progress bar at all, transformers' own ("Loading weights",
  "Writing model shards") included.

Both are scoped: the filters and the switch are put back on the way out.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: The deprecation PEFT trips on (transformers' message, a regular expression).
_PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


@contextmanager
def peft_calls() -> Iterator[None]:
    """Around ``get_peft_model`` / ``PeftModel.from_pretrained``: only the one warning that
    PEFT, not the user, causes is dropped; any other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_DEPRECATION, category=FutureWarning)
        yield


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars on or off inside the block."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging

    was_on, hub_was_on = logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()
        if hub_was_on:
            enable_progress_bars()

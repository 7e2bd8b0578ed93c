from __future__ import annotations

import pytest

from sloth_core.testing.tokenizer import build_tokenizer


@pytest.fixture
def tokenizer():
    return build_tokenizer()

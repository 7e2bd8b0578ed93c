"""The GenerationConfig sloth builds from SamplingOptions."""

from __future__ import annotations

import types

from sloth_core.inference.generation import SamplingOptions, generation_config


def test_top_k_zero_stays_off_rather_than_none():
    # generate fills a None top_k with its own default (50): 0 must reach it as 0.
    model = types.SimpleNamespace(generation_config=None)
    off = generation_config(model, SamplingOptions(temperature=1.0, top_k=0), [2], 0)
    cut = generation_config(model, SamplingOptions(temperature=1.0, top_k=7), [2], 0)
    assert off.do_sample and off.top_k == 0
    assert cut.top_k == 7

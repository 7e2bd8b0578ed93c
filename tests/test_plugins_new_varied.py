"""``varied_config``: the generated parity tests' config with every float off its default
and every flag flipped, read from the config class at test time."""

from __future__ import annotations

import pytest

from sloth_core.testing import config_variations, tiny_config, varied_config
from sloth_core.testing import varied as varied_module
from sloth_core.testing.varied import field_defaults, varied_value


@pytest.mark.parametrize(
    ("name", "default", "annotation", "expected"),
    [
        ("attention_bias", False, bool, True),
        ("tie_word_embeddings", True, bool, False),
        ("logits_scaling", 1.0, float, 1.5),
        ("logit_scale", 0.0625, float, 0.53125),
        ("rope_theta", 10000.0, float, 15000.0),
        ("router_coef", 0.0, float, 0.5),
        ("layer_norm_eps", 1e-5, float, 3e-3),
        ("final_logit_softcapping", 30.0, float, 2.5),
        ("attn_logit_softcapping", None, float | None, 2.5),
        ("clip_qkv", None, float | None, 0.5),
        # Left alone: random, kept from the tiny base, not floats or flags.
        ("attention_dropout", 0.0, float, None),
        ("residual_dropout", None, float | None, None),
        ("router_jitter_noise", 0.0, float, None),
        ("initializer_range", 0.02, float, None),
        ("use_cache", True, bool, None),
        ("mlp_multipliers", None, list[float] | None, None),
        ("hidden_size", 4096, int, None),
        ("hidden_act", "silu", str, None),
    ],
)
def test_varied_value(name, default, annotation, expected):
    assert varied_value(name, default, annotation) == expected


def test_granite_multipliers_biases_and_tying_are_varied():
    """Granite's four scalars sit at 1.0 by default, where ignoring them costs nothing."""
    config = varied_config("llama", model_type="granite")
    defaults = field_defaults(type(config))
    for name in ("embedding_multiplier", "residual_multiplier", "attention_multiplier"):
        assert getattr(config, name) == 1.5 * defaults[name][0]
    assert config.logits_scaling == 1.5
    assert config.attention_bias and config.mlp_bias
    assert config.tie_word_embeddings is not defaults["tie_word_embeddings"][0]
    tiny = tiny_config("llama", model_type="granite")
    assert config.rms_norm_eps == tiny.rms_norm_eps  # the tiny base's own choice stays
    assert config.attention_dropout == 0.0  # random: two models could not agree on it
    assert (config.hidden_size, config.num_hidden_layers) == (tiny.hidden_size, 2)


def test_overrides_win_and_are_not_varied():
    config = varied_config("llama", model_type="granite", logits_scaling=1.0, mlp_bias=False)
    assert (config.logits_scaling, config.mlp_bias) == (1.0, False)
    assert config.residual_multiplier == 1.5
    assert "logits_scaling" not in config_variations(
        "llama", model_type="granite", keep=("logits_scaling",)
    )


def test_a_sloth_tiny_config_keeps_what_it_switches_on():
    """gemma2's tiny config sets its softcaps to bite; the variations leave them."""
    variations = config_variations("gemma2")
    assert "attn_logit_softcapping" not in variations
    assert varied_config("gemma2").final_logit_softcapping == 3.0


def test_defaults_come_from_the_config_class(monkeypatch):
    """When transformers changes a default, the variation follows it."""
    from transformers import AutoConfig

    cls = type(AutoConfig.for_model("granite"))
    fields = field_defaults(cls)
    changed = {**fields, "logits_scaling": (8.0, fields["logits_scaling"][1])}
    monkeypatch.setattr(varied_module, "field_defaults", lambda klass: changed)
    varied_module._variations.cache_clear()
    try:
        assert config_variations("llama", model_type="granite")["logits_scaling"] == 12.0
    finally:
        varied_module._variations.cache_clear()


def test_a_variation_the_tiny_model_cannot_run_with_is_dropped(monkeypatch):
    original = varied_module.varied_value

    def breaking(name, default, annotation=None):
        if name == "layer_norm_eps":
            return float("nan")  # NaN logits: not a tiny model a parity test can use
        return original(name, default, annotation)

    monkeypatch.setattr(varied_module, "varied_value", breaking)
    varied_module._variations.cache_clear()
    try:
        variations = config_variations("llama", model_type="cohere")
    finally:
        varied_module._variations.cache_clear()
    assert "layer_norm_eps" not in variations
    assert variations["logit_scale"] == 0.53125 and variations["use_qk_norm"] is True


def test_tiny_configs_have_no_dropout_unless_asked():
    """Seed-OSS defaults to dropout 0.1: random, so no parity run could pass on it."""
    config = tiny_config("llama", model_type="seed_oss")
    assert (config.attention_dropout, config.residual_dropout) == (0.0, 0.0)
    asked = tiny_config("llama", model_type="seed_oss", residual_dropout=0.2)
    assert asked.residual_dropout == 0.2
    assert varied_config("llama", model_type="seed_oss").residual_dropout == 0.0

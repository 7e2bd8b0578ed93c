"""The Modelfile TEMPLATE renders conversations exactly as the Jinja chat template does."""

from __future__ import annotations

import re

import pytest
from sloth_ollama.modelfile import MAX_NUM_CTX, build_modelfile
from sloth_ollama.translate import TemplateTranslationError, family_of, render_messages, translate

from sloth_core.data import CHAT_TEMPLATES
from sloth_core.testing import build_tokenizer, tiny_config

# Conversations beyond the ones the translation checks itself with: longer, multi-line,
# unicode, several system-less and system-led exchanges.
CONVERSATIONS = [
    [
        {"role": "user", "content": "Write a haiku about sloths.\nMake it calm."},
        {
            "role": "assistant",
            "content": "Slow leaves, slower limbs\nthe canopy holds its breath\nnoon comes",
        },
        {"role": "user", "content": "Now one about café au lait ☕"},
        {"role": "assistant", "content": "Warm foam, bitter, sweet"},
        {"role": "user", "content": "Thanks!"},
    ],
    [
        {"role": "system", "content": "You translate English to German.\nOnly the translation."},
        {"role": "user", "content": "Good night"},
        {"role": "assistant", "content": "Gute Nacht"},
        {"role": "user", "content": "See you tomorrow"},
    ],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello {{ not a tag }}"},
    ],
]

TEMPLATES = {"tokenizer's own": None, **CHAT_TEMPLATES}
FAMILIES = {
    "tokenizer's own": "chatml", "chatml": "chatml", "qwen": "qwen", "llama-3": "llama-3",
    "llama-3.1": "llama-3",
    "mistral": "mistral", "gemma": "gemma", "phi-3": "phi-3", "alpaca": "alpaca",
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _template_of(modelfile_text: str) -> str:
    return re.search(r'^TEMPLATE """(.*?)"""$', modelfile_text, re.S | re.M).group(1)


def _expected(tokenizer, template, messages):
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False,
            add_generation_prompt=messages[-1]["role"] != "assistant",
        )  # fmt: skip
    except Exception:  # the template has no system role (mistral/gemma take it; alpaca too)
        return None


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_modelfile_template_renders_like_the_chat_template(tokenizer, name):
    template = TEMPLATES[name]
    modelfile = build_modelfile(tokenizer, options={"chat_template": template} if template else {})
    go = _template_of(modelfile.text)
    assert modelfile.family == FAMILIES[name]
    assert family_of(template or tokenizer.chat_template) == FAMILIES[name].replace(
        "qwen", "chatml"
    )
    rendered = 0
    for messages in CONVERSATIONS:
        expected = _expected(tokenizer, template or tokenizer.chat_template, messages)
        if expected is None:
            continue
        # llama.cpp adds the bos (the tokenizer adds one), so the TEMPLATE leaves it out.
        assert modelfile.bos + render_messages(go, messages) == expected
        rendered += 1
    assert rendered == len(CONVERSATIONS)


def test_bos_is_kept_when_the_runtime_does_not_add_it(tokenizer):
    translation = translate(tokenizer, CHAT_TEMPLATES["llama-3"], runtime_bos=False)
    assert translation.bos == "" and translation.template.startswith("<|begin_of_text|>")
    messages = CONVERSATIONS[1]
    expected = _expected(tokenizer, CHAT_TEMPLATES["llama-3"], messages)
    assert render_messages(translation.template, messages) == expected


def test_default_system_prompts_become_system(tokenizer):
    qwen = build_modelfile(tokenizer, options={"chat_template": "qwen"})
    assert qwen.system.startswith("You are Qwen") and 'SYSTEM """You are Qwen' in qwen.text
    alpaca = build_modelfile(tokenizer, options={"chat_template": "alpaca"})
    assert alpaca.system.startswith("Below is an instruction")
    assert build_modelfile(tokenizer).system is None
    assert "SYSTEM" not in build_modelfile(tokenizer).text


def test_stops_parameters_and_from(tokenizer):
    config = tiny_config("llama", tokenizer=tokenizer, max_position_embeddings=32768)
    modelfile = build_modelfile(tokenizer, config)
    text = modelfile.text
    assert "FROM ./model.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|end_of_text|>"' in text
    assert f"PARAMETER num_ctx {MAX_NUM_CTX}" in text and "PARAMETER temperature 0.7" in text
    small = build_modelfile(tokenizer, tiny_config("llama", tokenizer=tokenizer))
    assert small.parameters["num_ctx"] == 256
    mistral = build_modelfile(tokenizer, options={"chat_template": "mistral", "num_ctx": 1024})
    assert mistral.stops == ["<|end_of_text|>", "[INST]"] and mistral.parameters["num_ctx"] == 1024


GENERIC = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% else %}BOT: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}BOT: {% endif %}"
)


def test_unknown_family_falls_back_to_probing(tokenizer):
    translation = translate(tokenizer, GENERIC)
    assert translation.family == "generic"
    for messages in CONVERSATIONS:
        expected = _expected(tokenizer, GENERIC, messages)
        assert translation.bos + render_messages(translation.template, messages) == expected


@pytest.mark.parametrize(
    "template, why",
    [
        (
            "{% for m in messages %}{{ loop.index }}. {{ m['content'] }}\n{% endfor %}",
            "cannot translate",
        ),
        (
            "{% for m in messages|reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
            "cannot translate",
        ),
        ("{{ messages[-1]['content'] }}", "cannot translate"),
    ],
    ids=["numbered turns", "reversed", "last message only"],
)
def test_untranslatable_templates_fail_clearly(tokenizer, template, why):
    with pytest.raises(TemplateTranslationError, match=why):
        translate(tokenizer, template)


def test_no_chat_template_fails_clearly(tokenizer):
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(TemplateTranslationError, match="no chat template"):
        build_modelfile(bare)

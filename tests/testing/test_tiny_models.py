"""Tests of the tiny-model builder and the on-the-spot tokenizer in sloth_core.testing."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sloth_core.testing.models import (
    TINY_CONFIGS,
    init_tiny_model,
    tiny_config,
    tiny_model,
)
from sloth_core.testing.tokenizer import build_tokenizer, corpus_lines

ARCHS = sorted(TINY_CONFIGS)
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Why is the sky blue? Answer in one sentence, please."},
    {"role": "assistant", "content": "Air scatters blue light more than red light."},
]
ROUND_TRIP = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tnew\nlines\r\nand  double  spaces",
    "café naïve crème brûlée Zürich",
    "日本語のテキスト, 中文, 한국어, Ελληνικά, Русский",
    "emoji 🙂☕🚲 and symbols ∑ √ ≈ € £ ¥",
    "def f(x):\n    return {'a': [1, 2.5e-3, None]}\n",
    "unseen: ⅧⅨ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x01\x7f",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips_any_string(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens_and_size(tokenizer):
    assert len(tokenizer) <= 512
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|begin_of_text|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|end_of_text|>", 1)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 2)
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id
    # Special tokens typed in text are single tokens, not spelled out byte by byte.
    assert tokenizer("<|im_end|>", add_special_tokens=False).input_ids == [4]
    # The corpus taught it real merges, so common words are short.
    assert len(tokenizer(" the", add_special_tokens=False).input_ids) == 1


@pytest.mark.parametrize("vocab_size", [261, 300, 1000])
def test_tokenizer_respects_vocab_size(vocab_size):
    assert len(build_tokenizer(vocab_size)) <= vocab_size


def test_tokenizer_rejects_too_small_vocab():
    with pytest.raises(ValueError, match="at least 261"):
        build_tokenizer(200)


def test_tokenizer_is_deterministic_and_a_fresh_copy():
    first, second = build_tokenizer(), build_tokenizer()
    assert first is not second
    assert first.get_vocab() == second.get_vocab()
    first.add_tokens(["<|only-in-first|>"])
    assert "<|only-in-first|>" not in build_tokenizer().get_vocab()
    assert build_tokenizer(seed=1).get_vocab() == build_tokenizer(seed=1).get_vocab()
    assert build_tokenizer(seed=1).get_vocab() != second.get_vocab()


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<|begin_of_text|><|im_start|>system\nYou are a concise assistant.<|im_end|>\n"
        "<|im_start|>user\nWhy is the sky blue? Answer in one sentence, please.<|im_end|>\n"
        "<|im_start|>assistant\nAir scatters blue light more than red light.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("please.<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith(prompt)

    out = tokenizer.apply_chat_template(
        MESSAGES, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids.count(tokenizer.bos_token_id) == 1
    answer = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(answer) == MESSAGES[2]["content"] + "<|im_end|>"


def test_custom_chat_template():
    template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    tokenizer = build_tokenizer(chat_template=template)
    assert tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False) == (
        MESSAGES[0]["content"] + "|" + MESSAGES[1]["content"] + "|"
    )


def test_corpus_is_bundled_and_varied():
    lines = corpus_lines()
    text = "\n".join(lines)
    assert len(lines) > 300 and 30_000 < len(text.encode()) < 60_000
    for needle in ("café", "naïve", "日本", "User:", "def ", "3.14159"):
        assert needle in text


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_loads_back_and_trains(arch, tmp_path, tokenizer):
    path = tiny_model(arch, tmp_path / arch)
    assert path == tmp_path / arch
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin"))

    kwargs = {"attn_implementation": "eager"} if arch == "gemma2" else {}
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert model.config.model_type == arch
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded_tok = AutoTokenizer.from_pretrained(path)
    ours, loaded = tokenizer.get_vocab(), loaded_tok.get_vocab()
    assert {token: loaded[token] for token in ours} == ours
    # transformers rebuilds a qwen2 checkpoint's tokenizer as its Qwen2Tokenizer, which
    # adds "<|endoftext|>" as unk; the model vocab leaves room for it.
    assert set(loaded) - set(ours) == ({"<|endoftext|>"} if arch == "qwen2" else set())
    assert loaded_tok.chat_template == tokenizer.chat_template

    config = model.config
    assert len(tokenizer) <= config.vocab_size and config.vocab_size % 2 == 1
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 1, 2)
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
    ) == (64, 2, 4)
    assert config.num_key_value_heads == 2

    # The saved weights, as transformers reads them back, are exactly those built in memory
    # from the same config and seed (MoE checkpoints are written one tensor per expert).
    expected = init_tiny_model(tiny_config(arch)).state_dict()
    loaded_state = model.state_dict()
    assert loaded_state.keys() == expected.keys()
    for name, tensor in loaded_state.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)

    ids = loaded_tok.apply_chat_template(MESSAGES, return_dict=True, return_tensors="pt")[
        "input_ids"
    ]
    assert ids[0].tolist() == tokenizer.apply_chat_template(MESSAGES, return_dict=True)["input_ids"]
    assert len(loaded_tok) <= config.vocab_size
    assert ids.shape[1] > 16  # longer than the sliding windows, so they matter
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights_other_seed_other_weights(arch):
    config = tiny_config(arch)
    a = init_tiny_model(config, seed=0).state_dict()
    b = init_tiny_model(config, seed=0).state_dict()
    c = init_tiny_model(config, seed=1).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1)


def test_written_weights_are_bit_identical_across_calls(tmp_path):
    first = load_file(tiny_model("qwen2", tmp_path / "a", seed=3) / "model.safetensors")
    second = load_file(tiny_model("qwen2", tmp_path / "b", seed=3) / "model.safetensors")
    other = load_file(tiny_model("qwen2", tmp_path / "c", seed=4) / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_global_rng_is_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init_tiny_model(tiny_config("llama"), seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_norms_and_biases_are_not_at_their_init_constant(arch):
    model = init_tiny_model(tiny_config(arch))
    checked = 0
    for module_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                assert param.std() > 0.01, f"{module_name}.{name} is still constant"
                checked += 1
    assert checked >= 5


def test_arch_features_are_switched_on():
    assert tiny_config("mistral").sliding_window == 16
    gemma2 = tiny_config("gemma2")
    assert gemma2.attn_logit_softcapping and gemma2.final_logit_softcapping
    assert (
        gemma2.layer_types == ["sliding_attention", "full_attention"]
        and gemma2.sliding_window == 16
    )
    gemma3 = tiny_config("gemma3_text")
    assert gemma3.layer_types == ["sliding_attention", "full_attention"]
    thetas = {kind: params["rope_theta"] for kind, params in gemma3.rope_parameters.items()}
    assert thetas["sliding_attention"] != thetas["full_attention"]
    assert tiny_config("phi3").rope_parameters["partial_rotary_factor"] == 0.5
    qwen2 = init_tiny_model(tiny_config("qwen2"))
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    phi3 = init_tiny_model(tiny_config("phi3"))
    assert hasattr(phi3.model.layers[0].self_attn, "qkv_proj")
    assert hasattr(phi3.model.layers[0].mlp, "gate_up_proj")


def test_overrides_vocab_and_dtype(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    path = tiny_model(
        "llama",
        tmp_path / "m",
        vocab_size=1007,
        dtype=torch.bfloat16,
        tie_word_embeddings=True,
        rope_parameters=rope,
    )
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 1007 and config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_type"] == "llama3"
    weights = load_file(path / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (1007, 64)
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert tiny_config("gemma", vocab_size=777).vocab_size == 777


def test_small_vocab_gets_a_small_tokenizer_and_too_small_is_refused(tmp_path):
    path = tiny_model("llama", tmp_path / "m", vocab_size=300)
    assert len(AutoTokenizer.from_pretrained(path)) <= 300
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tiny_config("llama", tokenizer=build_tokenizer(), vocab_size=400)


def test_unknown_arch_lists_supported(tmp_path):
    with pytest.raises(
        ValueError,
        match="supported: gemma, gemma2, gemma3_text, gpt_oss, llama, mistral, mixtral, phi3, "
        "qwen2, qwen3, qwen3_moe",
    ):
        tiny_model("gpt2", tmp_path / "m")
    with pytest.raises(ValueError, match="unknown architecture"):
        tiny_config("bert")
    assert not (tmp_path / "m").exists()


def test_refuses_non_empty_directory_unless_overwrite(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny_model("llama", target)
    assert not (target / "config.json").exists()
    tiny_model("llama", target, overwrite=True)
    assert (target / "config.json").is_file() and (target / "notes.txt").read_text() == "keep me"
    # An existing but empty directory is fine without overwrite.
    (tmp_path / "empty").mkdir()
    tiny_model("llama", tmp_path / "empty")


#: Float fields left at their defaults on purpose: dropout must be 0 for the parity
#: harness to compare two models' gradients deterministically.
_DEFAULT_ON_PURPOSE = {
    "attention_dropout", "resid_pdrop", "embd_pdrop", "hidden_dropout", "router_jitter_noise",
}  # fmt: skip


def _float_fields(values: dict, prefix: str = "") -> dict[str, float]:
    found = {}
    for key, value in values.items():
        if isinstance(value, float) and not isinstance(value, bool):
            found[prefix + key] = value
        elif isinstance(value, dict):
            found.update(_float_fields(value, f"{prefix}{key}."))
    return found


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_every_float_field_differs_from_its_default(arch):
    """A patch that reads a constant instead of the config (an eps, a rope base, a scale)
    agrees with Hugging Face on a config that holds that constant: none of ours does."""
    config = tiny_config(arch)
    defaults = _float_fields(type(config)().to_dict())
    same = {
        key: value for key, value in _float_fields(config.to_dict()).items()
        if defaults.get(key) == value and key.rsplit(".", 1)[-1] not in _DEFAULT_ON_PURPOSE
    }  # fmt: skip
    assert not same, f"{arch}: float fields at their defaults: {same}"

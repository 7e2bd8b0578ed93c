"""Chat templates, response masks, truncation: tokenize() end to end on real tokenizers."""

from __future__ import annotations

import pytest
from chats import CONVERSATION, RESPONSES, trained_runs

from sloth_core.data import (
    CHAT_TEMPLATES,
    DataError,
    TokenizeStats,
    detect_format,
    resolve_chat_template,
    tokenize,
)
from sloth_core.testing.datasets import load_tiny_instructions
from sloth_core.testing.tokenizer import CHATML_TEMPLATE, EOS_TOKEN, build_tokenizer

# The markers each template's model has as special tokens, and its end of turn.
MARKERS = {
    "chatml": ([], "<|im_end|>"),
    "qwen": ([], "<|im_end|>"),
    "llama-3": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "llama-3.1": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "mistral": (["[INST]", "[/INST]"], EOS_TOKEN),
    "gemma": (["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "phi-3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|end|>"),
    "alpaca": ([], EOS_TOKEN),
}


def test_every_required_template_is_built_in():
    assert {"chatml", "llama-3", "mistral", "gemma", "qwen", "phi-3", "alpaca"} <= set(
        CHAT_TEMPLATES
    )


@pytest.mark.parametrize("name", sorted(MARKERS))
def test_builtin_template_masks_exactly_the_responses(name):
    tokenizer = build_tokenizer()
    markers, end_of_turn = MARKERS[name]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": markers}, replace_extra_special_tokens=False
    )
    template = resolve_chat_template(tokenizer, name)

    # The generation prompt is exactly what precedes the response in the full rendering.
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:-1], chat_template=template, tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    assert full.startswith(prompt + RESPONSES[-1] + end_of_turn)

    [example], stats = tokenize(
        [{"messages": CONVERSATION}], tokenizer, chat_template=name, max_seq_length=512
    )
    assert trained_runs(tokenizer, example) == [r + end_of_turn for r in RESPONSES]
    assert stats.kept == 1 and stats.trained_tokens == sum(x != -100 for x in example.labels)

    # The same tokens and mask as transformers' own, from the generation blocks.
    hf = tokenizer.apply_chat_template(
        CONVERSATION, chat_template=template, return_assistant_tokens_mask=True, return_dict=True
    )
    assert example.input_ids == hf["input_ids"]
    assert [int(x != -100) for x in example.labels] == hf["assistant_masks"]


def test_chat_rows_have_the_bos_their_template_writes():
    # The tokenizer adds a bos to plain text, but a chat row gets only what its template
    # writes, as apply_chat_template (and so inference) does.
    tokenizer = build_tokenizer()
    bos = tokenizer.bos_token_id
    for name, bos_count in (("chatml", 0), ("llama-3", 1), (None, 1)):  # None: its own
        [example], _ = tokenize(
            [{"messages": CONVERSATION}], tokenizer, chat_template=name, max_seq_length=512
        )
        assert example.input_ids[:2].count(bos) == bos_count


def test_tokenizers_own_template_without_generation_markers():
    own = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    tokenizer = build_tokenizer(chat_template=own)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]},
        replace_extra_special_tokens=False,
    )
    for name in (None, "auto"):
        [example], _ = tokenize(
            [{"messages": CONVERSATION}], tokenizer, chat_template=name, max_seq_length=512
        )
        assert trained_runs(tokenizer, example) == [r + EOS_TOKEN for r in RESPONSES]
    assert resolve_chat_template(tokenizer, None) == own


def test_template_that_renders_the_last_turn_differently_falls_back_to_search():
    # OLMo style: <|im_end|> after every turn but the last, which ends with the eos
    # instead, so each turn renders differently as the last of a prefix than in the whole.
    olmo = CHATML_TEMPLATE.replace(
        "message['content'] + '<|im_end|>'",
        "message['content'] + ('<|im_end|>' if not loop.last else eos_token)",
    )
    assert olmo != CHATML_TEMPLATE
    tokenizer = build_tokenizer(chat_template=olmo)
    [example], _ = tokenize([{"messages": CONVERSATION}], tokenizer, max_seq_length=512)
    # "ok" also in the prompt ("Say ok"): found after it, not in it.
    assert trained_runs(tokenizer, example) == ["ok<|im_end|>", f"Fine, thanks.{EOS_TOKEN}"]


def test_slow_tokenizer_path_encodes_spans_apart(monkeypatch):
    tokenizer = build_tokenizer()
    [fast], _ = tokenize([{"messages": CONVERSATION}], tokenizer, max_seq_length=512)
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))
    [slow], _ = tokenize([{"messages": CONVERSATION}], tokenizer, max_seq_length=512)
    assert slow == fast


def test_alpaca_and_sharegpt_rows_match_their_chat_equivalent(tokenizer):
    alpaca = {"instruction": "Add", "input": "1, 2", "output": "3"}
    sharegpt = {
        "conversations": [{"from": "human", "value": "Add\n\n1, 2"}, {"from": "gpt", "value": "3"}]
    }
    chat = {
        "messages": [
            {"role": "user", "content": "Add\n\n1, 2"},
            {"role": "assistant", "content": "3"},
        ]
    }
    results = [tokenize([row], tokenizer, max_seq_length=64)[0] for row in (alpaca, sharegpt, chat)]
    assert results[0] == results[1] == results[2]
    assert trained_runs(tokenizer, results[0][0]) == ["3<|im_end|>"]


def test_text_rows_train_every_token_and_end_with_eos(tokenizer):
    eos = tokenizer.eos_token_id
    [example], stats = tokenize([{"text": "The cat sat."}], tokenizer, max_seq_length=64)
    assert example.input_ids[0] == tokenizer.bos_token_id and example.input_ids[-1] == eos
    assert example.labels == [-100, *example.input_ids[1:]]
    assert tokenizer.decode(example.input_ids[1:]) == "The cat sat." + EOS_TOKEN
    [bare], _ = tokenize([{"text": "The cat sat."}], tokenizer, max_seq_length=64, add_eos=False)
    assert bare.input_ids == example.input_ids[:-1]


def test_train_on_everything(tokenizer):
    [example], _ = tokenize(
        [{"messages": CONVERSATION}], tokenizer, max_seq_length=512, train_on_responses_only=False
    )
    assert example.labels == [-100, *example.input_ids[1:]]


def test_truncation_and_drops_are_counted(tokenizer):
    rows = [
        {"instruction": "Hi", "output": "Hello"},  # fits
        {"instruction": "word " * 10, "output": "cut"},  # loses its last (masked) token
        {"instruction": "word " * 40, "output": "gone"},  # response entirely past the limit
        {"instruction": "Hi", "output": ""},  # only the end of turn is trained: kept
    ]
    [whole], _ = tokenize(rows[1:2], tokenizer, max_seq_length=512)
    limit = len(whole) - 1
    examples, stats = tokenize(rows, tokenizer, data_format="alpaca", max_seq_length=limit)
    assert (stats.rows, stats.kept, stats.truncated) == (4, 3, 2)
    assert (stats.dropped_empty, stats.dropped_truncated) == (1, 1)
    assert examples[1].input_ids == whole.input_ids[:limit]
    assert trained_runs(tokenizer, examples[1]) == ["cut<|im_end|>"]
    assert trained_runs(tokenizer, examples[2]) == ["<|im_end|>"]
    assert stats.tokens == sum(len(ex) for ex in examples) and stats.longest == limit
    assert stats.summary() == (
        f"4 rows: 3 kept, 1 dropped (no trained tokens left after truncation), 2 truncated "
        f"to {limit} tokens; {stats.tokens} tokens, {stats.trained_tokens} trained"
    )


def test_stats_summary_names_each_reason_for_a_drop():
    stats = TokenizeStats(rows=48, kept=45, dropped_empty=3, dropped_truncated=2, tokens=9)
    assert stats.summary() == (
        "48 rows: 45 kept, 3 dropped (1 with nothing to train on, 2 with no trained tokens "
        "left after truncation); 9 tokens, 0 trained"
    )
    assert TokenizeStats(rows=2, kept=2, tokens=5, trained_tokens=3).summary() == (
        "2 rows: 2 kept; 5 tokens, 3 trained"
    )
    assert (
        "1 dropped (nothing to train on)"
        in TokenizeStats(rows=2, kept=1, dropped_empty=1).summary()
    )


def test_empty_text_rows_are_dropped(tokenizer):
    _, stats = tokenize([{"text": "a"}, {"text": "  "}], tokenizer, max_seq_length=8)
    assert (stats.kept, stats.dropped_empty, stats.dropped_truncated) == (1, 1, 0)


def test_every_row_too_long_is_an_error_naming_max_seq_length(tokenizer):
    rows = [{"instruction": "word " * 30, "output": "x"}] * 3
    with pytest.raises(DataError, match=r"every row is too long.*max_seq_length=16"):
        tokenize(rows, tokenizer, max_seq_length=16)


def test_bad_settings_and_rows(tokenizer):
    with pytest.raises(DataError, match="unknown chat template 'vicuna'.*chatml.*llama-3"):
        tokenize([{"messages": CONVERSATION}], tokenizer, chat_template="vicuna", max_seq_length=64)
    with pytest.raises(DataError, match="unknown data_format 'csv'"):
        tokenize([{"text": "a"}], tokenizer, data_format="csv", max_seq_length=64)
    with pytest.raises(DataError, match="row 2: field 'text' must be a string"):
        tokenize([{"text": "a"}, {"text": 1}], tokenizer, max_seq_length=64)
    tool = [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}]
    with pytest.raises(DataError, match=r"row 1: messages\[1\] has the role 'tool'"):
        tokenize([{"messages": tool}], tokenizer, chat_template="gemma", max_seq_length=64)


def test_template_names_and_aliases(tokenizer):
    assert resolve_chat_template(tokenizer, "Llama3") == CHAT_TEMPLATES["llama-3"]
    assert resolve_chat_template(tokenizer, "qwen2.5") == CHAT_TEMPLATES["qwen"]
    assert resolve_chat_template(tokenizer, "auto") == CHATML_TEMPLATE
    tokenizer.chat_template = None
    assert resolve_chat_template(tokenizer, None) == CHAT_TEMPLATES["chatml"]
    raw = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(tokenizer, raw) == raw


def test_qwen_adds_its_default_system_turn(tokenizer):
    text = tokenizer.apply_chat_template(
        CONVERSATION[1:3], chat_template=CHAT_TEMPLATES["qwen"], tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou are Qwen")


def test_bundled_instructions_all_keep_their_response(tokenizer):
    rows = load_tiny_instructions()
    assert detect_format(rows) == "alpaca"
    examples, stats = tokenize(rows, tokenizer, max_seq_length=256)
    assert stats.kept == len(rows) == 242 and stats.truncated == 0
    for row, example in zip(rows[:20], examples[:20], strict=True):
        assert trained_runs(tokenizer, example) == [row["output"] + "<|im_end|>"]

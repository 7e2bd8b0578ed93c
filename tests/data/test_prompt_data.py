"""The GRPO prompt data: rows -> prompt token ids (strings and messages) -> left-padded batches."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from sloth_core.data import (
    DataError,
    EpochOrder,
    PromptBatches,
    PromptExample,
    load_records,
    reward_columns,
    tokenize_preferences,
    tokenize_prompts,
)
from sloth_core.testing.datasets import prompt_dataset
from sloth_core.train.rewards import exact_match

USER = [{"role": "user", "content": "What is 2 plus 3?"}]


def test_a_string_prompt_is_tokenised_as_trl_does(tokenizer):
    [example], stats = tokenize_prompts([{"prompt": "The sky is"}], tokenizer)
    # TRL: processing_class(text=prompts), its bos included.
    assert example.ids == tuple(tokenizer("The sky is")["input_ids"])
    assert (
        example.ids[0] == tokenizer.bos_token_id and example.ids.count(tokenizer.bos_token_id) == 1
    )
    assert example.prompt == "The sky is" and example.columns == {}
    assert (stats.rows, stats.conversational, stats.truncated) == (1, 0, 0)
    assert stats.tokens == stats.longest == len(example.ids)


@pytest.mark.parametrize("template", [None, "llama-3", "gemma"])
def test_a_message_prompt_is_rendered_with_the_generation_prompt(tokenizer, template):
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    if template == "gemma":  # no system turn
        messages = USER
    [example], stats = tokenize_prompts([{"prompt": messages}], tokenizer, chat_template=template)
    chat_template = None if template is None else _template(template)
    expected = tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert example.ids == tuple(expected["input_ids"])
    assert example.ids.count(tokenizer.bos_token_id) <= 1
    assert example.prompt == messages and stats.conversational == 1


def _template(name):
    from sloth_core.data import resolve_chat_template
    from sloth_core.testing.tokenizer import build_tokenizer

    return resolve_chat_template(build_tokenizer(), name)


def test_prompts_are_the_preference_pipelines_prompts(tokenizer):
    rows = [{"prompt": "Q: 2 plus 3?\nAnswer:"}, {"prompt": USER}]
    examples, _ = tokenize_prompts(rows, tokenizer)
    completions = [" 5", [{"role": "assistant", "content": "5"}]]
    pairs = [
        {**row, "chosen": c, "rejected": c * 2} for row, c in zip(rows, completions, strict=True)
    ]
    preference, _ = tokenize_preferences(pairs, tokenizer, kind="pairs", max_length=256)
    assert [ex.ids for ex in examples] == [pair.prompt for pair in preference]


def test_columns_are_kept_and_completions_left_out(tokenizer):
    rows = [
        {"prompt": "a", "answer": "1", "meta": {"k": [1, 2]}, "completion": "x"},
        {"prompt": USER, "answer": "2", "completion_ids": [3]},
    ]
    examples, _ = tokenize_prompts(rows, tokenizer)
    assert [ex.columns for ex in examples] == [
        {"answer": "1", "meta": {"k": [1, 2]}},
        {"answer": "2"},
    ]
    assert reward_columns(examples, repeat=2) == {
        "answer": ["1", "1", "2", "2"],
        "meta": [{"k": [1, 2]}, {"k": [1, 2]}, None, None],
    }
    assert reward_columns(examples[1:]) == {"answer": ["2"]}


def test_long_prompts_keep_their_last_tokens(tokenizer):
    text = "one two three four five six seven eight nine ten eleven twelve"
    full = tuple(tokenizer(text)["input_ids"])
    rows = [{"prompt": text}, {"prompt": "hi"}, {"prompt": USER}]
    examples, stats = tokenize_prompts(rows, tokenizer, max_prompt_length=6)
    assert examples[0].ids == full[-6:]
    assert examples[1].ids == tuple(tokenizer("hi")["input_ids"])
    assert len(examples[2].ids) == 6
    assert stats.truncated == 2 and stats.longest == 6
    assert "2 truncated to their last 6 tokens" in stats.summary()
    with pytest.raises(DataError, match="max_prompt_length must be at least 1"):
        tokenize_prompts(rows, tokenizer, max_prompt_length=0)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"answer": "1"}, "row 2: missing field 'prompt'"),
        ({"prompt": 7}, "row 2: field 'prompt' must be a string or a list of messages, got int"),
        ({"prompt": ""}, "row 2: field 'prompt' is empty"),
        ({"prompt": " \n"}, "row 2: field 'prompt' is empty"),
        ({"prompt": []}, "row 2: field 'prompt' must be .* got an empty list"),
        ({"prompt": [{"role": "user", "content": ""}]}, "row 2: field 'prompt' is empty"),
        ({"prompt": [{"role": "user"}]}, "row 2: prompt\\[0\\]: missing 'content'"),
        ({"prompt": ["hi"]}, "row 2: prompt\\[0\\]: expected an object"),
        ({"prompt": [{"role": "narrator", "content": "x"}]}, "row 2: prompt\\[0\\] has the role"),
        ({"prompt": "a", "completions": ["b"]}, "row 2: a column may not be named 'completions'"),
        ({"prompt": "a", "prompts": "b"}, "row 2: a column may not be named 'prompts'"),
        ("text", "row 2: expected an object, got str"),
    ],
)
def test_bad_rows_name_row_and_field(tokenizer, row, message):
    with pytest.raises(DataError, match=message):
        tokenize_prompts([{"prompt": "fine"}, row], tokenizer)


def test_no_rows_is_an_error(tokenizer):
    with pytest.raises(DataError, match="no prompt rows"):
        tokenize_prompts([], tokenizer)


# --- batches ----------------------------------------------------------------------------


def _examples(count, seed=0):
    rng = random.Random(seed)
    return [
        PromptExample(
            tuple(rng.randrange(5, 50) for _ in range(rng.randint(1, 7))), f"p{i}", {"i": i}
        )
        for i in range(count)
    ]


def test_batches_are_left_padded_for_generation():
    examples = _examples(11, seed=3)
    batches = PromptBatches(examples, batch_size=4, pad_token_id=2, seed=7)
    assert batches.num_batches() == len(batches) == 3
    seen = []
    for index in range(3):
        batch = batches.batch(0, index)
        chosen = batch["index"].tolist()
        assert [ex.columns["i"] for ex in batches.examples_of(0, index)] == chosen
        longest = max(len(examples[i]) for i in chosen)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(chosen), longest)
        assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
        for row, position in enumerate(chosen):
            ids = examples[position].ids
            pad = longest - len(ids)
            assert batch["input_ids"][row, pad:].tolist() == list(ids)
            assert batch["input_ids"][row, :pad].tolist() == [2] * pad
            assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(ids)
        seen += chosen
    assert sorted(seen) == list(range(11))


def test_the_order_is_deterministic_and_shared_with_the_other_batches():
    examples = _examples(10)
    first = PromptBatches(examples, batch_size=3, pad_token_id=0, seed=5)
    again = PromptBatches(examples, batch_size=3, pad_token_id=0, seed=5)
    order = EpochOrder(10, 3, seed=5, shuffle=True, drop_last=False)
    epochs = []
    for epoch in range(3):
        indices = [first.indices(epoch, i) for i in range(first.num_batches())]
        assert indices == [order.batch(epoch, i) for i in range(4)]
        assert torch.equal(first.batch(epoch, 1)["input_ids"], again.batch(epoch, 1)["input_ids"])
        epochs.append(indices)
    assert epochs[0] != epochs[1]  # a new order each epoch
    other = PromptBatches(examples, batch_size=3, pad_token_id=0, seed=6)
    assert other.indices(0, 0) + other.indices(0, 1) != epochs[0][0] + epochs[0][1]
    plain = PromptBatches(examples, batch_size=3, pad_token_id=0, seed=5, shuffle=False)
    assert plain.indices(2, 1) == [3, 4, 5]
    dropped = PromptBatches(examples, batch_size=3, pad_token_id=0, seed=5, drop_last=True)
    assert dropped.num_batches() == 3


def test_bad_batch_settings():
    with pytest.raises(DataError, match="no prompts to batch"):
        PromptBatches([], batch_size=2, pad_token_id=0, seed=0)
    with pytest.raises(DataError, match="3 prompts make no full batch of 4"):
        PromptBatches(_examples(3), batch_size=4, pad_token_id=0, seed=0, drop_last=True)
    with pytest.raises(IndexError):
        PromptBatches(_examples(3), batch_size=2, pad_token_id=0, seed=0).batch(0, 2)


# --- the bundled set ---------------------------------------------------------------------


def test_the_bundled_prompt_set_is_current_and_tokenises(tokenizer, monkeypatch):
    scripts = Path(__file__).parents[2] / "scripts"
    monkeypatch.syspath_prepend(str(scripts))  # it imports make_preference_data beside it
    spec = importlib.util.spec_from_file_location(
        "make_prompt_data", scripts / "make_prompt_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0
    records = load_records(prompt_dataset())
    assert 190 <= len(records) <= 230
    examples, stats = tokenize_prompts(records, tokenizer)
    assert stats.conversational == len(records) // 2 and stats.longest <= 48
    assert {row["task"] for row in records} == {
        "number",
        "capital",
        "antonym",
        "reverse",
        "plural",
        "parity",
    }
    columns = reward_columns(examples)
    assert set(columns) == {"answer", "task"}
    # The answers are what the exact_match reward checks; a wrong one scores 0.
    assert exact_match(completions=columns["answer"], **columns) == [1.0] * len(records)
    wrong = columns["answer"][1:] + columns["answer"][:1]
    assert sum(exact_match(completions=wrong, **columns)) < len(records) / 10

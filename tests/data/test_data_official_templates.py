"""tokenize() against the models' published chat templates (templates/*.jinja), and the
built-in templates against the published text they stand for."""

from __future__ import annotations

import pytest
from chats import CONVERSATION, trained_id_runs, trained_runs
from official_templates import MODELS, model_tokenizer, template_text

from sloth_core.data import DataError, resolve_chat_template, tokenize
from sloth_core.inference.stop import stop_token_ids

# Qwen3 keeps the <think> block of the turns after the last user message only.
REASONING = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6"},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "<think>\nBe polite.\n</think>\n\nYou are welcome."},
]


def chat_ids(tokenizer, messages, **options):
    return tokenizer.apply_chat_template(messages, return_dict=True, **options)["input_ids"]


def render(tokenizer, messages, template=None, **options):
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, **options
    )


def conversation_for(name):
    return CONVERSATION[1:] if name == "gemma-2" else CONVERSATION  # Gemma 2: no system


@pytest.mark.parametrize("name", sorted(MODELS))
def test_chat_rows_are_tokenised_as_apply_chat_template_does(name):
    # Training and inference see the same prompt tokens: no bos the template does not write.
    tokenizer = model_tokenizer(name)
    messages = conversation_for(name)
    [example], _ = tokenize([{"messages": messages}], tokenizer, max_seq_length=1024)
    assert example.input_ids == chat_ids(tokenizer, messages)
    prompt = chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    assert example.input_ids[: len(prompt)] == prompt
    assert example.labels[len(prompt) - 1] == -100 and example.labels[len(prompt)] != -100


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_response_ends_at_the_token_that_stops_generation(name):
    # Phi-3.5's template appends <|endoftext|> after the last turn's <|end|> only: generation
    # stops at <|end|>, so what follows is never written and is not trained, in any turn.
    tokenizer = model_tokenizer(name)
    template = template_text(name)
    [example], _ = tokenize([{"messages": conversation_for(name)}], tokenizer, max_seq_length=1024)
    stops = set(stop_token_ids(tokenizer, None, template))
    runs = trained_id_runs(example)
    assert len(runs) == 2
    for run in runs:
        assert run[-1] in stops and not stops.intersection(run[:-1])


def test_phi_3_5_trains_its_end_of_turn_not_the_final_eos():
    tokenizer = model_tokenizer("phi-3.5")
    [example], _ = tokenize([{"messages": CONVERSATION}], tokenizer, max_seq_length=1024)
    assert trained_runs(tokenizer, example) == ["ok<|end|>", "Fine, thanks.<|end|>"]
    assert tokenizer.decode(example.input_ids[-3:]) == "<|end|>\n<|endoftext|>"
    assert example.labels[-2:] == [-100, -100]


def test_qwen3_multi_turn_reasoning_trains_each_turn_as_rendered():
    tokenizer = model_tokenizer("qwen3")
    rows = [
        {"messages": REASONING},
        {"messages": REASONING[:4]},
        {"messages": [{"role": "system", "content": "Think."}, *REASONING[:2]]},
    ]
    examples, stats = tokenize(rows, tokenizer, max_seq_length=1024)
    assert stats.kept == 3
    for row, example in zip(rows, examples, strict=True):
        assert example.input_ids == chat_ids(tokenizer, row["messages"])
    # The earlier turns as the template renders them in the whole: without their thinking.
    assert trained_runs(tokenizer, examples[0]) == [
        "4<|im_end|>",
        "6<|im_end|>",
        "<think>\nBe polite.\n</think>\n\nYou are welcome.<|im_end|>",
    ]
    assert trained_runs(tokenizer, examples[1]) == [
        "4<|im_end|>",
        "<think>\nThree and three.\n</think>\n\n6<|im_end|>",
    ]
    assert trained_runs(tokenizer, examples[2]) == [
        "<think>\nTwo and two.\n</think>\n\n4<|im_end|>"
    ]
    # A turn after the last user message keeps its thinking even when not the last turn.
    tool_loop = [*REASONING[:2], {"role": "assistant", "content": "<think>\nMore.\n</think>\n\n!"}]
    [example], _ = tokenize([{"messages": tool_loop}], tokenizer, max_seq_length=1024)
    assert trained_runs(tokenizer, example) == [
        "<think>\nTwo and two.\n</think>\n\n4<|im_end|>",
        "<think>\nMore.\n</think>\n\n!<|im_end|>",
    ]


def test_text_row_that_holds_a_rendered_chat_gets_no_second_bos():
    tokenizer = model_tokenizer("llama-3")
    text = render(tokenizer, CONVERSATION)
    assert text.startswith("<|begin_of_text|>")
    [example], _ = tokenize([{"text": text}], tokenizer, max_seq_length=1024)
    # Exactly the chat's tokens: one bos, and it already ends with the eos (<|eot_id|>).
    assert example.input_ids == chat_ids(tokenizer, CONVERSATION)
    [plain], _ = tokenize([{"text": "The cat sat."}], tokenizer, max_seq_length=64)
    assert plain.input_ids[0] == tokenizer.bos_token_id
    assert plain.input_ids.count(tokenizer.bos_token_id) == 1


def test_text_row_ending_with_eos_and_a_newline_gets_no_second_eos():
    tokenizer = model_tokenizer("llama-3")
    for text in ("The cat sat.<|eot_id|>\n", "The cat sat.<|eot_id|> \n\n", "The cat sat."):
        [example], _ = tokenize([{"text": text}], tokenizer, max_seq_length=64)
        assert tokenizer.decode(example.input_ids) == "<|begin_of_text|>The cat sat.<|eot_id|>"


@pytest.mark.parametrize(
    ("builtin", "official"),
    [
        ("llama-3", "llama-3"),
        ("llama-3.1", "llama-3.1"),
        ("llama-3.2", "llama-3.1"),
        ("llama-3.3", "llama-3.1"),
        ("gemma", "gemma-2"),
        ("qwen2.5", "qwen2.5"),
    ],
)
def test_builtin_template_renders_as_the_published_one(builtin, official):
    tokenizer = model_tokenizer(official)
    template = resolve_chat_template(tokenizer, builtin)
    spaced = [{**m, "content": f"  {m['content']}\n"} for m in conversation_for(official)]
    for messages in (conversation_for(official), spaced):
        for n in range(1, len(messages) + 1):
            for generation in (False, True):
                expected = render(tokenizer, messages[:n], add_generation_prompt=generation)
                got = render(tokenizer, messages[:n], template, add_generation_prompt=generation)
                assert got == expected, (n, generation)


def test_llama_3_1_opens_with_its_system_turn():
    tokenizer = model_tokenizer("llama-3.1")
    header = "<|start_header_id|>system<|end_header_id|>\n\n"
    dates = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    template = resolve_chat_template(tokenizer, "llama-3.2")
    text = render(tokenizer, CONVERSATION[1:3], template)
    assert text.startswith(f"<|begin_of_text|>{header}{dates}<|eot_id|>")
    text = render(tokenizer, CONVERSATION[:3], template)
    assert text.startswith(f"<|begin_of_text|>{header}{dates}Be brief.<|eot_id|>")
    tool = [{"role": "user", "content": "Run it"}, {"role": "ipython", "content": "42"}]
    expected = render(tokenizer, tool)
    assert render(tokenizer, tool, template) == expected and '"42"' in expected


def test_phi_3_builtin_is_the_published_one_less_the_final_eos():
    tokenizer = model_tokenizer("phi-3.5")
    template = resolve_chat_template(tokenizer, "phi-3.5")
    assert render(tokenizer, CONVERSATION, template) + "<|endoftext|>" == render(
        tokenizer, CONVERSATION
    )
    prompt = render(tokenizer, CONVERSATION[:-1], add_generation_prompt=True)
    assert render(tokenizer, CONVERSATION[:-1], template, add_generation_prompt=True) == prompt


# The published Alpaca prompts, as the tatsu-lab/alpaca data set's `text` column has them
# (train.py in stanford_alpaca ends its prompt at "### Response:" and appends the output
# and the eos).
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
)


def test_alpaca_builtin_writes_the_published_prompts(tokenizer):
    eos = tokenizer.eos_token
    rows = [
        {"instruction": "Add the numbers.", "input": "1, 2", "output": "3"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    ]
    examples, _ = tokenize(rows, tokenizer, chat_template="alpaca", max_seq_length=256)
    published = (ALPACA_INPUT, ALPACA_NO_INPUT)
    for row, example, prompt in zip(rows, examples, published, strict=True):
        expected = tokenizer.bos_token + prompt.format(**row) + eos
        assert tokenizer.decode(example.input_ids) == expected
        assert trained_runs(tokenizer, example) == [row["output"] + eos]
    system = {**rows[0], "system": "Answer with a number."}
    [example], _ = tokenize([system], tokenizer, chat_template="alpaca", max_seq_length=256)
    assert tokenizer.decode(example.input_ids).startswith(
        "<|begin_of_text|>Answer with a number.\n\n### Instruction:\nAdd the numbers.\n\n### Input:"
    )


def test_a_role_the_template_does_not_name_is_an_error_naming_row_file_and_roles():
    tokenizer = model_tokenizer("qwen2.5")
    narrator = [*CONVERSATION[1:3], {"role": "narrator", "content": "Later."}]
    rows = [{"messages": CONVERSATION}, {"messages": narrator}]
    with pytest.raises(DataError) as error:
        tokenize(rows, tokenizer, max_seq_length=256, source="chats.jsonl")
    assert str(error.value) == (
        "chats.jsonl: row 2: messages[2] has the role 'narrator', which the chat template "
        "does not know; accepted: system, user, assistant, tool"
    )
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "r"}]}
    with pytest.raises(DataError, match=r"^row 1: conversations\[1\] has the role 'tool'"):
        tokenize([sharegpt], tokenizer, chat_template="chatml", max_seq_length=256)
    # Roles the template names are fine: tool for Qwen, tool and ipython for Llama 3.1.
    tool = [*CONVERSATION[1:3], {"role": "tool", "content": "42"}, CONVERSATION[4]]
    examples, _ = tokenize([{"messages": tool}], tokenizer, max_seq_length=256)
    assert trained_runs(tokenizer, examples[0]) == ["ok<|im_end|>", "Fine, thanks.<|im_end|>"]
    llama = model_tokenizer("llama-3.1")
    for role in ("tool", "ipython"):
        messages = [*tool[:2], {"role": role, "content": "42"}, tool[3]]
        tokenize([{"messages": messages}], llama, chat_template="llama-3.1", max_seq_length=256)


def test_a_template_that_refuses_a_role_is_an_error_naming_the_row():
    tokenizer = model_tokenizer("gemma-2")
    with pytest.raises(DataError) as error:
        tokenize(
            [{"messages": CONVERSATION[1:]}, {"messages": CONVERSATION}],
            tokenizer,
            max_seq_length=256,
            source="chats.jsonl",
        )
    assert str(error.value) == (
        "chats.jsonl: row 2: the chat template cannot render this conversation (System role "
        "not supported)"
    )

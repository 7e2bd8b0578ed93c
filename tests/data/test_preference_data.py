"""The preference data pipeline: rows -> chat template -> tokens -> batches (DPO, KTO)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from chats import CONVERSATION
from official_templates import model_tokenizer

from sloth_core.data import (
    IGNORE_INDEX,
    Batches,
    DataError,
    Example,
    KTOExample,
    PairExample,
    PreferenceBatches,
    load_records,
    tokenize,
    tokenize_preferences,
)
from sloth_core.data.preference import truncate
from sloth_core.testing.datasets import preference_dataset

USER = [{"role": "user", "content": "What is 2 plus 3?"}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- rows and templates ---------------------------------------------------------------


def test_string_pairs_are_tokenised_as_trl_does(tokenizer):
    row = {"prompt": "The sky is", "chosen": " blue", "rejected": " green"}
    [example], stats = tokenize_preferences([row], tokenizer, kind="pairs", max_length=64)
    # TRL: tokenizer(prompt) (its bos included), tokenizer(prompt + completion + eos) past it.
    prompt = tokenizer("The sky is")["input_ids"]
    assert prompt[0] == tokenizer.bos_token_id
    assert example.prompt == tuple(prompt)
    for text, ids in ((" blue", example.chosen), (" green", example.rejected)):
        whole = tokenizer("The sky is" + text + tokenizer.eos_token)["input_ids"]
        assert example.prompt + ids == tuple(whole)
        assert ids[-1] == tokenizer.eos_token_id
    assert stats.kept == 1 and stats.truncated == 0 and stats.split_apart == 0


def test_a_completion_already_ending_with_eos_gets_no_second_one(tokenizer):
    row = {"prompt": "Hi", "chosen": " yes" + tokenizer.eos_token, "rejected": " no"}
    [example], _ = tokenize_preferences([row], tokenizer, kind="pairs", max_length=64)
    assert example.chosen.count(tokenizer.eos_token_id) == 1
    assert example.rejected[-1] == tokenizer.eos_token_id


def _sft_ids(tokenizer, messages, template):
    [sft], _ = tokenize(
        [{"messages": messages}], tokenizer, chat_template=template, max_seq_length=512
    )
    return sft


def _check_like_sft(tokenizer, prompt_ids, completion_ids, messages, template):
    sft = _sft_ids(tokenizer, messages, template)
    whole = list(prompt_ids + completion_ids)
    # The SFT tokens of the whole conversation, up to its last trained one...
    last = max(i for i, label in enumerate(sft.labels) if label != IGNORE_INDEX)
    assert whole == sft.input_ids[: last + 1]
    # ...the completion being the last response SFT trains, and no token before it.
    assert sft.labels[len(prompt_ids) - 1] == IGNORE_INDEX
    assert sft.labels[len(prompt_ids) : last + 1] == list(completion_ids)


@pytest.mark.parametrize("template", ["auto", "llama-3", "gemma", "phi-3", "alpaca"])
def test_conversational_pairs_equal_the_sft_rendering(tokenizer, template):
    prompt = CONVERSATION[:-1]
    row = {"prompt": prompt, "chosen": _assistant("Fine, thanks."), "rejected": _assistant("Bad.")}
    if template in ("gemma", "alpaca", "phi-3"):  # no system turn in some: keep it simple
        prompt = CONVERSATION[1:-1]
        row["prompt"] = prompt
    [example], stats = tokenize_preferences(
        [row], tokenizer, kind="pairs", max_length=256, chat_template=template
    )
    assert stats.split_apart == 0
    for completion, ids in ((row["chosen"], example.chosen), (row["rejected"], example.rejected)):
        _check_like_sft(tokenizer, example.prompt, ids, prompt + completion, template)


@pytest.mark.parametrize("name", ["phi-3.5", "qwen3", "llama-3.1"])
def test_published_templates_end_completions_at_the_end_of_turn(name):
    # Phi-3.5 appends an eos after the last <|end|>; Qwen3 adds an empty think block to the
    # last turn; Llama 3.1 has a dated system turn: the completion is SFT's trained part.
    tokenizer = model_tokenizer(name)
    messages = CONVERSATION[1:]
    row = {"prompt": messages[:-1], "completion": messages[-1:], "label": True}
    [example], _ = tokenize_preferences([row], tokenizer, kind="kto", max_length=512)
    _check_like_sft(tokenizer, example.prompt, example.completion, messages, None)


def test_implicit_prompt_is_the_shared_prefix(tokenizer):
    explicit = {"prompt": USER, "chosen": _assistant("5"), "rejected": _assistant("6")}
    implicit = {"chosen": USER + _assistant("5"), "rejected": USER + _assistant("6")}
    # TRL's maybe_extract_prompt: a string prompt beside conversations is ignored.
    labelled = {**implicit, "prompt": "What is 2 plus 3?"}
    strings = {"chosen": "The sky is blue", "rejected": "The sky is green"}
    examples, _ = tokenize_preferences(
        [explicit, implicit, labelled, strings], tokenizer, kind="pairs", max_length=64
    )
    assert examples[0] == examples[1] == examples[2]
    assert tokenizer.decode(examples[0].chosen) == "5<|im_end|>"
    # The space that ends the shared characters goes with the completions, as in TRL.
    assert tokenizer.decode(examples[3].prompt, skip_special_tokens=True) == "The sky is"
    assert tokenizer.decode(examples[3].chosen, skip_special_tokens=True) == " blue"


def test_kto_rows_strings_and_conversations(tokenizer, tmp_path):
    path = tmp_path / "kto.csv"  # CSV gives every value as text, the label too
    path.write_text("prompt,completion,label\nQ?, yes,true\nQ?, no,0\n", encoding="utf-8")
    rows = load_records(path)
    rows.append({"prompt": USER, "completion": _assistant("5"), "label": True})
    examples, stats = tokenize_preferences(rows, tokenizer, kind="kto", max_length=64)
    assert [ex.desirable for ex in examples] == [True, False, True]
    assert examples[0].completion[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(examples[2].completion) == "5<|im_end|>"
    assert stats.summary().startswith("3 examples (2 desirable, 1 undesirable); 0 truncated")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "rejected": " b"}, "row 2: missing field 'chosen'"),
        ({"prompt": "p", "chosen": 3, "rejected": " b"}, "row 2: field 'chosen' must be"),
        (
            {"prompt": "p", "chosen": " a", "rejected": " a"},
            "row 2: 'chosen' and 'rejected' are identical",
        ),
        ({"prompt": "p", "chosen": "  ", "rejected": " b"}, "row 2: field 'chosen' is an empty"),
        (
            {"prompt": USER, "chosen": _assistant(""), "rejected": _assistant("b")},
            "field 'chosen' is an empty",
        ),
        ({"prompt": USER, "chosen": [], "rejected": _assistant("b")}, "field 'chosen' must be"),
        (
            {"prompt": USER, "chosen": " a", "rejected": " b"},
            "row 2: 'prompt' and 'chosen' must both",
        ),
        (
            {"prompt": "p", "chosen": " a", "rejected": _assistant("b")},
            "'chosen' and 'rejected' must both",
        ),
        ({"chosen": _assistant("a"), "rejected": _assistant("b")}, "share no first turn"),
        (
            {
                "prompt": [{"role": "narrator", "content": "x"}],
                "chosen": _assistant("a"),
                "rejected": _assistant("b"),
            },
            "row 2: prompt[0] has the role 'narrator'",
        ),
        (
            {"prompt": USER, "chosen": [{"role": "assistant"}], "rejected": _assistant("b")},
            "row 2: chosen[0]: missing",
        ),
    ],
)
def test_bad_pair_rows_name_row_and_field(tokenizer, row, message):
    good = {"prompt": "p", "chosen": " a", "rejected": " b"}
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        tokenize_preferences([good, row], tokenizer, kind="pairs", max_length=64)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "completion": " a"}, "row 1: missing field 'label'"),
        (
            {"prompt": "p", "completion": " a", "label": "maybe"},
            "row 1: field 'label' must be true or false",
        ),
        ({"prompt": "p", "completion": " a", "label": 2}, "field 'label'"),
        ({"completion": " a", "label": True}, "row 1: missing field 'prompt'"),
        ({"prompt": "p", "completion": "", "label": True}, "field 'completion' is an empty"),
    ],
)
def test_bad_kto_rows_name_row_and_field(tokenizer, row, message):
    with pytest.raises(DataError, match=message):
        tokenize_preferences([row], tokenizer, kind="kto", max_length=64)


def test_bad_settings(tokenizer):
    row = [{"prompt": "p", "chosen": " a", "rejected": " b"}]
    for kwargs, message in [
        ({"kind": "sft"}, "unknown kind"),
        ({"truncation_mode": "middle"}, "unknown truncation_mode"),
        ({"max_length": 1}, "max_length must be at least 2"),
        ({"max_completion_length": 0}, "max_completion_length must be at least 1"),
    ]:
        with pytest.raises(DataError, match=message):
            tokenize_preferences(row, tokenizer, **{"kind": "pairs", "max_length": 64, **kwargs})


# --- truncation ------------------------------------------------------------------------


P, C, R = [1, 2, 3, 4, 5, 6], [7, 8, 9], [10]


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"max_length": 20}, (P, [C, R])),
        # max_prompt_length: the end of the prompt (keep_end), its start (keep_start)
        ({"max_length": 20, "max_prompt_length": 4}, ([3, 4, 5, 6], [C, R])),
        (
            {"max_length": 20, "max_prompt_length": 4, "truncation_mode": "keep_start"},
            ([1, 2, 3, 4], [C, R]),
        ),
        # max_completion_length: the start of each completion
        ({"max_length": 20, "max_completion_length": 2}, (P, [[7, 8], R])),
        # max_length, keep_end: the prompt loses its start, by the longer completion
        ({"max_length": 7}, ([3, 4, 5, 6], [C, R])),
        # ... after max_prompt_length
        ({"max_length": 6, "max_prompt_length": 4}, ([4, 5, 6], [C, R])),
        # ... a completion longer than max_length alone: its end, no prompt
        ({"max_length": 2}, ([], [[8, 9], R])),
        # max_length, keep_start: the completions lose their ends
        ({"max_length": 8, "truncation_mode": "keep_start"}, (P, [[7, 8], R])),
        ({"max_length": 7, "truncation_mode": "keep_start"}, (P, [[7], R])),
        # ... and a prompt that fills max_length leaves nothing: dropped
        ({"max_length": 6, "truncation_mode": "keep_start"}, None),
    ],
)
def test_truncation_by_hand(limits, expected):
    assert truncate(P, [C, R], **limits) == expected


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_of_one_sequence_is_trls_slice(mode):
    # trl 1.9.0's collators: ids[-max_length:] (keep_end) or ids[:max_length] (keep_start),
    # after dropping rows whose prompt alone fills max_length (keep_start).
    rng = random.Random(0)
    for _ in range(200):
        prompt = [rng.randrange(100) for _ in range(rng.randrange(0, 12))]
        completion = [rng.randrange(100) for _ in range(rng.randrange(1, 12))]
        limit = rng.randrange(2, 20)
        cut = truncate(prompt, [completion], max_length=limit, truncation_mode=mode)
        whole = prompt + completion
        if mode == "keep_start" and len(prompt) >= limit:
            assert cut is None
            continue
        assert cut is not None
        assert cut[0] + cut[1][0] == (whole[-limit:] if mode == "keep_end" else whole[:limit])


def test_truncation_stats_and_drops(tokenizer):
    rows = [
        {"prompt": "word " * 30, "chosen": " yes", "rejected": " no"},
        {"prompt": "Q", "chosen": " a b c d e f g h", "rejected": " no"},
        {"prompt": "Q", "chosen": " yes", "rejected": " no"},
    ]
    examples, stats = tokenize_preferences(
        rows, tokenizer, kind="pairs", max_length=8, truncation_mode="keep_start"
    )
    assert len(examples) == 2 and stats.truncated == 1
    assert stats.dropped == {"with the prompt alone filling max_length=8": 1}
    assert stats.longest == 8
    assert stats.summary().startswith(
        "2 pairs; 1 truncated to 8 tokens; 1 dropped: 1 with the prompt alone filling max_length=8"
    )
    with pytest.raises(DataError, match="no example left of 1 rows"):
        tokenize_preferences(
            rows[:1], tokenizer, kind="pairs", max_length=8, truncation_mode="keep_start"
        )


# --- batches ---------------------------------------------------------------------------


def _pairs(count, seed=0):
    rng = random.Random(seed)

    def ids(low, high):
        return tuple(rng.randrange(5, 90) for _ in range(rng.randrange(low, high)))

    return [PairExample(ids(0, 6), ids(1, 5), ids(1, 5)) for _ in range(count)]


def test_pair_batches_shapes_padding_labels_and_index():
    examples = _pairs(7)
    batches = PreferenceBatches(examples, batch_size=3, pad_token_id=0, seed=1)
    assert batches.num_batches() == 3
    for index in range(3):
        batch = batches.batch(0, index)
        rows = batch["index"].tolist()
        assert rows == batches.indices(0, index)
        size = len(rows)
        longest = max(
            len(examples[i].prompt) + len(c)
            for i in rows
            for c in (examples[i].chosen, examples[i].rejected)
        )
        for key in ("input_ids", "attention_mask", "labels"):
            assert batch[key].shape == (size, 2, longest) and batch[key].dtype == torch.long
        for row, position in enumerate(rows):
            example = examples[position]
            for side, completion in enumerate((example.chosen, example.rejected)):
                ids = list(example.prompt + completion)
                pad = longest - len(ids)
                labels = [IGNORE_INDEX] * len(example.prompt) + list(completion)
                labels[0] = IGNORE_INDEX
                assert batch["input_ids"][row, side].tolist() == ids + [0] * pad
                assert batch["attention_mask"][row, side].tolist() == [1] * len(ids) + [0] * pad
                assert batch["labels"][row, side].tolist() == labels + [IGNORE_INDEX] * pad
        assert batches.tokens(0, index) == int((batch["labels"] != IGNORE_INDEX).sum())


def test_kto_batches_and_their_kl_rows():
    rng = random.Random(2)
    examples = [
        KTOExample(
            tuple(rng.randrange(5, 90) for _ in range(rng.randrange(1, 6))),
            tuple(rng.randrange(5, 90) for _ in range(rng.randrange(1, 6))),
            bool(i % 3),
        )
        for i in range(5)
    ]
    batches = PreferenceBatches(examples, batch_size=4, pad_token_id=0, seed=3, max_length=7)
    for index in range(batches.num_batches()):
        batch = batches.batch(1, index)
        rows = batch["index"].tolist()
        assert batch["desirable"].tolist() == [examples[i].desirable for i in rows]
        assert batch["desirable"].dtype == torch.bool
        assert batch["input_ids"].shape[0] == batch["kl_input_ids"].shape[0] == len(rows)
        for row, position in enumerate(rows):
            example = examples[position]
            ids = list(example.prompt + example.completion)
            assert batch["input_ids"][row, : len(ids)].tolist() == ids
            assert batch["labels"][row, len(example.prompt) : len(ids)].tolist() == list(
                example.completion
            )
            # TRL: row i's KL completion is the completion before it in the batch (cyclic).
            other = examples[rows[row - 1]]
            kl = list(example.prompt + other.completion)[:7]
            assert batch["kl_input_ids"][row, : len(kl)].tolist() == kl
            assert batch["kl_attention_mask"][row].sum() == len(kl)
            assert batch["kl_labels"][row, : len(example.prompt)].eq(IGNORE_INDEX).all()
            assert (
                batch["kl_labels"][row, len(example.prompt) : len(kl)].tolist()
                == kl[len(example.prompt) :]
            )
        assert batches.tokens(1, index) == int((batch["labels"] != IGNORE_INDEX).sum())


def test_batches_are_deterministic_and_ordered_as_sft_batches():
    examples = _pairs(10)
    one = PreferenceBatches(examples, batch_size=3, pad_token_id=0, seed=5)
    two = PreferenceBatches(examples, batch_size=3, pad_token_id=0, seed=5)
    orders = []
    for epoch in range(3):
        order = [i for index in range(one.num_batches()) for i in one.indices(epoch, index)]
        assert sorted(order) == list(range(10))
        orders.append(order)
        for index in reversed(range(one.num_batches())):  # any access order
            for key, value in one.batch(epoch, index).items():
                assert torch.equal(value, two.batch(epoch, index)[key])
    assert orders[0] != orders[1] != orders[2]
    # The same seed orders SFT batches of as many examples alike (one shared order).
    sft = Batches(
        [Example([1, 2], [1, 2])] * 10,
        batch_size=3,
        max_seq_length=4,
        packing=False,
        pad_token_id=0,
        seed=5,
    )
    assert [row[0] for row in sft.rows(1, 0)] == one.indices(1, 0)
    fixed = PreferenceBatches(
        examples, batch_size=4, pad_token_id=0, seed=5, shuffle=False, drop_last=True
    )
    assert fixed.num_batches() == 2
    assert fixed.indices(7, 1) == [4, 5, 6, 7]
    with pytest.raises(IndexError):
        fixed.batch(0, 2)


def test_batches_refuse_bad_input():
    with pytest.raises(DataError, match="no examples"):
        PreferenceBatches([], batch_size=2, pad_token_id=0, seed=0)
    with pytest.raises(DataError, match="all PairExample or all KTOExample"):
        PreferenceBatches(
            [*_pairs(1), KTOExample((1,), (2,), True)], batch_size=2, pad_token_id=0, seed=0
        )
    with pytest.raises(DataError, match="make no full batch"):
        PreferenceBatches(_pairs(2), batch_size=3, pad_token_id=0, seed=0, drop_last=True)


# --- the bundled sets ------------------------------------------------------------------


def test_bundled_sets_are_current_and_tokenise(tokenizer):
    script = Path(__file__).parents[2] / "scripts" / "make_preference_data.py"
    spec = importlib.util.spec_from_file_location("make_preference_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0
    for kind in ("pairs", "kto"):
        records = load_records(preference_dataset(kind))
        assert len(records) > 200
        examples, stats = tokenize_preferences(records, tokenizer, kind=kind, max_length=128)
        assert stats.kept == len(records) and stats.truncated == 0
        if kind == "pairs":
            completions = [c for ex in examples for c in (ex.chosen, ex.rejected)]
        else:
            completions = [ex.completion for ex in examples]
        # Short answers and their end of turn (a few city names take more pieces).
        lengths = sorted(map(len, completions))
        assert lengths[len(lengths) // 2] <= 5 and lengths[-1] <= 12
        prompts = {type(row.get("prompt")).__name__ for row in records}
        assert prompts == ({"str", "list", "NoneType"} if kind == "pairs" else {"str", "list"})

"""GRPO's reward functions: loading by ``module:function``, scoring as TRL does, built-ins."""

from __future__ import annotations

import math
import os
import sys
import uuid

import numpy
import pytest
import torch

from sloth_core.train.config import ConfigError
from sloth_core.train.rewards import (
    RewardError,
    RewardFunction,
    completion_text,
    exact_match,
    format_regex,
    format_regex_reward,
    length_penalty,
    length_penalty_reward,
    load_reward,
    score,
)

REWARDS_PY = """
LIMIT = 3

def short(completions, **kwargs):
    return [1.0 if len(c) <= LIMIT else 0.0 for c in completions]

class Judge:
    @staticmethod
    def strict(completions, answer, **kwargs):
        return [float(c == a) for c, a in zip(completions, answer)]
"""


@pytest.fixture
def rewards_dir(tmp_path):
    # A module name of its own per test: sys.modules keeps what one test imported.
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(REWARDS_PY, encoding="utf-8")
    yield tmp_path, name
    sys.modules.pop(name, None)


# --- loading ------------------------------------------------------------------------------


def test_load_by_module_and_by_file(rewards_dir, monkeypatch):
    folder, name = rewards_dir
    monkeypatch.syspath_prepend(str(folder))
    by_module = load_reward(f"{name}:short", weight=0.5)
    assert (by_module.name, by_module.weight) == ("short", 0.5)
    assert by_module.fn(completions=["abc", "abcd"]) == [1.0, 0.0]
    by_file = load_reward(f"{folder / name}.py:Judge.strict")
    assert (by_file.name, by_file.weight) == ("strict", 1.0)
    assert by_file.fn(completions=["a", "b"], answer=["a", "c"]) == [1.0, 0.0]
    # Two rewards from one file share one run of it.
    assert load_reward(f"{folder / name}.py:short").fn.__module__ == by_file.fn.__module__
    builtin = load_reward("sloth_core.train.rewards:exact_match")
    assert builtin == RewardFunction("exact_match", exact_match, 1.0)


def test_a_module_in_the_current_directory_is_found(rewards_dir, monkeypatch):
    folder, name = rewards_dir
    monkeypatch.chdir(folder)
    # As under the `sloth` console script: the current directory is not on sys.path.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder))])
    assert load_reward(f"{name}:short").fn(completions=["ab"]) == [1.0]
    assert str(folder) in sys.path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("short", "'short' is not module:function"),
        ("{name}:", "is not module:function"),
        ("{name}:two words", "is not module:function"),
        ("no_such_rewards_module:f", "no module named 'no_such_rewards_module'"),
        ("{name}:shrot", "{name} has no attribute 'shrot'; did you mean short"),
        ("{name}:Judge.lax", "Judge has no attribute 'lax'"),
        ("{name}:LIMIT", "LIMIT is not callable: it is 3 \\(int\\)"),
        ("{folder}/missing.py:short", "no file .*missing.py"),
        ("{folder}/{name}.py:nothing", "has no attribute 'nothing'"),
    ],
)
def test_load_errors_name_the_spec(rewards_dir, monkeypatch, spec, message):
    folder, name = rewards_dir
    monkeypatch.syspath_prepend(str(folder))
    spec = spec.format(name=name, folder=folder)
    with pytest.raises(ConfigError, match=message.format(name=name)) as caught:
        load_reward(spec)
    assert repr(spec) in str(caught.value)


def test_a_module_that_fails_to_import_is_reported_with_its_error(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("import not_installed_pkg\n", encoding="utf-8")
    (tmp_path / "raising_rewards.py").write_text("1 / 0\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing broken_rewards failed.*not_installed_pkg"):
        load_reward("broken_rewards:f")
    with pytest.raises(ConfigError, match="running .*raising_rewards.py failed") as caught:
        load_reward(f"{tmp_path}/raising_rewards.py:f")
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    assert not [key for key in sys.modules if "raising_rewards" in key]


# --- scoring ------------------------------------------------------------------------------

PROMPTS = ["What is 2 plus 3?", "What is 2 plus 3?", "Name a colour."]


def _const(name, values, weight=1.0):
    return RewardFunction(name, lambda **kwargs: list(values), weight)


def test_score_weights_and_skips_none_as_trl_does():
    calls = []

    def spy(prompts, completions, answer, completion_ids, **kwargs):
        calls.append((prompts, completions, answer, completion_ids, kwargs))
        return [1, None, torch.tensor(0.5)]

    functions = [
        RewardFunction("spy", spy, 2.0),
        _const("second", [0.25, None, None], -1.0),
    ]
    completions = [" 5", " 6", " red"]
    per, total = score(
        functions,
        PROMPTS,
        completions,
        {"answer": ["5", "5", None], "task": ["n", "n", "w"]},
        completion_ids=[[1], [2], [3]],
    )
    assert calls == [
        (PROMPTS, completions, ["5", "5", None], [[1], [2], [3]], {"task": ["n", "n", "w"]})
    ]
    assert per.dtype == total.dtype == torch.float32 and per.shape == (3, 2)
    assert per[0].tolist() == [1.0, 0.25] and per[2, 0] == 0.5
    assert per[1].isnan().all() and per[2, 1].isnan()
    # TRL's nansum of the weighted rewards; a completion no function judged stays NaN.
    assert total[0] == 2.0 - 0.25 and total[2] == 1.0 and math.isnan(total[1])


def test_async_functions_arrays_and_extra_keywords():
    async def judge(completions, trainer_state, **kwargs):
        return [trainer_state["step"]] * len(completions)

    def arrays(completions, **kwargs):
        return numpy.array([0.5, 1.5, 2.5])

    functions = [RewardFunction.of(judge), RewardFunction.of(arrays, weight=2.0)]
    per, total = score(
        functions, PROMPTS, ["a", "b", "c"], {}, extra={"trainer_state": {"step": 3}}
    )
    assert per.tolist() == [[3.0, 0.5], [3.0, 1.5], [3.0, 2.5]] and total.tolist() == [
        4.0,
        6.0,
        8.0,
    ]


def test_conversational_completions_reach_the_functions_as_messages():
    prompts = [[{"role": "user", "content": "2 plus 3?"}]] * 2
    completions = [
        [{"role": "assistant", "content": "5"}],
        [{"role": "assistant", "content": "6."}],
    ]
    per, total = score(
        [RewardFunction.of(exact_match)], prompts, completions, {"answer": ["5", "6"]}
    )
    assert per[:, 0].tolist() == [1.0, 1.0] and total.tolist() == [1.0, 1.0]


def _raise(**kwargs):
    raise KeyError("answer")


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (
            "raise",
            r"'bad' raised KeyError: 'answer' \(scoring 3 completions; the first one's "
            r"prompt: 'What is 2 plus 3\?'\)",
        ),
        (
            [1.0, 2.0],
            "'bad' returned 2 rewards for 3 completions.*completion 2's prompt: 'Name a colour.'",
        ),
        ([1.0, 2.0, 3.0, 4.0], "returned 4 rewards for 3 completions"),
        ([1.0, math.nan, 0.0], "'bad' returned nan for completion 1 of the prompt: 'What is 2"),
        ([1.0, 0.0, -math.inf], "returned -inf for completion 2 of the prompt: 'Name a colour.'"),
        (
            [1.0, "0.5", 0.0],
            r"'bad' returned '0.5' \(a str\), not a number or None, for "
            "completion 1",
        ),
        (0.5, "'bad' returned a float, not a list of 3 rewards"),
        ("text", "'bad' returned a str, not a list of 3 rewards"),
        (None, "'bad' returned a NoneType, not a list of 3 rewards"),
        (torch.ones(3, 1), "'bad' returned a Tensor, not a list of 3 rewards"),
    ],
)
def test_a_bad_reward_names_function_and_prompt(output, message):
    fn = _raise if output == "raise" else (lambda **kwargs: output)
    functions = [_const("fine", [1.0, 1.0, 1.0]), RewardFunction("bad", fn)]
    with pytest.raises(RewardError, match=message) as caught:
        score(functions, PROMPTS, ["a", "b", "c"], {})
    if output == "raise":
        assert isinstance(caught.value.__cause__, KeyError)


def test_a_long_prompt_is_shortened_in_errors():
    prompt = [{"role": "user", "content": "word " * 100}]
    with pytest.raises(RewardError, match=r"prompt: 'word word .{60,80}\.\.\.';") as caught:
        score([_const("bad", [math.nan])], [prompt], ["x"], {})
    assert len(str(caught.value)) < 200


def test_score_checks_its_arguments():
    with pytest.raises(ValueError, match="completions has 2 items for 3 prompts"):
        score([_const("f", [1.0] * 3)], PROMPTS, ["a", "b"], {})
    with pytest.raises(ValueError, match="answer has 1 items for 3 prompts"):
        score([_const("f", [1.0] * 3)], PROMPTS, ["a", "b", "c"], {"answer": ["x"]})
    with pytest.raises(ValueError, match="may not be named completions"):
        score([_const("f", [1.0] * 3)], PROMPTS, ["a", "b", "c"], {"completions": [1, 2, 3]})
    with pytest.raises(ValueError, match="may not be named answer, prompts"):
        extra = {"answer": 1, "prompts": 2}
        score(
            [_const("f", [1.0] * 3)], PROMPTS, ["a", "b", "c"], {"answer": [1, 2, 3]}, extra=extra
        )
    with pytest.raises(ValueError, match="completion_ids has 1 items for 3 prompts"):
        score([_const("f", [1.0] * 3)], PROMPTS, ["a", "b", "c"], {}, completion_ids=[[1]])
    with pytest.raises(ValueError, match="no reward function"):
        score([], PROMPTS, ["a", "b", "c"], {})


# --- built-ins ----------------------------------------------------------------------------


def test_exact_match():
    completions = [" Tokyo.", "tokyo", "11 plus 5 is 16.", "16.0", "It is 61", "16 or 17", "x", "y"]
    answers = ["Tokyo", "Tokyo", "16", 16, "16", "16", None, "-2.5"]
    assert exact_match(completions, answers, task=[None] * 8) == [
        1.0,
        0.0,
        1.0,
        1.0,
        0.0,
        0.0,
        None,
        0.0,
    ]
    assert exact_match(["it is -2.5"], ["-2.5"]) == [1.0]
    assert exact_match([[{"role": "assistant", "content": " sad "}]], ["sad"]) == [1.0]


def test_format_regex():
    good = "<think>2 plus 3\nis 5</think>\n<answer>5</answer>"
    completions = [
        good,
        f"  {good}\n",
        "<answer>5</answer>",
        f"{good} and more",
        "<think></think><answer></answer>",
    ]
    assert format_regex(completions) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert format_regex([[{"role": "assistant", "content": good}]]) == [1.0]
    boxed = format_regex_reward(r"^\\boxed\{\d+\}$", name="boxed")
    assert boxed.__name__ == RewardFunction.of(boxed).name == "boxed"
    assert boxed([r"\boxed{12}", r"\boxed{x}", "12"]) == [1.0, 0.0, 0.0]
    assert load_reward("sloth_core.train.rewards:format_regex").name == "format_regex"


def test_length_penalty():
    assert length_penalty(["", "a" * 50, [{"role": "assistant", "content": "a" * 150}]]) == [
        0.0,
        -0.5,
        -1.5,
    ]
    assert length_penalty_reward(10.0)(["abcde"]) == [-0.5]
    with pytest.raises(ValueError, match="scale must be positive"):
        length_penalty_reward(0)
    assert completion_text([{"role": "assistant", "content": "a"}, {"content": None}]) == "a"


def test_the_current_directory_is_left_alone_when_already_searched(rewards_dir, monkeypatch):
    folder, name = rewards_dir
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [os.getcwd(), *[p for p in sys.path if p != ""]])
    before = list(sys.path)
    with pytest.raises(ConfigError, match="no module named 'absent_rewards'"):
        load_reward("absent_rewards:f")
    assert sys.path == before

"""Reward functions of GRPO: loading them by name, scoring completions, and built-ins.

A reward function is TRL's (``GRPOTrainer``'s ``reward_funcs``)::

    def correct(prompts, completions, answer, **kwargs) -> list[float | None]:
        return [1.0 if text.strip() == right else 0.0
                for text, right in zip(completions, answer)]

It is called with keywords only: ``prompts`` and ``completions`` (one of each per
completion, a prompt repeated for each of its completions), ``completion_ids`` when the
caller has them, and every column of the prompt data as a list of the same length (see
:mod:`sloth_core.data.prompts`). Completions are strings for string prompts, and lists of
messages (``[{"role": "assistant", "content": text}]``) for conversational ones. It
returns one number per completion, or ``None`` for a completion it does not judge.

``sloth train --reward my_rewards:correct`` names it, as :func:`load_reward` reads it; the
built-ins below are ``sloth_core.train.rewards:exact_match``, ``:format_regex`` and
``:length_penalty``.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from sloth_core.data.prompts import REWARD_KEYWORDS
from sloth_core.errors import SlothError

from .config import ConfigError

__all__ = [
    "FORMAT_PATTERN",
    "RewardError",
    "RewardFunction",
    "completion_text",
    "exact_match",
    "format_regex",
    "format_regex_reward",
    "length_penalty",
    "length_penalty_reward",
    "load_reward",
    "score",
]


class RewardError(SlothError):
    """A reward function failed or returned what cannot be a reward; the message names
    the function and the prompt of the first completion concerned."""


@dataclass(frozen=True)
class RewardFunction:
    """A reward function, the name its metrics carry, and its weight in the sum."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0

    @classmethod
    def of(cls, fn: Callable[..., Any], weight: float = 1.0) -> RewardFunction:
        """``fn`` named as TRL names it: its ``__name__`` (a partial's function's)."""
        inner = getattr(fn, "func", fn)
        return cls(getattr(inner, "__name__", type(inner).__name__), fn, weight)


# --- loading ---------------------------------------------------------------------------


def load_reward(spec: str, weight: float = 1.0) -> RewardFunction:
    """The reward function ``spec`` names, as ``module:function``, weighted by ``weight``.

    ``module`` is a dotted module path, imported from ``sys.path``, or from the current
    directory when not found there (the ``sloth`` console script does not search it); or
    the path of a Python file
    (``path/to/rewards.py:correct``, told by its ``.py`` suffix or a path separator).
    ``function`` may be dotted (``module:Class.method``). The function is named after
    its attribute (``correct``).

    Loading runs the module's code, with the rights of the user who runs sloth: the
    option names code the user chose, and nothing else is imported on its behalf. Name
    only files you would run yourself.

    Raises:
        ConfigError: ``spec`` is not ``module:function``; the module or file does not
            exist or fails to import (the original error chained); it has no such
            attribute (close names suggested); the attribute is not callable.
    """
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not all(part.isidentifier() for part in attribute.split(".")):
        raise ConfigError(
            f"reward {spec!r} is not module:function (for example my_rewards:correct or "
            "path/to/rewards.py:correct)"
        )
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        module = _import_file(spec, Path(module_name).expanduser())
    else:
        module = _import_module(spec, module_name)
    value: Any = module
    for depth, part in enumerate(attribute.split(".")):
        if not hasattr(value, part):
            where = module_name if depth == 0 else ".".join(attribute.split(".")[:depth])
            raise ConfigError(
                f"reward {spec!r}: {where} has no attribute {part!r}{_hint(value, part)}"
            )
        value = getattr(value, part)
    if not callable(value):
        raise ConfigError(
            f"reward {spec!r}: {attribute} is not callable: it is {_shorten(value)} "
            f"({type(value).__name__})"
        )
    return RewardFunction(attribute.rsplit(".", 1)[-1], value, weight)


def _import_module(spec: str, name: str) -> ModuleType:
    module = _try_import(spec, name)
    here = os.getcwd()
    if module is None and here not in sys.path and "" not in sys.path:
        # A console script's sys.path lacks the current directory, where users keep their
        # rewards file: look there too, and keep it on the path for the module's imports.
        sys.path.append(here)
        module = _try_import(spec, name)
    if module is None:
        raise ConfigError(f"reward {spec!r}: no module named {name!r} on sys.path or in {here}")
    return module


def _try_import(spec: str, name: str) -> ModuleType | None:
    """The module, or ``None`` if it does not exist (not if an import within it fails)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            return None
        raise ConfigError(f"reward {spec!r}: importing {name} failed: {exc!r}") from exc
    except Exception as exc:  # the module's own code failed: say so, keep its traceback
        raise ConfigError(f"reward {spec!r}: importing {name} failed: {exc!r}") from exc


def _import_file(spec: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"reward {spec!r}: no file {path}")
    resolved = path.resolve()
    # One module per file (two rewards from one file share it), under a name no import
    # statement would use.
    name = f"_sloth_reward_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"reward {spec!r}: {path} is not a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"reward {spec!r}: running {path} failed: {exc!r}") from exc
    return module


def _hint(value: Any, name: str) -> str:
    names = [key for key in dir(value) if not key.startswith("_") and callable(getattr(value, key))]
    close = difflib.get_close_matches(name, names, n=3)
    if close:
        return f"; did you mean {', '.join(close)}?"
    return f"; its functions: {', '.join(names[:12])}" if names else ""


# --- scoring ---------------------------------------------------------------------------


def score(
    functions: Sequence[RewardFunction],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
    *,
    completion_ids: Sequence[Sequence[int]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score ``completions`` with every function, as trl 1.16.0's GRPOTrainer does.

    Each function is called as ``fn(prompts=..., completions=..., **columns)`` (with
    ``completion_ids=...`` when given), all lists of ``N = len(prompts)`` items, and the
    ``extra`` keywords as they are (TRL passes ``trainer_state``, ``log_extra`` and
    ``log_metric`` so), as ``GRPOTrainer._calculate_rewards`` calls it; an ``async``
    function is awaited. It returns a list (or a 1-D tensor or array) of ``N`` numbers or
    ``None``; ``None`` becomes NaN: the function skips that completion. The total is the
    weighted sum over the functions that judged the completion (``nansum``); a completion
    that no function judged has a NaN total, as trl 1.16.0 marks it unscorable (its
    advantage is then 0; trl 0.28.0 summed it to 0).

    Returns:
        ``(per_function [N, F], total [N])``, float32 on the CPU.

    Raises:
        RewardError: a function raised (chained), returned something not a list of ``N``
            rewards, a reward that is not a number, or one that is NaN or infinite. The
            message names the function and the prompt concerned.
        ValueError: no function; ``completions``, ``completion_ids`` or a column is not
            ``N`` long; a column or an extra keyword takes a reserved keyword's name.
    """
    if not functions:
        raise ValueError("no reward function to score with")
    count = len(prompts)
    lists = {"completions": completions, **columns}
    if completion_ids is not None:
        lists["completion_ids"] = completion_ids
    for what, values in lists.items():
        if len(values) != count:
            raise ValueError(f"{what} has {len(values)} items for {count} prompts")
    extra = dict(extra or {})
    names = set(columns) | set(extra)
    clash = sorted(names & set(REWARD_KEYWORDS) | (set(columns) & set(extra)))
    if clash:
        raise ValueError(f"columns and extra keywords may not be named {', '.join(clash)}")
    kwargs = {**columns, **extra, "prompts": list(prompts), "completions": list(completions)}
    if completion_ids is not None:
        kwargs["completion_ids"] = completion_ids
    per_function = torch.full((count, len(functions)), math.nan, dtype=torch.float32)
    for column, function in enumerate(functions):
        rewards = _call(function, kwargs, prompts)
        per_function[:, column] = torch.tensor(rewards, dtype=torch.float32)
    weights = torch.tensor([function.weight for function in functions], dtype=torch.float32)
    total = (per_function * weights).nansum(dim=1)
    total[per_function.isnan().all(dim=1)] = math.nan
    return per_function, total


def _call(function: RewardFunction, kwargs: dict[str, Any], prompts: Sequence[Any]) -> list[float]:
    count = len(prompts)
    first = _shorten(prompts[0]) if count else "none"
    try:
        output = function.fn(**kwargs)
        if inspect.isawaitable(output):
            output = asyncio.run(_awaited(output))
    except Exception as exc:
        raise RewardError(
            f"reward function {function.name!r} raised {type(exc).__name__}: {exc} "
            f"(scoring {count} completions; the first one's prompt: {first})"
        ) from exc
    if isinstance(output, torch.Tensor) and output.dim() == 1:
        output = output.tolist()
    listed = hasattr(output, "__len__") and hasattr(output, "__iter__")
    if isinstance(output, (str, bytes, Mapping, torch.Tensor)) or not listed:
        raise RewardError(
            f"reward function {function.name!r} returned a {type(output).__name__}, not a "
            f"list of {count} rewards (scoring completions of the prompt: {first})"
        )
    if len(output) != count:
        at = min(len(output), count - 1)
        raise RewardError(
            f"reward function {function.name!r} returned {len(output)} rewards for {count} "
            f"completions, one per completion expected (completion {at}'s prompt: "
            f"{_shorten(prompts[at])})"
        )
    rewards = []
    for index, value in enumerate(output):
        if value is None:
            rewards.append(math.nan)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        where = f"for completion {index} of the prompt: {_shorten(prompts[index])}"
        if not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward function {function.name!r} returned {_shorten(value)} (a "
                f"{type(value).__name__}), not a number or None, {where}"
            )
        if not math.isfinite(value):
            raise RewardError(
                f"reward function {function.name!r} returned {value} {where}; return None "
                "to leave a completion unjudged"
            )
        rewards.append(float(value))
    return rewards


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _shorten(value: Any, limit: int = 80) -> str:
    # A conversational prompt is shown by its last message, the one being answered.
    if isinstance(value, list) and value and isinstance(value[-1], Mapping):
        value = value[-1].get("content", value[-1])
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# --- built-in rewards ------------------------------------------------------------------


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """A completion's text: the string, or its messages' contents joined."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match(
    completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 where the completion gives the ``answer`` column's value, else 0.0.

    The completion's text and the answer are compared with surrounding whitespace and
    one final full stop dropped (``" Tokyo."`` gives ``"Tokyo"``). An answer that is a
    number (``"16"``, ``16``, ``"-2.5"``) is also given by a completion whose last number
    equals it (``"11 plus 5 is 16."``). A missing answer (``None``) leaves the completion
    unjudged (``None``).
    """
    return [
        _matches(completion_text(text), right)
        for text, right in zip(completions, answer, strict=True)
    ]


def _matches(text: str, answer: Any) -> float | None:
    if answer is None:
        return None
    right = _bare(str(answer))
    if _bare(text) == right:
        return 1.0
    if _NUMBER.fullmatch(right):
        numbers_in_text = _NUMBER.findall(text)
        return float(bool(numbers_in_text) and float(numbers_in_text[-1]) == float(right))
    return 0.0


def _bare(text: str) -> str:
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


#: :func:`format_regex`'s pattern (``re.DOTALL``): the reasoning in ``<think>`` tags, then
#: the answer in ``<answer>`` tags, and nothing else.
FORMAT_PATTERN = r"^<think>.*?</think>\s*<answer>.*?</answer>$"


def format_regex_reward(
    pattern: str, *, flags: int = re.DOTALL, name: str = "format_regex"
) -> Callable[..., list[float]]:
    """A reward function: 1.0 where the completion's text, surrounding whitespace
    stripped, matches ``pattern`` from its start (``re.match``; anchor the end with
    ``$``), else 0.0. ``name`` is the function's ``__name__`` (its metrics' name)."""
    compiled = re.compile(pattern, flags)

    def reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [float(bool(compiled.match(completion_text(c).strip()))) for c in completions]

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"1.0 where the completion matches {pattern!r}, else 0.0."
    return reward


#: 1.0 where the completion is ``<think>...</think> <answer>...</answer>``
#: (:data:`FORMAT_PATTERN`), else 0.0.
format_regex = format_regex_reward(FORMAT_PATTERN)


def length_penalty_reward(
    scale: float = 100.0, *, name: str = "length_penalty"
) -> Callable[..., list[float]]:
    """A reward function: minus the completion's length in characters over ``scale``
    (``scale=100``: a 50-character completion scores -0.5), which favours short answers
    in proportion; weigh it against the other rewards with its weight. (TRL's soft
    overlong punishment, which spares completions short of a limit, needs that limit
    and token counts; this one needs neither.)"""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")

    def reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [-len(completion_text(c)) / scale for c in completions]

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"Minus the completion's length in characters over {scale}."
    return reward


#: Minus the completion's length in characters over 100.
length_penalty = length_penalty_reward()

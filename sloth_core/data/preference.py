"""Preference rows -> token ids: pairs for DPO, ORPO and SimPO, labelled completions for KTO.

::

    records = load_records("pairs.jsonl")
    examples, stats = tokenize_preferences(records, tokenizer, kind="pairs", max_length=1024)
    batches = PreferenceBatches(examples, batch_size=8, pad_token_id=tokenizer.pad_token_id,
                                seed=0)

The row layouts are TRL's (``trl.data_utils``), each row read on its own:

- pairs, standard: ``{"prompt": str, "chosen": str, "rejected": str}``; the completions are
  appended to the prompt as they are (lead them with a space where one belongs) and get
  the tokenizer's eos, and the prompt the special tokens the tokenizer puts before plain
  text (a bos), as TRL's DPOTrainer does;
- pairs, conversational: ``prompt`` a list of messages, ``chosen`` and ``rejected`` lists
  of (assistant) messages; the prompt is rendered with the chat template and its
  generation prompt, and each completion is what rendering the whole conversation adds
  to it, up to the template's end-of-turn marker: the tokens SFT trains on, so that
  ``prompt + chosen`` is token for token the SFT tokenisation of that conversation;
- pairs, implicit prompt: no ``prompt`` (or a string one beside message lists, as TRL's
  ``maybe_extract_prompt`` ignores it), ``chosen`` and ``rejected`` whole conversations
  (or strings): the prompt is their longest shared prefix of messages (characters);
- KTO: ``{"prompt", "completion", "label"}``, strings or message lists as above, the
  label a bool (``true``/``false``/``1``/``0`` from CSV files).

Bad rows raise a :class:`~sloth_core.data.errors.DataError` naming the row (1-based) and
the field: a missing field, a value of the wrong type, chosen identical to rejected, an
empty completion, an unknown label, a role the template does not know, a conversation it
cannot render. Rows that truncation leaves without a completion token are counted and
dropped, as TRL drops them (see :func:`truncate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError
from .formats import _turn
from .masking import Markers
from .templates import resolve_chat_template
from .tokenizing import _added_ends, _ChatEncoder

__all__ = [
    "PREFERENCE_KINDS",
    "TRUNCATION_MODES",
    "KTOExample",
    "PairExample",
    "PreferenceStats",
    "tokenize_preferences",
    "truncate",
]

#: ``kind`` values: preference pairs (DPO, ORPO, SimPO) or labelled completions (KTO).
PREFERENCE_KINDS = ("pairs", "kto")
#: Which end of an over-long sequence :func:`truncate` keeps.
TRUNCATION_MODES = ("keep_end", "keep_start")

_LABELS = {"true": True, "1": True, "false": False, "0": False}


@dataclass(frozen=True)
class PairExample:
    """A preference pair as token ids: the completions do not hold the prompt."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


@dataclass(frozen=True)
class KTOExample:
    """A completion labelled desirable or not, as token ids (without the prompt)."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    desirable: bool


@dataclass
class PreferenceStats:
    """What :func:`tokenize_preferences` did with the rows.

    ``rows`` went in, ``kept`` examples came out; ``truncated`` of them lost tokens, and
    ``dropped`` counts the rows left out by reason. ``desirable`` counts the desirable
    KTO examples. ``split_apart`` examples had a token across the prompt's end (a merge
    of its last characters with the completion's first), so their completions were
    tokenised apart. ``tokens`` counts the kept examples' tokens (prompt and every
    completion) and ``longest`` is the longest prompt + completion sequence.
    """

    kind: str
    max_length: int
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    desirable: int = 0
    split_apart: int = 0
    tokens: int = 0
    longest: int = 0

    def summary(self) -> str:
        """One line for logs, such as ``240 pairs; 3 truncated to 64 tokens; 2 dropped:
        2 with the prompt alone filling max_length=64``."""
        if self.kind == "pairs":
            line = f"{self.kept} pairs"
        else:
            undesirable = self.kept - self.desirable
            line = f"{self.kept} examples ({self.desirable} desirable, {undesirable} undesirable)"
        line += f"; {self.truncated} truncated to {self.max_length} tokens"
        total = sum(self.dropped.values())
        line += f"; {total} dropped"
        if total:
            line += ": " + ", ".join(f"{count} {why}" for why, count in self.dropped.items())
        if self.split_apart:
            line += f"; {self.split_apart} with their completions tokenised apart from the prompt"
        return line + f"; {self.tokens} tokens, longest {self.longest}"


def tokenize_preferences(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    kind: str,
    max_length: int,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
    chat_template: str | None = None,
) -> tuple[list[PairExample] | list[KTOExample], PreferenceStats]:
    """Tokenise preference ``records`` (see the module for the layouts), in order.

    Args:
        records: rows, as :func:`~sloth_core.data.records.load_records` returns them.
        tokenizer: a Hugging Face tokenizer.
        kind: ``"pairs"`` (``prompt``, ``chosen``, ``rejected``) or ``"kto"`` (``prompt``,
            ``completion``, ``label``).
        max_length, max_prompt_length, max_completion_length, truncation_mode: see
            :func:`truncate`.
        chat_template: for conversational rows, a template name, ``"auto"``/``None`` or a
            Jinja template (see :func:`~sloth_core.data.templates.resolve_chat_template`).

    Returns:
        The examples (:class:`PairExample` or :class:`KTOExample`) and the statistics.

    Raises:
        DataError: a bad setting, a bad row (``row N: ...``, naming the field), or no
            example left.
    """
    if kind not in PREFERENCE_KINDS:
        raise DataError(f"unknown kind {kind!r}; accepted: {', '.join(PREFERENCE_KINDS)}")
    _check_limits(max_length, max_prompt_length, max_completion_length, truncation_mode)
    stats = PreferenceStats(kind=kind, max_length=max_length, rows=len(records))
    encoder = _Encoder(tokenizer, chat_template, stats)
    examples: list[Any] = []
    for row, record in enumerate(records, 1):
        if not isinstance(record, Mapping):
            raise DataError(f"row {row}: expected an object, got {type(record).__name__}")
        if kind == "pairs":
            prompt, completions = _pair(record, row)
        else:
            prompt, completion, desirable = _kto(record, row)
            completions = [completion]
        fields = ("chosen", "rejected") if kind == "pairs" else ("completion",)
        prompt_ids, completion_ids = encoder(prompt, completions, row, fields)
        cut = truncate(
            prompt_ids,
            completion_ids,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            max_completion_length=max_completion_length,
            truncation_mode=truncation_mode,
        )
        if cut is None:
            why = f"with the prompt alone filling max_length={max_length}"
            stats.dropped[why] = stats.dropped.get(why, 0) + 1
            continue
        kept_prompt, kept = cut
        stats.truncated += kept_prompt != prompt_ids or kept != completion_ids
        stats.tokens += len(kept_prompt) + sum(map(len, kept))
        stats.longest = max(stats.longest, len(kept_prompt) + max(map(len, kept)))
        if kind == "pairs":
            examples.append(PairExample(tuple(kept_prompt), tuple(kept[0]), tuple(kept[1])))
        else:
            examples.append(KTOExample(tuple(kept_prompt), tuple(kept[0]), desirable))
            stats.desirable += desirable
    stats.kept = len(examples)
    if not examples:
        raise DataError(f"no example left of {stats.rows} rows: {stats.summary()}")
    return examples, stats


def truncate(
    prompt: Sequence[int],
    completions: Sequence[Sequence[int]],
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> tuple[list[int], list[list[int]]] | None:
    """Cut a prompt and its completions (chosen and rejected, or KTO's one) to the limits.

    TRL's rules, in this order. ``max_prompt_length`` and ``max_completion_length`` are
    trl 0.28.0's (``DPOTrainer.tokenize_row``; 0.29 removed them), ``max_length`` and
    ``truncation_mode`` trl 1.9.0's (``DataCollatorForPreference``, the KTO collator and
    the dataset filters of both trainers):

    1. a prompt longer than ``max_prompt_length`` keeps its last tokens (with
       ``keep_end``, as trl 0.28.0 always did; with ``keep_start`` its first, as the
       ``truncation_mode`` of TRL's older DPO and KTO trainers chose, trl <= 0.23 for KTO);
    2. a completion longer than ``max_completion_length`` keeps its first tokens;
    3. a prompt + completion sequence longer than ``max_length`` keeps its last
       ``max_length`` tokens (``keep_end``: the prompt loses its start; a completion
       longer than ``max_length`` alone keeps its end, with no prompt left) or its first
       (``keep_start``: the completion loses its end). With ``keep_start``, a prompt that
       alone fills ``max_length`` leaves no completion token: ``None``, the row is dropped
       (as trl 1.9.0 drops it).

    TRL cuts the chosen and rejected sequences of a pair apart; here the longer one sets
    the cut, so that the pair keeps one prompt (as TRL's DPOTrainer did up to 0.11): with
    ``keep_end`` the shorter sequence loses as much prompt as the longer one (in trl 1.9.0
    it keeps up to the difference in length more). ``keep_start`` cuts alike either way.
    """
    keep_end = truncation_mode == "keep_end"
    prompt = list(prompt)
    kept = [list(completion) for completion in completions]
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        if keep_end:
            prompt = prompt[len(prompt) - max_prompt_length :]
        else:
            prompt = prompt[:max_prompt_length]
    if max_completion_length is not None:
        kept = [completion[:max_completion_length] for completion in kept]
    over = len(prompt) + max(map(len, kept)) - max_length
    if over <= 0:
        return prompt, kept
    if not keep_end:
        if len(prompt) >= max_length:
            return None
        return prompt, [completion[: max_length - len(prompt)] for completion in kept]
    if over <= len(prompt):
        return prompt[over:], kept
    return [], [completion[-max_length:] for completion in kept]


def _check_limits(
    max_length: int,
    max_prompt_length: int | None,
    max_completion_length: int | None,
    truncation_mode: str,
) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(
            f"unknown truncation_mode {truncation_mode!r}; accepted: {', '.join(TRUNCATION_MODES)}"
        )
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 0:
        raise DataError(f"max_prompt_length must not be negative, got {max_prompt_length}")
    if max_completion_length is not None and max_completion_length < 1:
        raise DataError(f"max_completion_length must be at least 1, got {max_completion_length}")


# A prompt or completion as a row gives it: plain text, or chat messages.
Part = str | list[dict[str, str]]


def _pair(record: Mapping[str, Any], row: int) -> tuple[Part, list[Part]]:
    chosen = _part(record, "chosen", row)
    rejected = _part(record, "rejected", row)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(
            f"row {row}: 'chosen' and 'rejected' must both be strings or both message lists"
        )
    given = record.get("prompt")
    # TRL's maybe_extract_prompt: a string prompt beside message lists is a label of the
    # row, and the prompt is the conversations' shared start.
    if given is None or (isinstance(given, str) and not isinstance(chosen, str)):
        prompt, chosen, rejected = _shared_prefix(chosen, rejected, row)
    else:
        prompt = _part(record, "prompt", row, completion=False)
        if isinstance(prompt, str) != isinstance(chosen, str):
            raise DataError(
                f"row {row}: 'prompt' and 'chosen' must both be strings or both message lists"
            )
    if chosen == rejected:
        raise DataError(f"row {row}: 'chosen' and 'rejected' are identical")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        _check_not_empty(value, name, row)
    return prompt, [chosen, rejected]


def _kto(record: Mapping[str, Any], row: int) -> tuple[Part, Part, bool]:
    prompt = _part(record, "prompt", row, completion=False)
    completion = _part(record, "completion", row)
    if isinstance(prompt, str) != isinstance(completion, str):
        raise DataError(
            f"row {row}: 'prompt' and 'completion' must both be strings or both message lists"
        )
    _check_not_empty(completion, "completion", row)
    label = record.get("label")
    if isinstance(label, bool):
        return prompt, completion, label
    if isinstance(label, (int, str)) and str(label).strip().lower() in _LABELS:
        return prompt, completion, _LABELS[str(label).strip().lower()]
    if label is None:
        raise DataError(f"row {row}: missing field 'label'")
    raise DataError(
        f"row {row}: field 'label' must be true or false (desirable or not), got {label!r}"
    )


def _part(record: Mapping[str, Any], name: str, row: int, *, completion: bool = True) -> Part:
    value = record.get(name)
    if value is None:
        raise DataError(f"row {row}: missing field {name!r}")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and (value or not completion):
        return [_turn(turn, row, name, number) for number, turn in enumerate(value)]
    raise DataError(
        f"row {row}: field {name!r} must be a string or a list of messages, got "
        f"{'an empty list' if isinstance(value, (list, tuple)) else type(value).__name__}"
    )


def _check_not_empty(value: Part, name: str, row: int) -> None:
    texts = [value] if isinstance(value, str) else [m["content"] for m in value]
    if not any(text.strip() for text in texts):
        raise DataError(f"row {row}: field {name!r} is an empty completion")


def _shared_prefix(chosen: Part, rejected: Part, row: int) -> tuple[Part, Part, Part]:
    # TRL's extract_prompt: the longest common prefix of turns (of characters for strings,
    # less a space that ends it, which goes with the completions).
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if isinstance(chosen, str) and shared and chosen[shared - 1] == " ":
        shared -= 1
    if not shared and not isinstance(chosen, str):
        raise DataError(
            f"row {row}: no field 'prompt', and 'chosen' and 'rejected' share no first turn "
            "to take as the prompt"
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


class _Encoder:
    """Token ids of a prompt and its completions: text as TRL tokenises it, messages
    through the chat template as SFT renders them."""

    def __init__(self, tokenizer: Any, chat_template: str | None, stats: PreferenceStats) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.stats = stats
        self.eos = tokenizer.eos_token_id
        ends = _added_ends(tokenizer)
        self.prefix = ends[0] if ends else []
        self.markers = Markers.of(tokenizer)
        self._chat: _ChatEncoder | None = None

    def __call__(
        self, prompt: Part, completions: list[Part], row: int, fields: tuple[str, ...]
    ) -> tuple[list[int], list[list[int]]]:
        if isinstance(prompt, str):
            prompt_ids = self._text(prompt)
            eos = [] if self.eos is None else [self.eos]
            return prompt_ids, [
                self._completion(prompt, prompt_ids, prompt + text, text, eos)
                for text in completions
                if isinstance(text, str)
            ]
        chat = self._chat_encoder()
        chat.check_roles(prompt, row, "prompt")
        prompt_text = self._render(prompt, True, row)
        prompt_ids = self._encode(prompt_text)
        completion_ids = []
        for name, messages in zip(fields, completions, strict=True):
            assert not isinstance(messages, str)
            chat.check_roles(messages, row, name)
            whole = self._render(prompt + messages, False, row)
            if not whole.startswith(prompt_text):
                raise DataError(
                    f"row {row}: the chat template renders 'prompt' differently with "
                    f"{name!r} after it; the completion cannot be told from the prompt"
                )
            text = self.markers.response(whole[len(prompt_text) :])
            completion_ids.append(
                self._completion(prompt_text, prompt_ids, prompt_text + text, text, [])
            )
        return prompt_ids, completion_ids

    def _completion(
        self, prompt: str, prompt_ids: list[int], whole: str, text: str, eos: list[int]
    ) -> list[int]:
        # The completion is what the whole sequence's tokens add to the prompt's, unless a
        # token spans the prompt's end: then TRL's older way, the completion tokenised apart.
        whole_ids = self._text(whole) if eos else self._encode(whole)
        if whole_ids[: len(prompt_ids)] == prompt_ids:
            ids = whole_ids[len(prompt_ids) :]
        else:
            self.stats.split_apart += 1
            ids = self._encode(whole[len(prompt) :])
        if eos and ids[-len(eos) :] != eos:
            ids += eos
        return ids

    def _text(self, text: str) -> list[int]:
        """Plain text with the special tokens the tokenizer adds before it (a bos)."""
        ids = self._encode(text)
        if self.prefix and ids[: len(self.prefix)] != self.prefix:
            ids = self.prefix + ids
        return ids

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _chat_encoder(self) -> _ChatEncoder:
        if self._chat is None:
            template = resolve_chat_template(self.tokenizer, self.chat_template)
            self._chat = _ChatEncoder(self.tokenizer, template, "chat", responses_only=False)
        return self._chat

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool, row: int) -> str:
        try:
            return self._chat_encoder().render(messages, generation_prompt)
        except Exception as exc:  # jinja2 errors and the template's raise_exception
            raise DataError(
                f"row {row}: the chat template cannot render this conversation ({exc})"
            ) from exc

"""Log-probabilities of whole completions under the policy and under the reference model.

A patched causal LM gives each label token's log-probability straight from its last
hidden states through the chunked ``token_log_probs`` op (``sloth_log_probs=True``), so
the ``[tokens, vocab]`` logits never exist; an unpatched one (the generic fallback) gives
logits, from which they are gathered. The reference model of DPO and KTO is the policy
with its adapters disabled (PEFT's ``disable_adapter``: no second copy), or, in full
fine-tuning, a frozen copy made before training.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sloth_core.patches.causal_lm import LOG_PROBS_KWARG, serves_log_probs
from sloth_core.patches.shared_prompt import (
    FIRST,
    SECOND,
    SHARED_PROMPT_KWARG,
    pack_groups,
    pack_pairs,
)

IGNORE_INDEX = -100


@dataclass
class SequenceLogProbs:
    """Per row: the summed log-probability of its label tokens and how many there are,
    and the model's router load-balancing loss (MoE models; ``None`` otherwise)."""

    sums: torch.Tensor  # [R] fp32
    counts: torch.Tensor  # [R]
    aux_loss: torch.Tensor | None = None

    @property
    def means(self) -> torch.Tensor:
        """Length-normalised: the mean log-probability of a row's label tokens."""
        return self.sums / self.counts.clamp(min=1)


@dataclass
class TokenLogProbs:
    """Per row and position ``t``: the log-probability of ``labels[:, t + 1]`` (0 where it is
    ignored), whether it counts, and the router loss (MoE models; ``None`` otherwise)."""

    values: torch.Tensor  # [R, L] fp32
    mask: torch.Tensor  # [R, L] bool
    aux_loss: torch.Tensor | None = None


def token_log_probs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    **model_kwargs: Any,
) -> TokenLogProbs:
    """Each label token's log-probability, one forward for every row (chosen and rejected
    together, or every sampled completion): ``labels`` are unshifted like SFT's, -100 on
    prompt and padding; logits divided by ``temperature`` first (GRPO samples with one).
    ``model_kwargs`` go to the model too (``position_ids``...)."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = targets != IGNORE_INDEX
    options = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   **model_kwargs)  # fmt: skip
    if serves_log_probs(_unwrapped(model)):
        out = model(
            **options, labels=labels, sloth_temperature=temperature, **{LOG_PROBS_KWARG: True}
        )  # fmt: skip
        token = out["log_probs"]
    else:
        out = model(**options)
        logits = out.logits.float() / temperature
        picked = torch.log_softmax(logits, -1).gather(-1, torch.where(keep, targets, 0)[..., None])
        token = picked.squeeze(-1) * keep
    aux = out.get("aux_loss") if hasattr(out, "get") else None
    return TokenLogProbs(token, keep, aux)


def sequence_log_probs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> SequenceLogProbs:
    """The completions' summed log-probabilities (:func:`token_log_probs`, per row)."""
    token = token_log_probs(model, input_ids, attention_mask, labels, temperature=temperature)
    return SequenceLogProbs(token.values.sum(-1), token.mask.sum(-1), token.aux_loss)


def pair_log_probs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> SequenceLogProbs:
    """Preference pairs' ``[B, 2, L]`` rows (chosen, rejected) scored in one row a pair, the
    prompt computed once (:mod:`sloth_core.patches.shared_prompt`): the summed log-probs
    of the ``2B`` rows, chosen and rejected of each pair in turn, as
    :func:`sequence_log_probs` gives them for the rows one by one. Needs a model on
    sloth's attention (:func:`shares_prompt`)."""
    ids, mask, packed_labels, rows = pack_pairs(input_ids, attention_mask, labels)
    shared: dict[str, Any] = {SHARED_PROMPT_KWARG: rows, "position_ids": rows.positions}
    token = token_log_probs(model, ids, mask, packed_labels, **shared)
    target = rows.target_branch()
    sums = [(token.values * (target == side)).sum(-1) for side in (FIRST, SECOND)]
    counts = [(token.mask & (target == side)).sum(-1) for side in (FIRST, SECOND)]
    return SequenceLogProbs(torch.stack(sums, 1).flatten(), torch.stack(counts, 1).flatten(),
                            token.aux_loss)  # fmt: skip


def grouped_token_log_probs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
    size: int, prompt_width: int, temperature: float = 1.0,
) -> TokenLogProbs:  # fmt: skip
    """:func:`token_log_probs` of GRPO's ``[N, P + C]`` rows (left-padded prompts of width
    ``prompt_width``, right-padded completions; every ``size`` consecutive rows
    completions of one prompt) computed one row a group, the prompt once
    (:func:`~sloth_core.patches.shared_prompt.pack_groups`): the values and mask in the
    rows' own layout, as :func:`token_log_probs` gives them for the rows one by one."""
    ids, mask, packed_labels, rows = pack_groups(input_ids, attention_mask, labels, size,
                                                 prompt_width=prompt_width)  # fmt: skip
    shared: dict[str, Any] = {SHARED_PROMPT_KWARG: rows, "position_ids": rows.positions}
    token = token_log_probs(model, ids, mask, packed_labels, temperature=temperature, **shared)
    group, at = token.mask.nonzero(as_tuple=True)
    # Packed position u predicts token u + 1 of tail i, the token at its own row's index
    # positions[u + 1] (positions are row indices here), whose value that row keeps at the
    # index before it.
    member = group * size + rows.target_branch()[group, at].long() - 1
    index = rows.positions[group, at + 1] - 1
    values = token.values.new_zeros(labels.shape)
    values[member, index] = token.values[group, at]
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[member, index] = True
    return TokenLogProbs(values, keep, token.aux_loss)


def shares_prompt(model: Any) -> bool:
    """Whether :func:`pair_log_probs` serves ``model``: a patched causal LM (log-probs from
    hidden states) whose attention is ``sloth_attention`` (which takes the pair's mask)."""
    from sloth_core.patches.attention import SLOTH_ATTENTION

    inner = _unwrapped(model)
    config = getattr(inner, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    return attention == SLOTH_ATTENTION and serves_log_probs(inner)


def policy_shares_prompt(model: Any) -> bool:
    """:func:`shares_prompt`, unless the policy's loss adds an MoE router's load-balancing
    loss (``output_router_logits``): that averages over the forward's tokens, and TRL's
    counts the prompt in every row. (The reference's loss adds none.)"""
    config = getattr(_unwrapped(model), "config", None)
    return not getattr(config, "output_router_logits", False) and shares_prompt(model)


def _unwrapped(model: Any) -> Any:
    # DDP keeps the model in .module; FSDP2 and PEFT models are the model itself.
    return getattr(model, "module", model) if isinstance(model, torch.nn.Module) else model


class Reference:
    """The reference model's log-probs: the policy with adapters disabled, or a frozen copy
    (full fine-tuning: the weights as they were before training, in the policy's dtype)."""

    def __init__(self, model: Any, *, full_finetuning: bool) -> None:
        self.frozen = None
        if full_finetuning:
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        elif not hasattr(model, "disable_adapter"):
            raise TypeError("the reference model is the policy without adapters: LoRA is needed")
        self.model = model

    @torch.no_grad()
    def log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> SequenceLogProbs:
        """Per row, the reference's summed log-probability of the label tokens."""
        with self._model() as model:
            return sequence_log_probs(model, input_ids, attention_mask, labels)

    @torch.no_grad()
    def pair_log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> SequenceLogProbs:
        """:func:`pair_log_probs` under the reference: ``[B, 2, L]`` pairs, the prompt once."""
        with self._model() as model:
            return pair_log_probs(model, input_ids, attention_mask, labels)

    @torch.no_grad()
    def grouped_token_log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
        size: int, prompt_width: int, temperature: float = 1.0,
    ) -> TokenLogProbs:  # fmt: skip
        """:func:`grouped_token_log_probs` under the reference (GRPO's KL term)."""
        with self._model() as model:
            return grouped_token_log_probs(model, input_ids, attention_mask, labels, size=size,
                                           prompt_width=prompt_width,
                                           temperature=temperature)  # fmt: skip

    def shares_prompt(self) -> bool:
        return shares_prompt(self.frozen if self.frozen is not None else self.model)

    @torch.no_grad()
    def token_log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
        temperature: float = 1.0,
    ) -> TokenLogProbs:  # fmt: skip
        """Per label token, the reference's log-probability (GRPO's KL term)."""
        with self._model() as model:
            return token_log_probs(
                model, input_ids, attention_mask, labels, temperature=temperature
            )  # fmt: skip

    @contextlib.contextmanager
    def _model(self):
        if self.frozen is not None:
            yield self.frozen
        else:
            with self.model.disable_adapter():
                yield self.model


@contextlib.contextmanager
def evaluating(model: Any):
    """``model`` in eval mode for the block, back in its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

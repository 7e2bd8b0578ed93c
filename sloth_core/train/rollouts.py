"""GRPO's sampling: ``num_generations`` completions of every prompt, with a KV cache.

The model switches to generation (:func:`~sloth_core.modes.for_inference`: eval, KV cache
on, checkpointing off) and back (:func:`~sloth_core.modes.for_training`) in place: no
copy of the weights. Sampling draws from its own generator state, seeded from the run's
seed, the step and the rank, so the training RNG (dropout) is untouched and a resumed run
samples the same completions at the same step.

A completion is its tokens up to and including the first stop token (EOS or end of
turn), as TRL masks them; one that reaches ``max_completion_length`` without one is
*clipped*.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from sloth_core.inference.generation import SamplingOptions, generation_config

IGNORE_INDEX = -100


@dataclass
class Rollouts:
    """Every prompt's completions, the prompts repeated ``num_generations`` times in a row."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded
    completion_mask: torch.Tensor  # [N, C]: up to and including the first stop token
    texts: list[str]  # decoded, without special tokens
    clipped: torch.Tensor  # [N] bool: no stop token within max_completion_length

    def model_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``labels`` (the completion tokens only)."""
        ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1)
        labels = torch.cat(
            [torch.full_like(self.prompt_ids, IGNORE_INDEX),
             torch.where(self.completion_mask.bool(), self.completion_ids, IGNORE_INDEX)],
            dim=1,
        )  # fmt: skip
        return ids, mask, labels

    def completion_values(self, token_values: torch.Tensor) -> torch.Tensor:
        """The completion tokens' columns of per-position values ``[N, P + C]`` (position
        ``t`` holds the value for token ``t + 1``): ``[N, C]``."""
        start = self.prompt_ids.shape[1] - 1
        return token_values[:, start : start + self.completion_ids.shape[1]]


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of one optimizer step on one rank (same on resume)."""
    return (seed * 1_000_003 + step * 9_176 + rank) % (2**63 - 1)


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_generations: int,
    options: SamplingOptions,
    stop_ids: list[int],
    seed: int,
    min_new_tokens: int = 0,
    fast: bool | None = None,
) -> Rollouts:
    """Sample ``num_generations`` completions of each left-padded prompt row.

    ``min_new_tokens``: no stop token before that many (the generation benchmark sets it
    to ``options.max_new_tokens``, so every completion is that long). ``fast``: a static
    KV cache, each decode step replayed as a CUDA graph (:mod:`sloth_core.inference.graphed`);
    ``None`` (default) where it serves unless ``SLOTH_FAST_SAMPLING=0`` turns it off, ``True``
    also on the CPU (the static cache, without graphs), ``False``: the plain path. Where
    the graph cannot be made, the plain path samples, with the same seed.
    """
    from sloth_core.inference.graphed import GraphUnavailable, fast_sampling_enabled

    device = input_ids.device
    prompts = input_ids.repeat_interleave(num_generations, dim=0)
    prompt_mask = attention_mask.repeat_interleave(num_generations, dim=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    config = generation_config(model, options, stop_ids, pad)
    if min_new_tokens:
        config.min_new_tokens = min_new_tokens
    if fast is None:
        fast = fast_sampling_enabled(model, device)
    try:
        output = _generate(model, prompts, prompt_mask, config, seed, fast=fast)
    except GraphUnavailable as exc:
        warnings.warn(f"fast sampling off for this model: {exc}", stacklevel=2)
        output = _generate(model, prompts, prompt_mask, config, seed, fast=False)
    completions = output[:, prompts.shape[1] :]
    return _rollouts(tokenizer, prompts, prompt_mask, completions, stop_ids, pad, options)


def _generate(model, prompts, prompt_mask, config, seed: int, *, fast: bool) -> torch.Tensor:
    """``model.generate`` in inference mode, its draws seeded by ``seed`` alone."""
    from sloth_core.inference.graphed import graphed_decoding, static_cache_config
    from sloth_core.modes import for_inference, for_training

    device = prompts.device
    devices = [device] if device.type == "cuda" else []
    decoding: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if fast:
        config = static_cache_config(copy.deepcopy(config))
        # Under autocast, eagerly: its cache of cast weights cannot live in a graph.
        graphs = device.type == "cuda" and not torch.is_autocast_enabled(device.type)
        decoding = graphed_decoding(model, graphs=graphs)
    for_inference(model)
    try:
        with torch.random.fork_rng(devices=devices), _quiet_generation(), decoding:
            torch.manual_seed(seed)
            return model.generate(
                input_ids=prompts, attention_mask=prompt_mask, generation_config=config
            )  # fmt: skip
    finally:
        for_training(model)


def completion_mask(completions: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """``[N, C]``: 1 up to and including each row's first stop token (all 1 without one)."""
    width = completions.shape[1]
    is_stop = torch.isin(completions, torch.tensor(stop_ids, device=completions.device))
    first = torch.where(is_stop.any(dim=1), is_stop.int().argmax(dim=1), width)
    positions = torch.arange(width, device=completions.device)
    return (positions[None, :] <= first[:, None]).long()  # the stop token counts, as TRL


def _rollouts(tokenizer, prompts, prompt_mask, completions, stop_ids, pad, options) -> Rollouts:
    mask = completion_mask(completions, stop_ids)
    has_stop = torch.isin(completions, torch.tensor(stop_ids, device=completions.device)).any(1)
    ids = torch.where(mask.bool(), completions, pad)
    texts = [
        tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True)
        for row, n in zip(ids, mask.sum(1), strict=True)
    ]
    clipped = ~has_stop & (mask.sum(1) >= options.max_new_tokens)
    return Rollouts(prompts, prompt_mask, ids, mask, texts, clipped)


@contextlib.contextmanager
def _quiet_generation():
    # transformers warns once per call about generation flags the model config sets; the
    # config passed in is the one that counts.
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)

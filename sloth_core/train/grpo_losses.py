"""GRPO's advantages and losses, as TRL names and computes them, over per-token log-probs.

Mirrors TRL 1.9.0's ``GRPOTrainer`` (``trl/trainer/grpo_trainer.py``, unchanged on main
at f2cd577; options and defaults from ``grpo_config.py``): pure functions of rewards and
``[B, T]`` fp32 log-probs of sampled completions, which the trainer gets from the chunked
``token_log_probs`` op.

- **Rewards** (:func:`combine_rewards`): the weighted sum over reward functions, a
  function's ``None`` (NaN) left out; a completion every function skipped is NaN
  (TRL's ``multi_objective_aggregation="sum_then_normalize"``).
- **Advantages** (:func:`group_advantages`): ``A = r - mean(group)``, divided by
  ``std + 1e-4`` for ``scale_rewards="group"`` (the group's std, TRL's default) or
  ``"batch"`` (the whole batch's), not divided for ``"none"`` (Dr. GRPO). Means and
  (Bessel-corrected) stds skip NaN rewards, and a NaN advantage becomes 0.
- **Per-token loss** (:func:`token_losses`, options in :class:`GRPOOptions`): the ratio
  ``ρ = exp(logp - old)``, with the old log-probs the detached current ones when
  ``num_iterations == 1``; ``-min(ρA, clip(ρ, 1-ε, 1+ε_high) A)`` (``epsilon`` low,
  ``epsilon_high`` defaulting to ``epsilon``), plus ``β (exp(ref - logp) - (ref - logp) - 1)``,
  the k3 estimator of the KL to the reference (Schulman 2020), when ``beta != 0``.
- **Reductions** (:func:`reduce_token_losses`): ``grpo`` (DeepSeekMath): each
  completion's mean token loss, averaged over completions; ``bnpo`` and ``dapo`` (DAPO):
  the token losses' sum over the tokens; ``dr_grpo`` (Dr. GRPO): the sum over
  completions × ``max_completion_length``.

Accumulation is exact, as in the preference methods: a micro-batch's loss is its *share*,
its numerator divided by the totals of the whole optimizer step (:class:`StepTotals`:
every micro-batch's, and every rank's, since sloth sums gradients over ranks), so the
shares of the step's micro-batches sum to the loss of one batch holding them all. Where
that differs from TRL, which divides each micro-batch by its own totals and then by the
accumulation steps: ``grpo`` and ``dr_grpo`` agree whenever the micro-batches hold equally
many completions (always, in TRL); ``bnpo`` is TRL's per micro-batch token mean, which
sloth cannot keep exact under accumulation, so here it is the step's token mean, the same
as ``dapo`` (they differ in TRL only when a step has several micro-batches or ranks);
``dapo`` is TRL's ``num_items_in_batch`` normalisation, the tokens of the generation batch
(the optimizer step at TRL's default ``steps_per_generation``).

Not mirrored (TRL options the issue does not ask for): ``importance_sampling_level=
"sequence"``, ``delta``, the ``cispo``/``sapo``/``luspo``/``vespo`` losses, entropy masks
and bonus, vLLM's importance-sampling correction, ``use_bias_correction_kl``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

# The loss types (TRL's default: dapo) and the scale_rewards values (TRL maps True to
# "group" and False to "none") are the config's, so options and formulas share one list.
from .config import GRPO_LOSS_TYPES, SCALE_REWARDS

#: Added to the std before dividing, as TRL does.
STD_EPSILON = 1e-4

#: Metrics :func:`grpo_loss` returns, TRL's names (``kl`` only when ``beta != 0``).
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


# -- rewards and advantages -----------------------------------------------------------------


def combine_rewards(
    rewards_per_func: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``[N, F]`` rewards of ``F`` functions (NaN where one returned ``None``) to ``[N]``:
    the weighted sum of the others, NaN where every function skipped the completion."""
    if weights is None:
        weights = torch.ones(rewards_per_func.shape[1], dtype=rewards_per_func.dtype)
    weights = weights.to(rewards_per_func)
    rewards = (rewards_per_func * weights).nansum(dim=1)
    return rewards.masked_fill(rewards_per_func.isnan().all(dim=1), float("nan"))


@dataclass
class Advantages:
    """Per completion ``[N]``: its advantage and the std it was (or, for
    ``scale_rewards="none"``, would have been) divided by, for ``frac_reward_zero_std``."""

    advantages: torch.Tensor
    std: torch.Tensor

    @property
    def zero_std(self) -> torch.Tensor:
        """Completions whose group (or batch) had one reward for all: no learning signal."""
        return torch.isclose(self.std, torch.zeros_like(self.std))


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    # Bessel-corrected std over the non-NaN values; NaN where fewer than two (TRL's nanstd).
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~x.isnan()).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())


def group_advantages(
    rewards: torch.Tensor, num_generations: int, *, scale_rewards: str = "group"
) -> Advantages:
    """Advantages of ``[N]`` rewards, ``N = prompts × num_generations`` with each prompt's
    completions consecutive (every rank's rewards: a group may span ranks)."""
    _choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards are not groups of {num_generations}")
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch" and rewards.numel() > 1:
        std = _nanstd(rewards).expand_as(rewards)
    elif scale_rewards != "batch" and num_generations > 1:  # "none": for the zero-std metric
        std = _nanstd(groups, dim=1).repeat_interleave(num_generations)
    else:  # a single reward (only in evaluation, for TRL)
        std = torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPSILON)
    return Advantages(torch.nan_to_num(advantages, nan=0.0), std)


# -- per-token losses -----------------------------------------------------------------------


@dataclass(frozen=True)
class GRPOOptions:
    """The loss's options, TRL's names and defaults (``epsilon_high=None`` is ``epsilon``)."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None

    def __post_init__(self) -> None:
        _choice("loss_type", self.loss_type, GRPO_LOSS_TYPES)

    @property
    def bounds(self) -> tuple[float, float]:
        """The ratio's clipping range ``[1 - epsilon, 1 + epsilon_high]``."""
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        return 1 - self.epsilon, 1 + high


@dataclass
class TokenLosses:
    """``[B, T]``: the per-token loss, the importance ratio ``ρ``, and the per-token KL
    estimate (``None`` when ``beta == 0``); padding positions hold whatever their inputs
    gave (the reductions mask them)."""

    losses: torch.Tensor
    ratio: torch.Tensor
    kl: torch.Tensor | None


def token_losses(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    options: GRPOOptions,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
) -> TokenLosses:
    """The clipped surrogate (and KL penalty) per token of ``[B, T]`` policy log-probs.

    ``advantages`` is ``[B]``; ``old_logps`` the sampling policy's log-probs when
    ``num_iterations > 1`` (``None``: the detached ``logps``, so ``ρ = 1``); ``ref_logps``
    the reference model's, needed when ``beta != 0``.
    """
    old_logps = logps.detach() if old_logps is None else old_logps
    advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, *options.bounds)
    losses = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if options.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference model's log-probs (ref_logps)")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        losses = losses + options.beta * kl
    return TokenLosses(losses, ratio, kl)


# -- reductions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTotals:
    """The whole optimizer step's denominators: its completions (rows, a fully masked one
    included, as TRL counts it), their completion tokens, and ``max_completion_length``."""

    sequences: int
    tokens: int
    max_completion_length: int

    @classmethod
    def of(cls, masks: Iterable[torch.Tensor], max_completion_length: int) -> StepTotals:
        """From the completion masks of every micro-batch of the step (one rank's; a
        data-parallel trainer all-sums ``sequences`` and ``tokens`` over ranks)."""
        masks = list(masks)
        return cls(
            sequences=sum(m.shape[0] for m in masks),
            tokens=sum(int(m.sum()) for m in masks),
            max_completion_length=max_completion_length,
        )


def reduce_token_losses(
    losses: torch.Tensor, mask: torch.Tensor, totals: StepTotals, *, loss_type: str = "dapo"
) -> torch.Tensor:
    """One micro-batch's share of the step's loss, from its ``[B, T]`` token losses and
    completion mask; the shares of the step's micro-batches sum to the step's loss."""
    _choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    # where, not a product: a padding position's loss may be inf (0 * inf is NaN)
    masked = torch.where(mask.bool(), losses, 0.0)
    if loss_type == "grpo":
        per_sequence = masked.sum(-1) / mask.sum(-1).to(losses.dtype).clamp(min=1.0)
        return per_sequence.sum() / max(totals.sequences, 1)
    if loss_type == "dr_grpo":
        return masked.sum() / max(totals.sequences * totals.max_completion_length, 1)
    return masked.sum() / max(totals.tokens, 1)  # bnpo, dapo


@dataclass
class GRPOLoss:
    """A micro-batch's share of the loss and its metrics as ``(sum, count)`` pairs over its
    completion tokens (detached), so that summing them over the step's micro-batches and
    ranks and dividing gives TRL's token means."""

    loss: torch.Tensor
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]]


def grpo_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    totals: StepTotals,
    options: GRPOOptions,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
) -> GRPOLoss:
    """:func:`token_losses` reduced by ``loss_type``, with TRL's metrics: the fraction of
    tokens clipped below (``ρ < 1-ε`` where ``A < 0``), above (``ρ > 1+ε_high`` where
    ``A > 0``), either, and (``beta != 0``) the mean per-token KL."""
    out = token_losses(logps, advantages, options, old_logps=old_logps, ref_logps=ref_logps)
    loss = reduce_token_losses(out.losses, mask, totals, loss_type=options.loss_type)
    keep = mask.bool()
    count = keep.sum().to(torch.float32)
    ratio, advantages = out.ratio.detach(), advantages.detach().unsqueeze(1)
    lowest, highest = options.bounds
    low = (ratio < lowest) & (advantages < 0) & keep
    high = (ratio > highest) & (advantages > 0) & keep
    flags = (low, high, low | high)
    metrics = {
        name: (flag.sum().to(torch.float32), count)
        for name, flag in zip(CLIP_METRICS, flags, strict=True)
    }
    if out.kl is not None:
        metrics["kl"] = (torch.where(keep, out.kl.detach(), 0.0).sum(), count)
    return GRPOLoss(loss, metrics)

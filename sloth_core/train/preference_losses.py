"""The preference losses, as TRL names and computes them, over per-sequence log-probs.

Every function takes the policy's (and, where the method has one, the reference model's)
log-probabilities of whole completions, ``[B]`` fp32, and returns a :class:`PairLosses`:
the per-example losses (the trainer sums them and divides by the examples of the whole
optimizer step, so accumulation is exact) and the implicit rewards TRL logs.

- **DPO** (Rafailov et al. 2023; TRL ``DPOTrainer``): ``h = (pi_c - pi_r) - (ref_c - ref_r)``,
  ``sigmoid``: ``-(1-ε) log σ(βh) - ε log σ(-βh)`` (ε: ``label_smoothing``, the cDPO/robust
  form TRL uses); ``hinge``: ``relu(1 - βh)`` (SLiC); ``ipo``: ``(h - 1/(2β))²`` over
  length-averaged log-probs, as TRL does (Azar et al. 2023 write the sums; TRL averages).
  Rewards ``β(pi - ref)``.
- **ORPO** (Hong et al. 2024; TRL ``ORPOTrainer``): mean token log-probs ``a_c, a_r``;
  ``log odds = (a_c - a_r) - (log(1-e^{a_c}) - log(1-e^{a_r}))``, loss
  ``NLL(chosen) - β log σ(log odds)`` (β is the paper's λ); rewards ``β a``.
- **SimPO** (Meng et al. 2024; TRL ``CPOTrainer`` with ``loss_type="simpo"`` and
  ``cpo_alpha=0``): ``-(1-ε) log σ(β(a_c - a_r) - γ) - ε log σ(-(β(a_c - a_r) - γ))``,
  no reference model; rewards ``β a``.
- **KTO** (Ethayarajh et al. 2024; TRL ``KTOTrainer``): ``z = max(0, mean KL estimate)``
  (detached), desirable ``w_d (1 - σ(β(r - z)))``, undesirable ``w_u (1 - σ(β(z - r)))``
  with ``r = pi - ref`` summed over the completion; rewards ``β r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DPO_LOSS_TYPES


@dataclass
class PairLosses:
    """Per-example losses ``[B]`` and the detached rewards of the examples' completions.

    For pairs, ``chosen_rewards`` and ``rejected_rewards`` are both ``[B]``; for KTO they
    hold the desirable and the undesirable examples' rewards (either may be empty).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PairLosses:
    """DPO and its ``ipo`` and ``hinge`` variants (for ``ipo``, pass length-averaged log-probs)."""
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * logits, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    return PairLosses(
        losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    )


def orpo_losses(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, *, beta: float
) -> tuple[PairLosses, torch.Tensor]:
    """The odds-ratio term ``-β log σ(log odds)`` per pair (the chosen NLL is added by the
    trainer, normalised by the step's chosen tokens); also the log odds, for the metrics."""
    # log(1 - e^a) for a < 0, stable near 0 and near -inf (log1p(-exp) and log(-expm1)).
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    losses = -beta * F.logsigmoid(log_odds)
    return (
        PairLosses(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()),
        log_odds.detach(),
    )


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    # Mächler's rule: log(-expm1(a)) near 0, log1p(-exp(a)) below -log 2. A log-prob of
    # exactly 0 would be -inf; clamp so that a certain completion gives a large, finite term.
    a = a.clamp(max=-1e-7)
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)), torch.log1p(-a.exp()))


def simpo_losses(
    chosen_mean: torch.Tensor,
    rejected_mean: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> PairLosses:
    """SimPO over length-averaged log-probs, target margin ``gamma`` (no reference model)."""
    logits = beta * (chosen_mean - rejected_mean) - gamma
    return PairLosses(
        _smoothed_sigmoid(logits, label_smoothing),
        beta * chosen_mean.detach(),
        beta * rejected_mean.detach(),
    )


def kto_losses(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PairLosses:
    """KTO per example; ``kl`` is the batch's KL estimate, already clamped and detached."""
    ratios = logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratios))),
    )
    rewards = beta * ratios.detach()
    return PairLosses(losses, rewards[desirable], rewards[~desirable])


def kto_kl(kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """The batch KL estimate: the mean log-ratio on mismatched completions, at least 0."""
    return (kl_logps - kl_ref_logps).detach().mean().clamp(min=0)

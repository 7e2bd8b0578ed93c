"""GRPO's advantages, losses and metrics against the formulas written out here.

The independent implementation is plain loops over completions and tokens in float64, as
DeepSeekMath (GRPO), DAPO and Dr. GRPO write the objectives and TRL 1.9.0's
``GRPOTrainer`` reduces them: the module under test runs in fp32 on fixed completions,
rewards and log-probs, and its loss, its gradients w.r.t. the log-probs, its metrics and
the advantages agree to 1e-6. Every loss type is checked with clipping active (old
log-probs that differ, ratios outside ``[1-ε, 1+ε_high]`` on both sides), with the KL term
on and off, and with ``num_iterations == 1`` (old = current, detached); and two
micro-batches' shares sum to the loss and gradients of one batch holding both.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from sloth_core.train.grpo_losses import (
    GRPO_LOSS_TYPES,
    GRPOOptions,
    StepTotals,
    combine_rewards,
    group_advantages,
    grpo_loss,
)

TOL = dict(atol=1e-6, rtol=1e-6)
MAX_COMPLETION_LENGTH = 11


def completions(seed: int, lengths: tuple[int, ...], width: int, *, num_iterations: int):
    """Policy, old and reference log-probs ``[B, width]`` (fp32), a completion mask with
    those lengths (a 0 is a fully masked completion), and mixed-sign advantages."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(lengths), width)
    logps = -3 * torch.rand(shape, generator=generator)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    # Old log-probs half a nat away on average: ratios well outside [0.8, 1.28] both ways.
    old = logps + 0.5 * torch.randn(shape, generator=generator) if num_iterations > 1 else None
    ref = logps + 0.7 * torch.randn(shape, generator=generator)
    advantages = torch.randn(len(lengths), generator=generator)
    return logps, mask, old, ref, advantages


def paper_loss(logps, mask, advantages, old, ref, *, loss_type, beta, epsilon, epsilon_high):
    """The objective in float64, token by token; returns the loss and the token metrics."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    old = logps.detach() if old is None else old.double()
    ref = ref.double()
    per_sequence, total, tokens = [], 0.0, 0
    low = high = 0
    kl_sum = 0.0
    for i in range(logps.shape[0]):
        a = float(advantages[i])
        sequence = 0.0
        length = int(mask[i].sum())
        for t in range(length):
            ratio = torch.exp(logps[i, t] - old[i, t])
            clipped = min(max(ratio, 1 - epsilon), 1 + epsilon_high)
            term = -min(ratio * a, clipped * a)
            low += bool(ratio < 1 - epsilon and a < 0)
            high += bool(ratio > 1 + epsilon_high and a > 0)
            if beta:
                d = ref[i, t] - logps[i, t]
                kl = torch.exp(d) - d - 1
                kl_sum += float(kl.detach())
                term = term + beta * kl
            sequence = sequence + term
        per_sequence.append(sequence / max(length, 1))
        total = total + sequence
        tokens += length
    G = len(per_sequence)
    if loss_type == "grpo":  # 1/G sum_i 1/|o_i| sum_t
        loss = sum(per_sequence) / G
    elif loss_type in ("bnpo", "dapo"):  # 1/sum_i |o_i| sum_i sum_t
        loss = total / tokens
    else:  # dr_grpo: 1/(G L_max) sum_i sum_t
        loss = total / (G * MAX_COMPLETION_LENGTH)
    metrics = {
        "clip_ratio/low_mean": low / tokens,
        "clip_ratio/high_mean": high / tokens,
        "clip_ratio/region_mean": (low + high) / tokens,
    }
    if beta:
        metrics["kl"] = kl_sum / tokens
    return loss, metrics


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_loss_and_gradients_equal_the_formula(loss_type, num_iterations, beta, epsilon_high):
    lengths = (5, 1, 7, 0, 3, 7)
    logps, mask, old, ref, advantages = completions(
        len(lengths) + num_iterations, lengths, 7, num_iterations=num_iterations
    )
    options = GRPOOptions(loss_type=loss_type, beta=beta, epsilon_high=epsilon_high)
    mine = logps.clone().requires_grad_()
    totals = StepTotals.of([mask], MAX_COMPLETION_LENGTH)
    out = grpo_loss(mine, mask, advantages, totals, options, old_logps=old, ref_logps=ref)
    out.loss.backward()

    theirs = logps.double().requires_grad_()
    expected, metrics = paper_loss(
        theirs, mask, advantages, old, ref,
        loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=epsilon_high,
    )  # fmt: skip
    expected.backward()

    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), expected.detach(), **TOL)
    torch.testing.assert_close(mine.grad.double(), theirs.grad, **TOL)
    assert not mine.grad[mask == 0].any()  # padding gets no gradient
    got = {name: float(total / count) for name, (total, count) in out.metrics.items()}
    assert got.keys() == metrics.keys()
    for name, value in metrics.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    if num_iterations > 1:  # the case clips on both sides
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0
    else:  # old = current: the ratio is 1, nothing clips
        assert metrics["clip_ratio/region_mean"] == 0


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_micro_batch_shares_sum_to_the_whole_batch(loss_type):
    """Two micro-batches of different sizes and widths, each divided by the step's totals,
    give the loss and gradients of one batch holding both."""
    first = completions(10, (4, 2, 0), 4, num_iterations=2)
    second = completions(11, (9, 1, 6, 9, 3), 9, num_iterations=2)
    options = GRPOOptions(loss_type=loss_type, beta=0.04, epsilon=0.2, epsilon_high=0.28)
    totals = StepTotals.of([first[1], second[1]], MAX_COMPLETION_LENGTH)
    assert totals == StepTotals(sequences=8, tokens=34, max_completion_length=11)

    def pad(x):
        return torch.nn.functional.pad(x, (0, 5))

    pairs = zip(first[:4], second[:4], strict=True)
    logps, mask, old, ref = (torch.cat([pad(a), b]) for a, b in pairs)
    advantages = torch.cat([first[4], second[4]])
    logps.requires_grad_()
    whole = StepTotals.of([mask], MAX_COMPLETION_LENGTH)
    out = grpo_loss(logps, mask, advantages, whole, options, old_logps=old, ref_logps=ref)
    out.loss.backward()

    shares, grads, metrics = 0.0, [], {}
    for part in (first, second):
        part_logps, part_mask, part_old, part_ref, part_advantages = part
        part_logps.requires_grad_()
        share = grpo_loss(
            part_logps, part_mask, part_advantages, totals, options,
            old_logps=part_old, ref_logps=part_ref,
        )  # fmt: skip
        share.loss.backward()
        shares = shares + share.loss.detach()
        grads.append(part_logps.grad)
        for name, (total, count) in share.metrics.items():
            before = metrics.get(name, (0.0, 0.0))
            metrics[name] = (before[0] + total, before[1] + count)

    torch.testing.assert_close(shares, out.loss.detach(), **TOL)
    torch.testing.assert_close(torch.cat([pad(grads[0]), grads[1]]), logps.grad, **TOL)
    for name, (total, count) in out.metrics.items():
        assert float(metrics[name][0] / metrics[name][1]) == pytest.approx(float(total / count))


def paper_advantages(rewards: list[float], num_generations: int, scale_rewards: str):
    """Per group: reward minus the group's mean, over the std (Bessel's) plus 1e-4; NaN
    rewards are left out of the statistics and get advantage 0."""

    def stats(values):
        values = [v for v in values if not math.isnan(v)]
        mean = sum(values) / len(values) if values else math.nan
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return mean, std

    batch_std = stats(rewards)[1] if len(rewards) > 1 else 0.0
    advantages, stds = [], []
    for start in range(0, len(rewards), num_generations):
        group = rewards[start : start + num_generations]
        mean, std = stats(group)
        if scale_rewards == "batch":
            std = batch_std
        elif num_generations == 1:
            std = 0.0
        for reward in group:
            advantage = reward - mean
            if scale_rewards != "none":
                advantage /= std + 1e-4
            advantages.append(0.0 if math.isnan(advantage) else advantage)
            stds.append(std)
    return advantages, stds


REWARDS = [
    [0.5, 1.0, -0.25, 2.0],
    [1.0, 1.0, 1.0, 1.0],  # every completion alike: std 0, no signal
    [3.0, math.nan, 0.0, 1.5],  # one completion every reward function skipped
    [math.nan] * 4,
    [-1.0, 0.25, 0.0, 0.75],
]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("num_generations", [4, 2, 1])
def test_advantages_equal_the_formula(scale_rewards, num_generations):
    rewards = [r for group in REWARDS for r in group]
    out = group_advantages(torch.tensor(rewards), num_generations, scale_rewards=scale_rewards)
    advantages, stds = paper_advantages(rewards, num_generations, scale_rewards)
    torch.testing.assert_close(out.advantages, torch.tensor(advantages), **TOL)
    torch.testing.assert_close(out.std, torch.tensor(stds), equal_nan=True, **TOL)
    if scale_rewards != "batch" and num_generations == 4:
        assert out.zero_std.tolist()[4:8] == [True] * 4  # the group of equal rewards


def test_rewards_combine_weighted_skipping_none():
    nan = math.nan
    per_func = [[1.0, nan, 0.5], [nan, nan, nan], [0.0, 2.0, nan], [-1.0, 1.0, 3.0]]
    weights = [0.5, 2.0, -1.0]
    out = combine_rewards(torch.tensor(per_func), torch.tensor(weights))
    expected = []
    for row in per_func:
        kept = [w * r for w, r in zip(weights, row, strict=True) if not math.isnan(r)]
        expected.append(sum(kept) if kept else nan)
    torch.testing.assert_close(out, torch.tensor(expected), equal_nan=True, **TOL)
    unweighted = combine_rewards(torch.tensor(per_func))
    assert unweighted.tolist()[2:] == [2.0, 3.0]


def test_bad_options_are_named():
    logps, mask, _, _, advantages = completions(0, (2, 3), 3, num_iterations=1)
    totals = StepTotals.of([mask], 3)
    with pytest.raises(ValueError, match="loss_type must be one of grpo, bnpo, dr_grpo, dapo"):
        GRPOOptions(loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, mask, advantages, totals, GRPOOptions(beta=0.1))
    with pytest.raises(ValueError, match="scale_rewards must be one of group, batch, none"):
        group_advantages(torch.zeros(4), 2, scale_rewards="std")
    with pytest.raises(ValueError, match="not groups of 3"):
        group_advantages(torch.zeros(4), 3)

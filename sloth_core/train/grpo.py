"""GRPO as a method of ``sloth train``: sample, reward, normalise in groups, update.

Each optimizer step samples ``num_generations`` completions of each of its prompts
(:mod:`.rollouts`, with a KV cache, the model switched in place), scores them with the
reward functions (:mod:`.rewards`), turns the rewards into advantages within each
prompt's group and takes the clipped policy-gradient step with an optional KL to the
reference (:mod:`.grpo_losses`), the log-probs from the chunked ``token_log_probs`` op.
As in TRL, ``per_device_train_batch_size`` counts completions: a micro-batch holds
``per_device_train_batch_size / num_generations`` prompts. Advantages are computed over
the whole step of this rank (every micro-batch's completions). With ``num_iterations``
> 1, one batch of completions serves that many optimizer steps: the loop gives no new
micro-batches in between, and the importance ratio compares with the log-probs the
policy gave them when they were sampled (the "old" ones); with 1, the old log-probs are
the current ones, detached. Checkpoints fall between two batches (``save_steps`` is a
multiple of ``num_iterations``), so a resume starts with a new batch.

Sampling is seeded from the run's seed, the step, the rank and the micro-batch, so a
resumed run samples the completions the interrupted one did. Every ``logging_steps``
the step's prompts, completions and rewards go to ``completions.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sloth_core.errors import SlothError

from . import distributed
from .config import ConfigError, TrainConfig
from .grpo_losses import GRPOOptions, StepTotals, group_advantages, grpo_loss
from .log_probs import (
    Reference,
    TokenLogProbs,
    evaluating,
    grouped_token_log_probs,
    policy_shares_prompt,
    token_log_probs,
)
from .preference import Sums
from .resume import STEP_LOGS
from .rollouts import Rollouts, rollout_seed, sample

COMPLETIONS_FILE = STEP_LOGS[1]  # cut back on resume with metrics.jsonl


class GRPOMethod:
    """``--method grpo``: prompt data, sampling, rewards, the GRPO loss."""

    name = "grpo"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.generations = config.num_generations
        self.rows_per_device = config.per_device_train_batch_size // config.num_generations
        self.options = GRPOOptions(
            loss_type=config.loss_kind, beta=config.kl_beta, epsilon=config.epsilon,
            epsilon_high=config.epsilon_high or None,
        )  # fmt: skip
        self.steps_per_batch = config.num_iterations
        self.frozen_reference = self.options.beta > 0 and config.full_finetuning
        self.step = 0  # set by the loop before each optimizer step: seeds the sampling
        self.output_dir: Path | None = None  # rank 0's: where completions.jsonl goes
        self.rank = 0
        self.rewards = _load_rewards(config)
        self.tokenizer: Any = None
        self.stop_ids: list[int] = []
        self.reference: Reference | None = None
        self.train_examples: list[Any] = []
        self._batch: _Batch | None = None  # the completions the next iterations reuse

    def needs_data(self, step: int) -> bool:
        return step % self.steps_per_batch == 0

    # -- data ---------------------------------------------------------------------------
    def tokenize(self, path: str, tokenizer: Any) -> tuple[list[Any], Any]:
        from sloth_core import data

        self.tokenizer = tokenizer
        try:
            return data.tokenize_prompts(
                data.load_records(path), tokenizer,
                max_prompt_length=self.config.max_prompt_length or None,
                chat_template=self.config.chat_template or None,
            )  # fmt: skip
        except data.DataError as exc:
            if path in str(exc):
                raise
            raise data.DataError(f"{path}: {exc}") from None

    def batches(self, examples: list[Any], *, batch_size: int, pad_token_id: int, seed: int,
                train: bool) -> Any:  # fmt: skip
        from sloth_core.data import PromptBatches

        if train:
            self.train_examples = list(examples)
        prompts = max(1, batch_size // self.generations)  # batch_size counts completions
        return PromptBatches(
            examples, batch_size=prompts, pad_token_id=pad_token_id, seed=seed, shuffle=train
        )  # fmt: skip

    # -- model --------------------------------------------------------------------------
    def forward_shape(self, examples: list[Any], model: Any) -> tuple[int, int]:
        """Every completion a row of up to ``max_seq_length`` tokens (a group sharing its
        prompt in one row holds no more tokens than that)."""
        return self.rows_per_device * self.generations, self.config.max_seq_length

    def attach(self, model: Any) -> None:
        from sloth_core.sdk.stop import stop_token_ids

        self.stop_ids = stop_token_ids(self.tokenizer, model, self.config.chat_template or None)
        if not self.stop_ids:
            raise ConfigError("method='grpo': the tokenizer has no EOS or end-of-turn token to "
                              "end a sampled completion")  # fmt: skip
        if self.options.beta > 0:
            try:
                self.reference = Reference(model, full_finetuning=self.config.full_finetuning)
            except TypeError as exc:
                raise ConfigError(f"method='grpo' with beta > 0: {exc}") from None

    def precompute(self, batches: Any, count: int, autocast: Any) -> None:
        pass

    # -- step ---------------------------------------------------------------------------
    def forward_backward(
        self, model: Any, micro_batches: list[dict[str, torch.Tensor]], *,
        autocast: Any = contextlib.nullcontext, group: Any = None,
    ) -> tuple[float, dict[str, float]]:  # fmt: skip
        """Sample and score every micro-batch's completions, then forward and backward
        them; the step's loss (this rank's share) and metrics."""
        if micro_batches:
            self._batch = self._sample_batch(model, micro_batches, autocast, group)
        elif self._batch is None:
            raise SlothError(f"GRPO step {self.step + 1}: no completions to iterate on "
                             "(a checkpoint inside a batch's iterations?)")  # fmt: skip
        batch = self._batch
        sums, loss_sum, start = Sums(), 0.0, 0
        device = next(p for p in model.parameters()).device
        for number, item in enumerate(batch.scored):
            rows = item.rollouts.completion_ids.shape[0]
            share = batch.advantages.advantages[start : start + rows].to(device)
            start += rows
            old = batch.old_logps[number] if batch.old_logps else None
            with distributed.no_sync(model, last=number == len(batch.scored) - 1):
                with autocast():
                    loss = self._loss(model, item.rollouts, share, batch.totals, sums, old)
                loss.backward()
            loss_sum += float(loss.detach())
        self._reward_metrics(batch.scored, batch.advantages, sums)
        metrics = sums.means(group)
        if micro_batches:  # each completion once, at the step that sampled it
            self._log_completions(batch.scored, batch.advantages.advantages, metrics)
        return loss_sum, metrics

    def _sample_batch(self, model, micro_batches, autocast, group) -> _Batch:
        """Sample and score the step's completions; their advantages, the step's totals
        and, for later iterations, the policy's log-probs of them now (the old ones)."""
        device = next(p for p in model.parameters()).device
        scored = [
            self._rollout(model, batch, self.train_examples, number, autocast, device)
            for number, batch in enumerate(micro_batches)
        ]
        rewards = torch.cat([s.total for s in scored])
        advantages = group_advantages(rewards, self.generations,
                                      scale_rewards=self.config.scale_rewards)  # fmt: skip
        totals = StepTotals.of([s.rollouts.completion_mask for s in scored],
                               self.config.completion_length)  # fmt: skip
        if group is not None and group.active:
            sequences, tokens = group.all_sum([totals.sequences, totals.tokens])
            totals = StepTotals(int(sequences), int(tokens), totals.max_completion_length)
        old = []
        if self.steps_per_batch > 1:
            with torch.no_grad(), autocast():
                for item in scored:
                    tokens = self._token_log_probs(model, item.rollouts)
                    old.append(item.rollouts.completion_values(tokens.values))
        return _Batch(scored, advantages, totals, old)

    @torch.no_grad()
    def evaluate(self, model: Any, batches: Any, *, autocast: Any) -> dict[str, float]:
        """The mean reward of completions sampled for the eval prompts (the run's seed)."""
        device = next(p for p in model.parameters()).device
        sums = Sums()
        with evaluating(model):
            for number in range(batches.num_batches()):
                item = self._rollout(model, batches.batch(0, number), batches.examples,
                                     number, autocast, device, seed=self.config.seed)  # fmt: skip
                sums.add("reward", item.total.nan_to_num(0.0))
                sums.add("completions/mean_length", item.rollouts.completion_mask.sum(1))
        return {f"eval_{key}": value for key, value in sums.means().items()}

    @staticmethod
    def eval_line(when: str, metrics: dict[str, float]) -> str:
        return (
            f"eval {when}: reward {metrics['eval_reward']:.4f}, completion length "
            f"{metrics['eval_completions/mean_length']:.1f}"
        )

    # -- parts --------------------------------------------------------------------------
    def _rollout(self, model, batch, examples, number, autocast, device, seed=None) -> _Scored:
        from sloth_core.data import reward_columns
        from sloth_core.inference.generation import SamplingOptions

        from .rewards import score

        config = self.config
        batch = {key: value.to(device) for key, value in batch.items()}
        options = SamplingOptions(
            max_new_tokens=config.completion_length, temperature=config.temperature,
            top_p=config.top_p, top_k=config.top_k,
        )  # fmt: skip
        base = rollout_seed(config.seed, self.step, self.rank) if seed is None else seed
        generator = getattr(model, "module", model)  # DDP's module: generation runs alone
        with autocast():
            rollouts = sample(
                generator, self.tokenizer, batch["input_ids"], batch["attention_mask"],
                num_generations=self.generations, options=options, stop_ids=self.stop_ids,
                seed=base * 1009 + number,
            )  # fmt: skip
        chosen = [examples[i] for i in batch["index"].tolist()]
        prompts = [e.prompt for e in chosen for _ in range(self.generations)]
        completions = [
            [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
            for prompt, text in zip(prompts, rollouts.texts, strict=True)
        ]
        lengths = rollouts.completion_mask.sum(1).tolist()
        ids = [row[:n].tolist() for row, n in zip(rollouts.completion_ids, lengths, strict=True)]
        per_function, total = score(
            self.rewards, prompts, completions, reward_columns(chosen, repeat=self.generations),
            completion_ids=ids,
        )  # fmt: skip
        return _Scored(rollouts, prompts, per_function, total)

    def _loss(self, model, rollouts: Rollouts, advantages, totals, sums: Sums,
              old_logps: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        policy = self._token_log_probs(model, rollouts)
        logps = rollouts.completion_values(policy.values)
        ref = None
        if self.reference is not None:
            ref_tokens = self._token_log_probs(model, rollouts, reference=True)
            ref = rollouts.completion_values(ref_tokens.values)
        out = grpo_loss(logps, rollouts.completion_mask, advantages, totals, self.options,
                        old_logps=old_logps, ref_logps=ref)  # fmt: skip
        for name, (total, count) in out.metrics.items():
            sums.add_total(name, float(total), float(count))
        loss = out.loss
        if policy.aux_loss is not None:  # MoE: the router's loss, this micro-batch's share
            share = rollouts.completion_ids.shape[0] / max(totals.sequences, 1)
            coef = getattr(model, "module", model).config.router_aux_loss_coef
            loss = loss + coef * policy.aux_loss.to(loss.device) * share
        return loss

    def _token_log_probs(self, model: Any, rollouts: Rollouts, *,
                         reference: bool = False) -> TokenLogProbs:  # fmt: skip
        """The policy's (or the reference's) log-probs of the rollouts' rows: one row a
        prompt's completions, the prompt once, where ``share_prompt`` and the model allow."""
        ids, mask, labels = rollouts.model_rows()
        temperature = self.config.temperature
        grouped = (self.config.share_prompt and self.generations > 1
                   and ids.shape[0] % self.generations == 0)  # fmt: skip
        group: dict[str, Any] = dict(size=self.generations, temperature=temperature,
                                     prompt_width=rollouts.prompt_ids.shape[1])  # fmt: skip
        if reference:
            assert self.reference is not None
            if grouped and self.reference.shares_prompt():
                return self.reference.grouped_token_log_probs(ids, mask, labels, **group)
            return self.reference.token_log_probs(ids, mask, labels, temperature=temperature)
        if grouped and policy_shares_prompt(model):
            return grouped_token_log_probs(model, ids, mask, labels, **group)
        return token_log_probs(model, ids, mask, labels, temperature=temperature)

    def _reward_metrics(self, scored: list[_Scored], advantages: Any, sums: Sums) -> None:
        per_function = torch.cat([s.per_function for s in scored])
        total = torch.cat([s.total for s in scored])
        lengths = torch.cat([s.rollouts.completion_mask.sum(1) for s in scored]).float()
        clipped = torch.cat([s.rollouts.clipped for s in scored]).float()
        sums.add("reward", total.nan_to_num(0.0))
        first = slice(None, None, self.generations)  # one value per group: its first row's
        sums.add("reward_std", advantages.std[first].nan_to_num(0.0))
        sums.add("frac_reward_zero_std", advantages.zero_std[first].float())
        for column, function in enumerate(self.rewards):
            values = per_function[:, column]
            judged = values[~values.isnan()]
            sums.add(f"rewards/{function.name}/mean", judged)
            std = judged.std() if judged.numel() > 1 else torch.zeros(())
            sums.add(f"rewards/{function.name}/std", std.reshape(1))
        sums.add("completions/mean_length", lengths)
        sums.add("completions/clipped_ratio", clipped)
        sums.add_total("completions/max_length", float(lengths.max()), 1.0)
        sums.add_total("completions/min_length", float(lengths.min()), 1.0)

    def _log_completions(self, scored: list[_Scored], advantages: torch.Tensor,
                         metrics: dict[str, float]) -> None:  # fmt: skip
        every = self.config.logging_steps
        if self.output_dir is None or (self.step + 1) % every:
            return
        lines, row = [], 0
        for item in scored:
            for index, text in enumerate(item.rollouts.texts):
                rewards = {f.name: _number(item.per_function[index, k])
                           for k, f in enumerate(self.rewards)}  # fmt: skip
                lines.append(json.dumps({
                    "step": self.step + 1, "prompt": item.prompts[index], "completion": text,
                    "reward": _number(item.total[index]), "rewards": rewards,
                    "advantage": float(advantages[row]),
                }))  # fmt: skip
                row += 1
        with open(self.output_dir / COMPLETIONS_FILE, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


@dataclass
class _Batch:
    """One batch of completions: every micro-batch's, their advantages, the step's totals,
    and their log-probs when sampled (``num_iterations`` > 1)."""

    scored: list[_Scored]
    advantages: Any
    totals: StepTotals
    old_logps: list[torch.Tensor]


class _Scored:
    """One micro-batch's completions, their prompts, and their rewards."""

    def __init__(self, rollouts: Rollouts, prompts: list[Any], per_function: torch.Tensor,
                 total: torch.Tensor) -> None:  # fmt: skip
        self.rollouts, self.prompts = rollouts, prompts
        self.per_function, self.total = per_function, total


def _number(value: torch.Tensor) -> float | None:
    number = float(value)
    return None if number != number else number  # NaN: no function judged it


def _load_rewards(config: TrainConfig) -> list[Any]:
    from .rewards import load_reward

    weights = [float(w) for w in config.reward_weights] or [1.0] * len(config.reward)
    functions = [load_reward(spec, weight) for spec, weight in zip(config.reward, weights,
                                                                    strict=True)]  # fmt: skip
    names = [f.name for f in functions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"reward: two functions are named {repeated[0]!r}; their metrics "
                          "would mix: give one another name")  # fmt: skip
    return functions

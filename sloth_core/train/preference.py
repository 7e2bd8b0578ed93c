"""Preference tuning as a method of ``sloth train``: DPO, ORPO, SimPO and KTO.

A sibling of SFT (:mod:`.methods`): same options, model, checkpoints and callbacks; its
own data (pairs, or KTO's labelled completions), batch and step. One forward takes every
row of a micro-batch, chosen and rejected together; the log-probs come from the chunked
``token_log_probs`` op (:mod:`.log_probs`), never the full logits.

Accumulation is exact: each micro-batch's loss is its summed per-example losses divided by
the examples of the whole optimizer step (every rank's), ORPO's NLL by the step's chosen
tokens, so the accumulated gradient is that of one batch holding them all. The metrics
(TRL's names) are means over the step's examples.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from . import distributed
from . import preference_losses as losses
from .config import REFERENCE_METHODS, ConfigError, TrainConfig
from .log_probs import (
    IGNORE_INDEX,
    Reference,
    SequenceLogProbs,
    evaluating,
    pair_log_probs,
    policy_shares_prompt,
    sequence_log_probs,
)

#: Metrics a step logs, as TRL names them (a method logs those it has).
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")  # fmt: skip


class Sums:
    """Running sums and counts of metrics, reduced over micro-batches and ranks."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add(self, name: str, values: torch.Tensor) -> None:
        self.add_total(name, float(values.detach().float().sum()), values.numel())

    def add_total(self, name: str, total: float, count: float) -> None:
        entry = self.totals[name]
        entry[0] += total
        entry[1] += count

    def means(self, group: Any = None) -> dict[str, float]:
        names = sorted(self.totals)
        flat = [x for name in names for x in self.totals[name]]
        if group is not None and group.active and flat:
            flat = [float(x) for x in group.all_sum(flat)]
        means = {}
        for i, name in enumerate(names):
            total, count = flat[2 * i], flat[2 * i + 1]
            if count:
                means[name] = total / count
        if "rewards/chosen" in means and "rewards/rejected" in means:
            means.setdefault("rewards/margins", means["rewards/chosen"] - means["rewards/rejected"])
        return means


class PreferenceMethod:
    """``--method dpo|orpo|simpo|kto``: data, batches, the step's forward and backward, eval."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.name = config.method
        self.kind = "kto" if self.name == "kto" else "pairs"
        self.reference: Reference | None = None
        self.table: SequenceLogProbs | None = None  # precomputed, by example index
        self.rows_per_device = config.per_device_train_batch_size
        self.steps_per_batch = 1
        self.step, self.rank = 0, 0
        self.output_dir: Path | None = None
        self.frozen_reference = self.name in REFERENCE_METHODS and config.full_finetuning

    def needs_data(self, step: int) -> bool:
        return True

    # -- data ---------------------------------------------------------------------------
    def tokenize(self, path: str, tokenizer: Any) -> tuple[list[Any], Any]:
        from sloth_core import data

        config = self.config
        try:
            return data.tokenize_preferences(
                data.load_records(path), tokenizer, kind=self.kind,
                max_length=config.max_seq_length,
                max_prompt_length=config.max_prompt_length or None,
                max_completion_length=config.max_completion_length or None,
                truncation_mode=config.truncation_mode,
                chat_template=config.chat_template or None,
            )  # fmt: skip
        except data.DataError as exc:  # "row 3: ...": name the file too
            if path in str(exc):
                raise
            raise data.DataError(f"{path}: {exc}") from None

    def batches(self, examples: list[Any], *, batch_size: int, pad_token_id: int, seed: int,
                train: bool) -> Any:  # fmt: skip
        from sloth_core.data import PreferenceBatches

        return PreferenceBatches(
            examples, batch_size=batch_size, pad_token_id=pad_token_id, seed=seed, shuffle=train,
            max_length=self.config.max_seq_length,  # KTO's KL rows, cut as TRL's collator does
        )  # fmt: skip

    # -- model --------------------------------------------------------------------------
    def attach(self, model: Any) -> None:
        """Before any checkpoint's tensors load: the reference is the model as loaded."""
        if self.name in REFERENCE_METHODS:
            try:
                self.reference = Reference(model, full_finetuning=self.config.full_finetuning)
            except TypeError as exc:
                raise ConfigError(f"method={self.name!r}: {exc}") from None

    def forward_shape(self, examples: list[Any], model: Any) -> tuple[int, int]:
        """Pairs with the prompt shared: a row a pair, the prompt less its last token then
        each completion after its own copy of it (``pack_pairs``); apart: chosen and
        rejected rows, each prompt + completion. KTO: each completion and its KL row, the
        KL row up to ``max_seq_length``."""
        rows, limit = self.rows_per_device, self.config.max_seq_length
        if self.kind == "kto" or not examples:
            return 2 * rows, limit
        if self.config.share_prompt and policy_shares_prompt(model):
            width = max(len(e.prompt) + len(e.chosen) + len(e.rejected) + 1 for e in examples)
            return rows, width
        return 2 * rows, max(len(e.prompt) + max(len(e.chosen), len(e.rejected))
                             for e in examples)  # fmt: skip

    def precompute(self, batches: Any, count: int, autocast: Any) -> None:
        """``precompute_ref_log_probs``: the reference's log-probs of every training row,
        once, in data order (not the KTO KL rows: their pairing changes with each batch)."""
        if not (self.config.precompute_ref_log_probs and self.reference is not None):
            return
        rows = 2 if self.kind == "pairs" else 1
        sums, counts = torch.zeros(count, rows), torch.zeros(count, rows, dtype=torch.long)
        device = _device(self.reference.model)
        for number in range(batches.num_batches()):
            batch = _to(batches.batch(0, number), device)
            with autocast():
                ref = self._reference(batch, None)
            index = batch["index"].cpu()
            sums[index] = ref.sums.float().cpu().view(len(index), rows)
            counts[index] = ref.counts.cpu().view(len(index), rows)
        self.table = SequenceLogProbs(sums, counts)

    # -- step ---------------------------------------------------------------------------
    def forward_backward(
        self,
        model: Any,
        micro_batches: list[dict[str, torch.Tensor]],
        *,
        autocast: Any = contextlib.nullcontext,
        group: Any = None,
    ) -> tuple[float, dict[str, float]]:
        """Forward and backward every micro-batch of one optimizer step; its loss (this
        rank's share) and metrics (every rank's)."""
        device = _device(model)
        batches = [_to(batch, device) for batch in micro_batches]
        totals = self._totals(batches, group)
        sums, loss_sum = Sums(), 0.0
        for number, batch in enumerate(batches):
            with distributed.no_sync(model, last=number == len(batches) - 1):
                with autocast():
                    loss = self._loss(model, batch, totals, sums, group, table=self.table)
                loss.backward()
            loss_sum += float(loss.detach())
        return loss_sum, sums.means(group)

    @torch.no_grad()
    def evaluate(self, model: Any, batches: Any, *, autocast: Any) -> dict[str, float]:
        """The preference loss and metrics over every eval batch (live reference)."""
        device = _device(model)
        with evaluating(model):
            every = [_to(batches.batch(0, i), device) for i in range(batches.num_batches())]
            totals = self._totals(every, None)
            sums, loss_sum = Sums(), 0.0
            for batch in every:
                with autocast():
                    loss_sum += float(self._loss(model, batch, totals, sums, None, table=None))
        return {"eval_loss": loss_sum, **{f"eval_{k}": v for k, v in sums.means().items()}}

    @staticmethod
    def eval_line(when: str, metrics: dict[str, float]) -> str:
        line = f"eval {when}: loss {metrics['eval_loss']:.4f}"
        if "eval_rewards/accuracies" in metrics:
            line += f", reward accuracy {metrics['eval_rewards/accuracies']:.1%}"
        if "eval_rewards/margins" in metrics:
            line += f", margin {metrics['eval_rewards/margins']:.3f}"
        return line

    def _totals(self, batches: list[dict[str, torch.Tensor]], group: Any) -> dict[str, float]:
        """The step's denominators: its examples and (ORPO) chosen label tokens."""
        examples = sum(int(_valid(b).sum()) for b in batches)
        chosen = 0
        if self.kind == "pairs":
            chosen = sum(int((b["labels"][:, 0, 1:] != IGNORE_INDEX).sum()) for b in batches)
        if group is not None and group.active:
            examples, chosen = (int(x) for x in group.all_sum([examples, chosen]))
        return {"examples": max(examples, 1), "chosen_tokens": max(chosen, 1)}

    def _loss(
        self, model: Any, batch: dict[str, torch.Tensor], totals: dict[str, float], sums: Sums,
        group: Any, *, table: SequenceLogProbs | None,
    ) -> torch.Tensor:  # fmt: skip
        if self.kind == "kto":
            out, policy, valid = self._kto(model, batch, sums, group, table)
        else:
            out, policy, valid = self._pairs(model, batch, totals, sums, table)
        loss = (out.losses * valid).sum() / totals["examples"]
        if self.name == "orpo":
            chosen = -policy.sums.view(-1, 2)[:, 0].sum()  # the chosen tokens' summed NLL
            sums.add_total(
                "nll_loss", float(chosen.detach()), float(policy.counts.view(-1, 2)[:, 0].sum())
            )
            loss = loss + chosen / totals["chosen_tokens"]
        if policy.aux_loss is not None:  # MoE: the router's load-balancing loss, per example
            share = valid.sum() / totals["examples"]
            coef = _unwrap_config(model).router_aux_loss_coef
            loss = loss + coef * policy.aux_loss.to(loss.device) * share
        return loss

    def _shared(self, model: Any, batch: dict[str, torch.Tensor]) -> bool:
        """Whether ``batch``'s pairs go one row a pair, the prompt once (``share_prompt``)."""
        return (self.config.share_prompt and self.kind == "pairs"
                and batch["input_ids"].dim() == 3 and policy_shares_prompt(model))  # fmt: skip

    def _pairs(self, model, batch, totals, sums, table):
        config, name = self.config, self.name
        if self._shared(model, batch):
            policy = pair_log_probs(model, *_pair_rows(batch))
        else:
            policy = sequence_log_probs(model, *_rows(batch))
        valid = _valid(batch).to(policy.sums.dtype)
        # ORPO, SimPO and IPO compare length-averaged log-probs (as TRL does).
        average = name in ("orpo", "simpo") or (name == "dpo" and config.loss_kind == "ipo")

        def split(logps: SequenceLogProbs) -> tuple[torch.Tensor, torch.Tensor]:
            values = logps.means if average else logps.sums
            pair = values.view(-1, 2)
            return pair[:, 0], pair[:, 1]

        chosen, rejected = split(policy)
        if name == "dpo":
            ref = self._reference(batch, table)
            ref_chosen, ref_rejected = split(ref)
            out = losses.dpo_losses(
                chosen, rejected, ref_chosen, ref_rejected, beta=config.kl_beta,
                loss_type=config.loss_kind, label_smoothing=config.label_smoothing,
            )  # fmt: skip
        elif name == "orpo":
            out, log_odds = losses.orpo_losses(chosen, rejected, beta=config.kl_beta)
            sums.add("log_odds_ratio", torch.nn.functional.logsigmoid(log_odds)[valid.bool()])
            sums.add("log_odds_chosen", log_odds[valid.bool()])
        else:
            out = losses.simpo_losses(
                chosen, rejected, beta=config.kl_beta, gamma=config.simpo_gamma,
                label_smoothing=config.label_smoothing,
            )  # fmt: skip
        keep = valid.bool()
        sums.add("rewards/chosen", out.chosen_rewards[keep])
        sums.add("rewards/rejected", out.rejected_rewards[keep])
        sums.add("rewards/margins", (out.chosen_rewards - out.rejected_rewards)[keep])
        sums.add("rewards/accuracies", (out.chosen_rewards > out.rejected_rewards)[keep].float())
        sums.add("logps/chosen", chosen.detach()[keep])
        sums.add("logps/rejected", rejected.detach()[keep])
        return out, policy, valid

    def _kto(self, model, batch, sums, group, table):
        config = self.config
        policy = sequence_log_probs(model, *_rows(batch))
        valid = _valid(batch).to(policy.sums.dtype)
        ref = self._reference(batch, table)
        kl_rows = (batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
        with torch.no_grad():  # TRL: the KL estimate carries no gradient
            kl_policy = sequence_log_probs(model, *kl_rows)
        assert self.reference is not None
        kl_ref = self.reference.log_probs(*kl_rows)
        kl_valid = (kl_rows[2] != IGNORE_INDEX).any(-1)
        raw = [float((kl_policy.sums - kl_ref.sums)[kl_valid].sum()), float(kl_valid.sum())]
        if group is not None and group.active:  # the mean over every rank's rows, as TRL
            raw = [float(x) for x in group.all_sum(raw)]
        kl = torch.tensor(max(raw[0] / max(raw[1], 1.0), 0.0), device=policy.sums.device)
        desirable = batch["desirable"].bool()
        out = losses.kto_losses(
            policy.sums, ref.sums, desirable, kl, beta=config.kl_beta,
            desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight,
        )  # fmt: skip
        keep = valid.bool()
        rewards = config.kl_beta * (policy.sums - ref.sums).detach()
        good, bad = keep & desirable, keep & ~desirable
        sums.add("rewards/chosen", rewards[good])
        sums.add("rewards/rejected", rewards[bad])
        # A desirable completion is told right when its implicit reward is positive, an
        # undesirable one when negative (the reference scores 0).
        right = torch.where(desirable, rewards > 0, rewards < 0)
        sums.add("rewards/accuracies", right[keep].float())
        sums.add("logps/chosen", policy.sums.detach()[good])
        sums.add("logps/rejected", policy.sums.detach()[bad])
        sums.add("kl", kl.reshape(1))
        return out, policy, valid

    def _reference(self, batch: dict[str, torch.Tensor], table: SequenceLogProbs | None):
        if table is not None:
            index = batch["index"].cpu()
            device = batch["input_ids"].device
            return SequenceLogProbs(
                table.sums[index].reshape(-1).to(device), table.counts[index].reshape(-1).to(device)
            )  # fmt: skip
        assert self.reference is not None
        if self.config.share_prompt and self.kind == "pairs" and self.reference.shares_prompt():
            return self.reference.pair_log_probs(*_pair_rows(batch))
        return self.reference.log_probs(*_rows(batch))


def _rows(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` as model rows (a pair's two side by side)."""
    return tuple(  # type: ignore[return-value]
        batch[key].flatten(0, 1) if batch[key].dim() == 3 else batch[key]
        for key in ("input_ids", "attention_mask", "labels")
    )


def _pair_rows(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` as ``[B, 2, L]`` pairs."""
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


def _valid(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Examples with label tokens on every row (a rank's padding example has none)."""
    labels = batch["labels"][..., 1:] != IGNORE_INDEX
    found = labels.any(-1)
    return found.all(-1) if found.dim() == 2 else found


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _device(model: Any) -> torch.device:
    return next(p for p in model.parameters()).device


def _unwrap_config(model: Any) -> Any:
    return getattr(model, "module", model).config

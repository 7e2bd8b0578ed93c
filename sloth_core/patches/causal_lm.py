"""``*ForCausalLM`` forwards whose loss never materialises the full logits.

With ``labels`` the loss comes from the ``compute_loss`` hook of the plugin manager that
patched the model (bound on the module at patch time, :func:`bind_loss`; no global is
read at run time), on the last hidden states (by default the chunked
``fused_linear_cross_entropy`` op). In training,
where only the loss is used, the ``[batch, seq, vocab]`` logits are not computed at all
(``logits=None``); in eval they are computed as transformers does, beside the same loss.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import TYPE_CHECKING, Any

import torch

from sloth_core.errors import SlothError
from sloth_core.patching import bind_forward, call_original
from sloth_core.weight_epochs import new_weight_epoch

from .attention import PACKED_ROWS_KWARG, packed_rows, plain_positions
from .lm_head import counted_labels
from .moe import router_aux_loss

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Set to ``1`` to get logits in training too (for code that reads them beside the loss).
RETURN_LOGITS_ENV = "SLOTH_RETURN_LOGITS"
_KEEP_LOGITS = "_sloth_keep_logits"
#: The ``compute_loss`` a patched causal LM calls, bound by the manager that patched it.
_LOSS = "_sloth_compute_loss"
#: Its per-token log-probabilities of the labels (preference and RL losses), bound alike.
_LOG_PROBS = "_sloth_log_probs"
#: The keyword asking a patched forward for ``log_probs`` instead of the loss.
LOG_PROBS_KWARG = "sloth_log_probs"
_PATCHED = "_sloth_causal_lm"


def bind_loss(model: torch.nn.Module, compute_loss: Any, log_probs: Any = None) -> int:
    """Make ``compute_loss`` the loss (and ``log_probs`` the token log-probabilities) of
    every causal LM in ``model`` patched here; returns how many. The plugin manager calls
    it after ``patch_layers`` with its own hook and op registry."""
    bound = 0
    for module in model.modules():
        if module.__dict__.get(_PATCHED):
            module.__dict__[_LOSS] = compute_loss
            if log_probs is not None:
                module.__dict__[_LOG_PROBS] = log_probs
            bound += 1
    return bound


def serves_log_probs(model: torch.nn.Module) -> bool:
    """Whether a causal LM in ``model`` answers ``sloth_log_probs=True`` (patched and bound)."""
    return any(module.__dict__.get(_LOG_PROBS) is not None for module in model.modules())


def _slice_hidden(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    # transformers >= 5.2x has slice_logits_to_keep (2D index and bool masks too); 5.17
    # slices inline with an int or a 1D index.
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        slice_indices = (
            slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        )
        return hidden_states[:, slice_indices, :]
    return slice_logits_to_keep(hidden_states, logits_to_keep)


def _training_positions(input_ids: Any, position_ids: Any, attention_mask: Any,
                        kwargs: dict[str, Any]) -> Any:  # fmt: skip
    """The position ids a training forward passes down, with whether their rows are packed
    found now, before the forward's first matrix product (finding out reads the device):
    plain ones made here when none came and no cache or cache position sets them, as the
    model would make them, known unpacked without asking; given ones checked here, and
    packed ones' sequence bounds found. Packed rows without a 2D ``attention_mask`` are
    named to the attention (``kwargs``) as the mask's whole content, which it would
    otherwise compare with transformers' mask by reading the device, layers in."""
    source = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if not isinstance(source, torch.Tensor) or source.dim() < 2:
        return position_ids
    batch, length = source.shape[:2]
    if position_ids is None:
        if kwargs.get("past_key_values") is None and kwargs.get("cache_position") is None:
            return plain_positions(batch, length, source.device)
    elif isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
        rows = packed_rows(position_ids, batch)
        if rows is not None and source.is_cuda:
            rows.varlen()  # the flash varlen kernels' bounds (CUDA only) read back here too
        if rows is not None and attention_mask is None and kwargs.get("past_key_values") is None:
            kwargs[PACKED_ROWS_KWARG] = rows
    return position_ids


def causal_lm_logits(module: PreTrainedModel, hidden_states: torch.Tensor) -> torch.Tensor:
    """The output head applied to ``hidden_states``, with ``final_logit_softcapping`` if set."""
    logits = module.get_output_embeddings()(hidden_states)
    softcap = getattr(module.config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _output_class(moe: bool) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    return MoeCausalLMOutputWithPast if moe else CausalLMOutputWithPast


def patch_causal_lm(
    module: torch.nn.Module,
    *,
    decoder: str = "model",
    keep_logits: bool = False,
    compute_loss: Any = None,
) -> bool:
    """Replace a ``*ForCausalLM`` forward with one that computes the loss via ``compute_loss``.

    Same arguments and outputs as transformers' forward: unshifted ``labels`` with -100
    ignored, ``num_items_in_batch`` (Trainer's gradient-accumulation normaliser) passed to
    the loss, ``logits_to_keep``, ``return_dict``, the cache under whichever name the
    installed transformers uses (``cache`` or ``past_key_values``). Differences: with
    ``labels`` in training mode ``logits`` is ``None`` unless ``keep_logits`` or the
    environment variable ``SLOTH_RETURN_LOGITS=1``; the loss is computed from the hidden
    states even in eval; in training ``use_cache`` defaults to ``False``. With ``labels`` and
    ``sloth_log_probs=True`` (and ``sloth_temperature``) it returns no loss and no logits
    but ``log_probs``, ``[batch, seq]`` fp32: at position ``t`` the log-probability of
    ``labels[:, t + 1]``, 0 where that label is ignored (preference and RL losses), from
    the chunked ``token_log_probs`` op bound by the manager. The original
    forward runs when the caller passes positional arguments past ``position_ids`` or
    pre-shifted ``shift_labels``.

    Calling it again on a patched module only updates ``keep_logits`` and returns ``False``.

    Args:
        module: the causal LM (``config``, ``get_output_embeddings()``, the decoder).
        decoder: the attribute holding the decoder model (``model`` in transformers 5).
        keep_logits: always return logits with the loss (PEFT's prompt-learning methods such
            as CPT compute their own loss from ``outputs.logits``).
        compute_loss: the loss to call (the keywords of the ``compute_loss`` hook but
            ``ops``); the plugin manager that runs ``patch_layers`` binds its own.
    """
    module.__dict__[_PATCHED] = True
    if compute_loss is not None:
        module.__dict__[_LOSS] = compute_loss
    if keep_logits:
        module.__dict__[_KEEP_LOGITS] = True
    else:
        module.__dict__.pop(_KEEP_LOGITS, None)
    # MoE causal LMs (a config with output_router_logits) return the router logits and
    # add the load-balancing loss as their modeling file does (see router_aux_loss).
    moe = hasattr(getattr(module, "config", None), "output_router_logits")
    output_class = _output_class(moe)
    fields = frozenset(f.name for f in dataclasses.fields(output_class))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, *args, **kwargs):
        new_weight_epoch()  # what a fused op derived from the weights before is stale now
        if args or "shift_labels" in kwargs:
            return call_original(self, input_ids, attention_mask, position_ids, *args, **kwargs)
        labels = kwargs.pop("labels", None)
        want_log_probs = kwargs.pop(LOG_PROBS_KWARG, False)
        temperature = kwargs.pop("sloth_temperature", 1.0)
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if self.training:
            # No KV cache in training: it is never read, and transformers only separates
            # packed sequences (position_ids restarting) in its masks when there is none.
            kwargs.setdefault("use_cache", False)
            position_ids = _training_positions(input_ids, position_ids, attention_mask, kwargs)
        if isinstance(labels, torch.Tensor):
            # Counted now, read back at the loss without a sync (lm_head.CountedLabels).
            counted_labels(labels)
        if moe and kwargs.get("output_router_logits") is None:
            kwargs["output_router_logits"] = self.config.output_router_logits
        outputs = getattr(self, decoder)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = logits = token_log_probs = None
        if want_log_probs:
            token_log_probs = _log_probs(self, hidden_states, labels, temperature)
        elif labels is not None:
            compute_loss = self.__dict__.get(_LOSS)
            if compute_loss is None:
                raise SlothError(
                    f"{type(self).__name__} was patched outside a plugin manager, so it has no "
                    "loss: patch it through manager.patch_layers (or pass compute_loss=)"
                )
            loss = compute_loss(
                model=self,
                hidden_states=hidden_states,
                labels=labels,
                num_items_in_batch=num_items_in_batch,
            )
        skip_logits = want_log_probs or (
            labels is not None
            and self.training
            and not self.__dict__.get(_KEEP_LOGITS, False)
            and os.environ.get(RETURN_LOGITS_ENV, "") in ("", "0")
        )
        if not skip_logits:
            logits = causal_lm_logits(self, _slice_hidden(hidden_states, logits_to_keep))
        extra = {}
        if moe:
            aux_loss = router_aux_loss(self, outputs, attention_mask)
            if aux_loss is not None and loss is not None:
                # the logits made in a no-grad first pass
                if loss.requires_grad and not aux_loss.requires_grad:
                    warnings.warn(
                        "the load-balancing loss (output_router_logits) passes no gradient "
                        "back: its router logits were made without gradients (a "
                        "checkpointed layer whose MoE block sloth did not patch); train "
                        "without gradient checkpointing, or set output_router_logits=False",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
            extra["aux_loss"] = aux_loss
        rest = {k: v for k, v in outputs.items() if k in fields and k not in ("loss", "logits")}
        output = output_class(loss=loss, logits=logits, **extra, **rest)
        if token_log_probs is not None:
            output["log_probs"] = token_log_probs  # a key, so DDP and to_tuple see it
            return output
        return output if return_dict else output.to_tuple()

    return bind_forward(module, forward)


def _log_probs(
    module: torch.nn.Module, hidden_states: torch.Tensor, labels: Any, temperature: float
) -> torch.Tensor:
    log_probs = module.__dict__.get(_LOG_PROBS)
    if labels is None or log_probs is None:
        why = "labels" if labels is None else "a log-prob function: patch it through a manager"
        raise SlothError(f"{type(module).__name__}: sloth_log_probs=True needs {why}")
    return log_probs(
        model=module, hidden_states=hidden_states, labels=labels, temperature=temperature
    )


def prompt_learning(model: Any) -> bool:
    """Whether ``model`` is a PEFT model whose active adapter is prompt learning (CPT, ...).

    Those wrappers read ``outputs.logits`` themselves: the causal-LM patch must keep them.
    """
    config = getattr(model, "active_peft_config", None) if hasattr(model, "peft_config") else None
    return bool(getattr(config, "is_prompt_learning", False))

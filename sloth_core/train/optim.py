"""The optimizer and the learning-rate schedule of ``sloth train``."""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import ConfigError, TrainConfig

#: Names of the parameters that get ``embedding_learning_rate`` (trained in full beside LoRA).
_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_out")


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters: embeddings/lm_head at ``embedding_learning_rate`` when set;
    no weight decay on biases and norms (1-D tensors), as transformers' Trainer does."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = config.learning_rate
        if config.embedding_learning_rate and any(part in name for part in _EMBEDDING_NAMES):
            lr = config.embedding_learning_rate
        decay = 0.0 if param.ndim < 2 else config.weight_decay
        groups.setdefault((lr, decay), []).append(param)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: torch's fused kernel where the parameters allow, or bitsandbytes' 8-bit."""
    groups = parameter_groups(model, config)
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optim == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "optim='adamw_8bit' needs bitsandbytes (pip install bitsandbytes)"
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=config.learning_rate, betas=betas)
    fused = config.optim == "adamw_torch_fused" and _fusable(
        [p for g in groups for p in g["params"]]
    )
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, fused=fused or None)


def default_adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW as ``sloth train`` and transformers' Trainer (``adamw_torch_fused``, its default
    on torch >= 2.8) run it unasked: torch's fused kernel where the parameters allow.

    The benches give it to every system, so that each is timed with the optimizer its
    users get. The fused step reads each parameter, gradient and moment once; the foreach
    one makes several passes and, over a large adapter set, a temporary as large as the
    parameters (3.7 GiB for LoRA on every expert of qwen3-30b-a3b).
    """
    return torch.optim.AdamW(params, lr=lr, fused=_fusable(params) or None)


def _fusable(params: list[torch.nn.Parameter]) -> bool:
    # The fused AdamW takes floating tensors on CUDA (and, in recent torch, the CPU); one
    # device type for all.
    devices = {p.device.type for p in params}
    return (
        len(devices) == 1
        and devices <= {"cuda", "cpu"}
        and all(p.is_floating_point() for p in params)
    )


def lr_lambda(config: TrainConfig, total_steps: int):
    """The multiplier of the peak learning rate at each step (warm-up, then the schedule)."""
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    kind = config.lr_scheduler_type

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))

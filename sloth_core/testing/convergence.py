"""Convergence: train the patched and the unpatched tiny model side by side.

Parity (:mod:`.parity`) compares one step; this compares thirty. Both models start from
the same weights and the same LoRA adapters, see the same batches of the bundled
instruction data (:func:`~.datasets.load_tiny_instructions`, chat template of
:func:`~.tokenizer.build_tokenizer`, loss on the assistant turns only), and take the same
AdamW steps. A bug that parity misses by a hair (a gradient slightly off, an optimizer
state that a patch breaks, a patch that stops working after the first step) shows as
losses that drift apart.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from sloth_core.plugins import SlothPluginManager

from .datasets import load_tiny_instructions, to_messages
from .models import init_tiny_model
from .parity import _require_kernels, attach_lora, kernels_mode
from .tokenizer import build_tokenizer

__all__ = ["CONVERGENCE_RTOL", "assert_converges_alike", "convergence_losses", "tokenize_rows"]

#: Largest per-step relative difference ``|patched - unpatched| / unpatched`` allowed.
#: fp32: sloth-llama stays within 2e-7 a step over the 30 steps, with the torch references
#: and with the Triton kernels (interpreter): rounding differences do not grow, as Adam's
#: step is bounded by the learning rate and the loss is smooth in the weights. 1e-4 leaves
#: 500x room for other summation orders (GPU); a 1e-3 error in one module (an MLP output
#: scaled by 1.001) drifts to 7e-4 and fails. No default below fp32: bf16's own noise
#: (~1e-3 of the loss a step) would need a bound too loose to mean much; the parity
#: harness compares bf16 against fp32 instead.
CONVERGENCE_RTOL = {torch.float32: 1e-4}


def tokenize_rows(rows: list[dict[str, str]], tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per row: the chat template, labels on the assistant turn."""
    out = []
    for row in rows:
        enc = tokenizer.apply_chat_template(
            to_messages(row), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(enc["input_ids"])
        labels = [t if m else -100 for t, m in zip(ids, enc["assistant_masks"], strict=True)]
        out.append((ids, labels))
    return out


def _batches(examples, steps: int, batch_size: int, seed: int, pad_id: int, device):
    # One fixed order from the seed, cycled if the steps need more than one epoch.
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for step in range(steps):
        picked = [examples[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
        width = max(len(ids) for ids, _ in picked)
        ids = torch.full((batch_size, width), pad_id)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(picked):  # right padding, as in training
            ids[row, : len(row_ids)] = torch.tensor(row_ids)
            labels[row, : len(row_labels)] = torch.tensor(row_labels)
            mask[row, : len(row_ids)] = 1
        yield {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "labels": labels.to(device),
        }


def _train(config, batches, *, manager, seed, lora_r, lr, dtype, device) -> list[float]:
    model = init_tiny_model(config, seed=seed, dtype=dtype).to(device)
    if manager is not None:
        manager.patch_layers(model=model)
    model = attach_lora(model, r=lora_r, seed=seed, random_b=False)
    if manager is not None:
        manager.patch_layers(model=model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def convergence_losses(
    config: Any,
    *,
    manager: SlothPluginManager | None = None,
    steps: int = 30,
    lr: float = 1e-2,
    seed: int = 0,
    data: list[dict[str, str]] | None = None,
    kernels: str = "torch",
    batch_size: int = 8,
    lora_r: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[list[float], list[float]]:
    """Train LoRA on the unpatched and on the patched model; return both loss curves.

    Args:
        config: a tiny ``transformers.PretrainedConfig`` whose vocabulary covers
            :func:`build_tokenizer`'s (``tiny_config(arch)`` does).
        manager: the plugins to patch with; by default every installed plugin.
        steps: optimizer steps (AdamW, no weight decay), one batch each.
        lr: learning rate; high, so that a tiny model's loss visibly falls in 30 steps.
        seed: weights, LoRA ``A`` (``B`` starts at zero) and batch order.
        data: rows with ``instruction``/``input``/``output``; the bundled set by default.
        kernels: ``"torch"`` forces the references, ``"triton"`` uses registered kernels
            (see :func:`~.parity.kernels_mode`).
        batch_size, lora_r, dtype, device: as named; device defaults to cuda if present.

    Returns:
        ``(unpatched_losses, patched_losses)``, one float per step.

    Raises:
        ParitySkipped: ``kernels`` asks for kernels that do not serve this device/dtype.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    manager = manager if manager is not None else SlothPluginManager(entry_points=True)
    tokenizer = build_tokenizer()
    examples = tokenize_rows(data if data is not None else load_tiny_instructions(), tokenizer)
    if max(max(ids) for ids, _ in examples) >= config.vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size} does not cover the tokenizer")

    def train(patch_with: SlothPluginManager | None) -> list[float]:
        batches = _batches(examples, steps, batch_size, seed, tokenizer.pad_token_id, device)
        options = dict(seed=seed, lora_r=lora_r, lr=lr, dtype=dtype, device=device)
        return _train(config, batches, manager=patch_with, **options)

    with kernels_mode(kernels):
        if kernels != "torch":
            _require_kernels(manager, device, dtype)  # else ParitySkipped, as in parity
        return train(None), train(manager)


def assert_converges_alike(
    config: Any, *, rtol: float | None = None, min_drop: float = 0.15, **kwargs: Any
) -> tuple[list[float], list[float]]:
    """:func:`convergence_losses`, then assert the curves agree and the loss went down.

    Args:
        rtol: per-step ``|patched - unpatched| / unpatched`` bound; by default
            :data:`CONVERGENCE_RTOL` of the dtype.
        min_drop: the mean loss of the last 5 steps must be below the first 5 steps' mean
            by at least this fraction. The tiny llama falls ~21 % (6.26 to 4.92) with
            the defaults: its embeddings and head are random and frozen, so LoRA alone
            learns the format and frequent tokens, not the answers.
        **kwargs: passed to :func:`convergence_losses`.
    """
    dtype = kwargs.get("dtype", torch.float32)
    if rtol is None and dtype not in CONVERGENCE_RTOL:
        raise ValueError(f"no default rtol for {dtype}: pass rtol= (see CONVERGENCE_RTOL)")
    rtol = rtol if rtol is not None else CONVERGENCE_RTOL[dtype]
    unpatched, patched = convergence_losses(config, **kwargs)
    rel = [abs(p - u) / abs(u) for u, p in zip(unpatched, patched, strict=True)]
    worst = max(range(len(rel)), key=rel.__getitem__)
    table = "\n".join(
        f"step {i:>2}: unpatched {u:.6f} patched {p:.6f} rel {r:.2e}"
        for i, (u, p, r) in enumerate(zip(unpatched, patched, rel, strict=True))
    )
    assert rel[worst] <= rtol, f"losses drift apart at step {worst} (rtol {rtol}):\n{table}"
    head, tail = sum(patched[:5]) / 5, sum(patched[-5:]) / 5
    assert tail <= (1 - min_drop) * head, f"loss did not fall by {min_drop:.0%}:\n{table}"
    return unpatched, patched

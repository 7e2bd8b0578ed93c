"""Attention with logit softcapping (Gemma 2), for ``sloth_attention``.

PyTorch's SDPA kernels cannot apply ``softcap * tanh(scores / softcap)`` before the
softmax, and transformers' ``sdpa`` refuses a softcap, leaving Gemma 2 on ``eager``
attention: a ``[B, H, S, S]`` score matrix per layer. Here the softcap runs inside
``torch.nn.attention.flex_attention`` on CUDA (compiled once; its block mask carries the
causal, sliding-window, packed-row and padding structure of the boolean mask
``sloth_attention`` received), so no score matrix is ever stored. Elsewhere (the CPU, dropout,
a float mask, tiny problems, or a flex failure) the same math runs eagerly, exactly as
transformers' ``eager_attention_forward`` computes it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from .tensor_memo import memo

#: Score matrices smaller than this (elements, ``B * Hq * Sq * Skv``) are computed eagerly
#: on CUDA too: cheaper than flex's launch and block-mask set-up, and no compile per shape.
FLEX_MIN_SCORES = 1 << 22

_compiled_flex: Any = None
_flex_failures: set[tuple[int, torch.dtype]] = set()
_causal_masks: dict[tuple[Any, ...], Any] = {}


def _flex_attention() -> Any:
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        # One compiled function for every layer; shapes that change recompile once each.
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _block_mask(mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device) -> Any:
    """The flex ``BlockMask`` of a boolean ``[B|1, 1, Sq, Skv]`` mask, or of plain causality.

    Cached: every layer of one forward gets the same mask tensor (one per layer type).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if mask is None:
        key = (batch, q_len, kv_len, str(device))
        if key not in _causal_masks:
            if len(_causal_masks) > 16:
                _causal_masks.clear()

            def causal(b, h, q, kv):
                return q >= kv

            _causal_masks[key] = create_block_mask(causal, batch, None, q_len, kv_len, device)
        return _causal_masks[key]
    full = mask.expand(batch, 1, q_len, kv_len)

    def from_tensor(b, h, q, kv):
        return full[b, 0, q, kv]

    def build() -> Any:
        return create_block_mask(from_tensor, batch, None, q_len, kv_len, device)

    return memo(mask, "_sloth_block_mask", (batch,), build)


def _flex(query, key, value, mask, *, causal: bool, scaling, softcap: float) -> torch.Tensor:
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    block_mask = None
    if mask is not None or causal:
        block_mask = _block_mask(mask, batch, q_len, kv_len, query.device)

    def score_mod(score, b, h, q, kv):
        return softcap * torch.tanh(score / softcap)

    out = _flex_attention()(
        query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
        enable_gqa=key.shape[1] != heads,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous()


def eager_softcap_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    causal: bool,
    scaling: float | None,
    softcap: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """transformers' eager attention with a softcap: ``[B, Sq, Hq, D]``.

    ``mask``: boolean (``True`` attends) or additive float ``[B|1, 1, Sq, Skv]``; with
    ``None`` and ``causal`` the usual lower-triangular mask. Masked scores take the
    dtype's minimum, as transformers' eager masks do (a fully masked padding row gives a
    uniform average, not NaN).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and causal:
        q_len, kv_len = scores.shape[-2:]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device)
        mask = mask.tril(kv_len - q_len)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask[..., : key.shape[-2]]
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout, training=True)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


def softcap_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    causal: bool,
    scaling: float | None,
    softcap: float,
    dropout: float = 0.0,
    use_flex: bool | None = None,
) -> torch.Tensor:
    """Softcapped attention, ``[B, Sq, Hq, D]``: flex on CUDA, else eager (same math).

    Args:
        query, key, value: ``[B, Hq, Sq, D]``, ``[B, Hk, Skv, D]`` (GQA: ``Hq`` a multiple
            of ``Hk``).
        mask: boolean or additive ``[B|1, 1, Sq, Skv]``, or ``None``.
        causal: with ``mask=None``, attend only to the past.
        scaling: the score scale (``None``: ``1/sqrt(D)``).
        softcap: the cap; scores become ``softcap * tanh(scores / softcap)``.
        dropout: attention dropout probability (eager only).
        use_flex: force (``True``) or forbid (``False``) flex attention; by default flex
            runs for CUDA half-precision inputs without dropout, with a boolean mask or
            none, and at least :data:`FLEX_MIN_SCORES` scores.
    """
    if use_flex is None:
        scores = query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2]
        use_flex = (
            query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
            and scores >= FLEX_MIN_SCORES
        )
    failure_key = (query.shape[-1], query.dtype)
    plain_mask = mask is None or mask.dtype == torch.bool
    if use_flex and dropout == 0.0 and plain_mask and failure_key not in _flex_failures:
        try:
            return _flex(query, key, value, mask, causal=causal, scaling=scaling, softcap=softcap)
        except Exception as exc:  # noqa: BLE001 - any compile/launch failure: eager is exact
            _flex_failures.add(failure_key)
            warnings.warn(
                f"sloth_attention: flex attention failed for head_dim {query.shape[-1]} "
                f"({type(exc).__name__}: {exc}); softcapped attention runs eagerly",
                stacklevel=2,
            )
    return eager_softcap_attention(
        query, key, value, mask, causal=causal, scaling=scaling, softcap=softcap, dropout=dropout
    )

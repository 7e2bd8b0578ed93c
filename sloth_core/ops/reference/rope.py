"""Reference rotary position embedding, full or partial, with packed-sequence positions."""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return (x * cos) + (_rotate_half(x) * sin)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat(((x_rot * cos) + (_rotate_half(x_rot) * sin), x_pass), dim=-1)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their positions, as transformers' ``apply_rotary_pos_emb``.

    With ``R == D`` this equals ``transformers.models.llama.modeling_llama.
    apply_rotary_pos_emb``; with ``R < D`` it equals Phi-3's partial rotary version: only the
    first ``R`` dims are rotated (``rotate_half`` over those ``R``), the rest pass through.

    Args:
        q: ``[B, Hq, S, D]`` (``unsqueeze_dim=1``) or ``[B, S, Hq, D]`` (``unsqueeze_dim=2``).
        k: ``[B, Hk, S, D]`` or ``[B, S, Hk, D]``, laid out like ``q``.
        cos: ``[B, S, R]`` as the rotary embedding module returns it (already gathered at
            the position ids), or, when ``position_ids`` is given, a table ``[P, R]``.
        sin: same shape as ``cos``.
        position_ids: ``[B, S]`` integer positions into the ``[P, R]`` tables; packed
            sequences restart their positions inside a row.
        unsqueeze_dim: the heads dimension of ``q``/``k``, where ``cos``/``sin`` broadcast.

    Returns:
        ``(q_embed, k_embed)``, new tensors shaped like ``q`` and ``k``, in their dtypes
        (``cos``/``sin`` are cast to them, as the rotary module returns them in ``x.dtype``).
    """
    if position_ids is not None:
        if cos.dim() != 2 or sin.dim() != 2:
            raise ValueError(
                "with position_ids, cos and sin must be [P, R] tables, "
                f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
            )
        cos, sin = cos[position_ids], sin[position_ids]
    rotary_dim = cos.shape[-1]
    if rotary_dim > q.shape[-1] or rotary_dim % 2:
        raise ValueError(f"rotary dim {rotary_dim} must be even and <= head dim {q.shape[-1]}")
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    q_embed = _rotate(q, cos.to(q.dtype), sin.to(q.dtype))
    k_embed = _rotate(k, cos.to(k.dtype), sin.to(k.dtype))
    return q_embed, k_embed

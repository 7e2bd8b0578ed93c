"""Uneven top-k routings for mixture-of-experts tests: the cases a grouped GEMM gets wrong.

Real routers spread tokens evenly enough that an off-by-one in a kernel's per-expert
offsets may never show; :func:`uneven_routing` builds the corner cases on purpose.
"""

from __future__ import annotations

import torch


def uneven_routing(tokens: int, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A routing where expert 0 takes most tokens, expert 1 one token and the last none.

    Every token picks ``top_k`` distinct experts; besides the three above, the choices are
    drawn at random (torch's generator) among experts ``2 .. experts - 2``, in random
    slot order, with random positive weights.

    Args:
        tokens: at least 2.
        experts: at least ``top_k + 3``.
        top_k: choices per token.

    Returns:
        ``(top_k_index [tokens, top_k] int64, top_k_weights [tokens, top_k] fp32)``.
    """
    pool = experts - 3  # experts 2 .. experts - 2
    if tokens < 2 or pool < top_k:
        raise ValueError(f"need tokens >= 2 and experts >= top_k + 3, got {tokens}, {experts}")
    rows = []
    for token in range(tokens):
        row = (torch.randperm(pool)[:top_k] + 2).tolist()
        if token < tokens - 1:  # all but the last token: "most tokens"
            row[0] = 0
        if token == 0 and top_k > 1:
            row[1] = 1
        elif token == 0:  # top_k == 1: token 0 goes to expert 1 rather than 0
            row[0] = 1
        rows.append(torch.tensor(row)[torch.randperm(top_k)])
    index = torch.stack(rows)
    weights = torch.rand(tokens, top_k) + 0.1
    return index, weights

"""``sloth_attention``'s packed path through ``varlen_attn``, on the CPU.

The real ``varlen_attn`` runs on CUDA in half precision only (the GPU parity runs assert
that it served packed rows: ``check_plugin_parity``). Here a reference with its calling
convention stands in for it, so the glue is checked everywhere: the flattening, the
``cu_seqlens``, GQA, and the query re-scaling for torch releases whose ``varlen_attn``
takes no ``scale`` (it always applies ``1/sqrt(head_dim)``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sloth_core.patches import attention
from sloth_core.testing.seeds import fresh_seed


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, window_size=None,
                      scale=None, enable_gqa=False):  # fmt: skip
    """``varlen_attn``'s contract: ``[T, H, D]`` rows cut at ``cu_seqlens``, causal."""
    assert is_causal or window_size == (-1, 0)
    if k.shape[1] != q.shape[1]:
        assert enable_gqa, "grouped k/v given to a varlen_attn without enable_gqa"
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        segment = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
        out[a:b] = segment.transpose(0, 1)
    return out


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 13, 8
    query = torch.randn(batch, heads, length, dim, generator=gen)
    key = torch.randn(batch, kv_heads, length, dim, generator=gen)
    value = torch.randn(batch, kv_heads, length, dim, generator=gen)
    positions = torch.cat([torch.arange(5), torch.arange(8)]).repeat(batch, 1)
    positions[1] = torch.cat([torch.arange(9), torch.arange(4)])
    return query, key, value, positions


def _expected(query, key, value, rows, scaling):
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=rows.mask, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize(
    "params",
    [{"is_causal"}, {"window_size", "scale", "enable_gqa"}],
    ids=["old-signature-rescales-q", "new-signature"],
)
@pytest.mark.parametrize("scaling", [0.2, None])
def test_varlen_glue_matches_masked_sdpa(monkeypatch, params, scaling):
    seed = fresh_seed()
    fake = _reference_varlen
    if "scale" not in params:  # torch 2.10's varlen_attn: no scale, no GQA, is_causal

        def fake(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
            return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=is_causal)

    monkeypatch.setattr(attention, "_varlen_attn", fake)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", params)
    query, key, value, positions = _inputs(seed)
    rows = attention.PackedRows(positions)
    out = attention._varlen(query, key, value, rows, scaling)
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    expected = _expected(query, key, value, rows, scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")


def test_packed_rows_go_through_varlen_when_it_is_usable(monkeypatch):
    """The path taken is counted (what the GPU parity runs assert), and its result is the
    masked SDPA result."""
    seed = fresh_seed()
    monkeypatch.setattr(attention, "_varlen_attn", _reference_varlen)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"window_size", "scale", "enable_gqa"})
    monkeypatch.setattr(attention, "_varlen_usable", lambda query, dropout: True)
    query, key, value, positions = _inputs(seed)
    module = torch.nn.Module()
    before = attention.ATTENTION_PATHS["varlen"]
    out, _ = attention.sloth_attention(
        module, query, key, value, None, scaling=0.3, position_ids=positions
    )
    assert attention.ATTENTION_PATHS["varlen"] == before + 1
    rows = attention.PackedRows(positions)
    expected = _expected(query, key, value, rows, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"seed={seed}")

"""Rotary embedding kernel against the torch reference and transformers' own functions."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, assert_close
from sloth_kernels import rope as rope_kernels

from sloth_core.ops import reference

# (batch, seq, q heads, kv heads, head dim, rotary dim, cos/sin form, q/k built by
# view+transpose as transformers does)
CASES = {
    "full-64-bsr": (2, 5, 4, 2, 64, 64, "bsr", False),
    "full-80-packed-table": (2, 9, 5, 1, 80, 80, "table", True),
    "partial-96-of-32-broadcast": (2, 6, 3, 3, 96, 32, "1sr", True),
    "full-128-table-shared-ids": (3, 4, 8, 2, 128, 128, "table-1s", False),
}


def _qk(batch, seq, heads, head_dim, dtype, device, unsqueeze_dim, transposed):
    if transposed:
        # As in attention: proj(x).view(B, S, H, D), then transpose to [B, H, S, D].
        t = (
            torch.randn(batch, seq, heads * head_dim, device=device)
            .to(dtype)
            .view(batch, seq, heads, head_dim)
        )
        t = (
            t.transpose(1, 2)
            if unsqueeze_dim == 1
            else t.transpose(1, 2).contiguous().transpose(1, 2)
        )
    elif unsqueeze_dim == 1:
        t = torch.randn(batch, heads, seq, head_dim, device=device).to(dtype)
    else:
        t = torch.randn(batch, seq, heads, head_dim, device=device).to(dtype)
    return t.requires_grad_()


def _packed_positions(batch, seq, device):
    """Rows of packed sequences whose positions restart at 0 at each boundary."""
    rows = []
    for _ in range(batch):
        cut = int(torch.randint(1, seq, ()).item())
        rows.append(torch.cat([torch.arange(cut), torch.arange(seq - cut)]))
    return torch.stack(rows).to(device)


def _cos_sin(form, batch, seq, rotary, dtype, device):
    """Random tables (not cat(f, f)), so the backward must be the exact transpose."""
    if form.startswith("table"):
        n_pos = 2 * seq
        cos, sin = (torch.randn(n_pos, rotary, device=device).to(dtype) for _ in range(2))
        if form == "table-1s":
            ids = torch.randperm(n_pos, device=device)[:seq].unsqueeze(0)  # [1, S]
        else:
            ids = _packed_positions(batch, seq, device)
        return cos, sin, ids
    lead = 1 if form == "1sr" else batch
    cos, sin = (torch.randn(lead, seq, rotary, device=device).to(dtype) for _ in range(2))
    return cos, sin, None


def _fp32_reference(q, k, cos, sin, ids, unsqueeze_dim, dq_out, dk_out):
    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    q_ref, k_ref = reference.rope(
        q32, k32, cos.float(), sin.float(), ids, unsqueeze_dim=unsqueeze_dim
    )
    torch.autograd.backward((q_ref, k_ref), (dq_out.float(), dk_out.float()))
    return q_ref, k_ref, q32.grad, k32.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2], ids=["bhsd", "bshd"])
@pytest.mark.parametrize("case", list(CASES))
def test_rope_matches_reference(case, unsqueeze_dim, dtype, device):
    batch, seq, hq, hk, head_dim, rotary, form, transposed = CASES[case]
    q = _qk(batch, seq, hq, head_dim, dtype, device, unsqueeze_dim, transposed)
    k = _qk(batch, seq, hk, head_dim, dtype, device, unsqueeze_dim, transposed)
    cos, sin, ids = _cos_sin(form, batch, seq, rotary, dtype, device)
    q_before, k_before = q.detach().clone(), k.detach().clone()

    q_out, k_out = rope_kernels.rope(q, k, cos, sin, ids, unsqueeze_dim=unsqueeze_dim)
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))

    what = f"rope {case} q{tuple(q.shape)} k{tuple(k.shape)} unsqueeze_dim={unsqueeze_dim} {dtype}"
    assert torch.equal(q.detach(), q_before) and torch.equal(k.detach(), k_before), (
        f"{what}: inputs modified"
    )
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype, what
    q_ref, k_ref, dq, dk = _fp32_reference(q, k, cos, sin, ids, unsqueeze_dim, dq_out, dk_out)
    assert_close(q_out, q_ref, dtype, what=f"{what} q")
    assert_close(k_out, k_ref, dtype, what=f"{what} k")
    assert_close(q.grad, dq, dtype, what=f"{what} dq")
    assert_close(k.grad, dk, dtype, what=f"{what} dk")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_transformers_llama(dtype, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    batch, seq, hq, hk, head_dim = 2, 10, 4, 2, 32
    config = LlamaConfig(
        hidden_size=hq * head_dim,
        num_attention_heads=hq,
        num_key_value_heads=hk,
        max_position_embeddings=64,
    )
    rotary = LlamaRotaryEmbedding(config).to(device)
    ids = _packed_positions(batch, seq, device)
    x = torch.randn(batch, seq, hq * head_dim, device=device).to(dtype)
    cos, sin = rotary(x, ids)  # [B, S, D] in x's dtype, gathered at the packed positions
    q = _qk(batch, seq, hq, head_dim, dtype, device, 1, True)
    k = _qk(batch, seq, hk, head_dim, dtype, device, 1, True)
    q_out, k_out = rope_kernels.rope(q, k, cos, sin)
    (q_out.sum() + 2 * k_out.sum()).backward()

    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    q_hf, k_hf = apply_rotary_pos_emb(q32, k32, cos.float(), sin.float())
    (q_hf.sum() + 2 * k_hf.sum()).backward()
    what = f"llama rope q{tuple(q.shape)} k{tuple(k.shape)} {dtype}"
    assert_close(q_out, q_hf, dtype, what=f"{what} q")
    assert_close(k_out, k_hf, dtype, what=f"{what} k")
    assert_close(q.grad, q32.grad, dtype, what=f"{what} dq")
    assert_close(k.grad, k32.grad, dtype, what=f"{what} dk")


def test_rope_cos_requiring_grad_falls_back_to_reference(device):
    q = torch.randn(1, 2, 3, 8, device=device)
    k = torch.randn(1, 1, 3, 8, device=device)
    cos = torch.randn(1, 3, 8, device=device).requires_grad_()
    sin = torch.randn(1, 3, 8, device=device)
    q_out, k_out = rope_kernels.rope(q, k, cos, sin)
    (q_out.sum() + k_out.sum()).backward()
    cos_ref = cos.detach().requires_grad_()
    q_ref, k_ref = reference.rope(q, k, cos_ref, sin)
    (q_ref.sum() + k_ref.sum()).backward()
    assert_close(q_out, q_ref, torch.float32, what="q with trainable cos")
    assert_close(cos.grad, cos_ref.grad, torch.float32, what="dcos")


def test_rope_rejects_odd_rotary_dim(device):
    q = torch.randn(1, 2, 3, 8, device=device)
    cos = torch.randn(1, 3, 5, device=device)
    with pytest.raises(ValueError, match="rotary dim"):
        rope_kernels.rope(q, q, cos, cos)


def test_rope_without_grad(device):
    q = torch.randn(2, 3, 4, 16, device=device, dtype=torch.float16)
    k = torch.randn(2, 3, 1, 16, device=device, dtype=torch.float16)
    cos, sin = (torch.randn(2, 3, 16, device=device, dtype=torch.float16) for _ in range(2))
    with torch.no_grad():
        q_out, k_out = rope_kernels.rope(q, k, cos, sin, unsqueeze_dim=2)
    q_ref, k_ref = reference.rope(q.float(), k.float(), cos.float(), sin.float(), unsqueeze_dim=2)
    assert_close(q_out, q_ref, torch.float16, what="no_grad q")
    assert_close(k_out, k_ref, torch.float16, what="no_grad k")
    # A checkpoint's first pass runs without grad and its recompute with: the same bits.
    q_grad, k_grad = rope_kernels.rope(q.requires_grad_(), k, cos, sin, unsqueeze_dim=2)
    assert q_grad.grad_fn is not None
    assert torch.equal(q_out, q_grad) and torch.equal(k_out, k_grad)


def test_registrations():
    assert [entry["op"] for entry in rope_kernels.REGISTRATIONS] == ["rope"]
    assert set(rope_kernels.REGISTRATIONS[0]["dtypes"]) == set(DTYPES)
    assert rope_kernels.REGISTRATIONS[0]["fn"] is rope_kernels.rope


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("packed", [False, True], ids=["bsr", "packed-table"])
def test_rope_llm_sized(packed, head_dim, dtype, device):
    batch, seq, hq, hk = 2, 4096, 32, 8  # 8192 tokens, GQA 32/8
    q = _qk(batch, seq, hq, head_dim, dtype, device, 1, True)
    k = _qk(batch, seq, hk, head_dim, dtype, device, 1, True)
    if packed:
        positions = torch.arange(seq, device=device).float()
        inv_freq = 1.0 / (
            500000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
        )
        angles = torch.outer(positions, inv_freq).repeat(1, 2)
        cos, sin, ids = (
            angles.cos().to(dtype),
            angles.sin().to(dtype),
            _packed_positions(batch, seq, device),
        )
    else:
        cos, sin, ids = _cos_sin("bsr", batch, seq, head_dim, dtype, device)
    q_out, k_out = rope_kernels.rope(q, k, cos, sin, ids)
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (dq_out, dk_out))
    q_ref, k_ref, dq, dk = _fp32_reference(q, k, cos, sin, ids, 1, dq_out, dk_out)
    what = f"rope q{tuple(q.shape)} k{tuple(k.shape)} packed={packed} {dtype}"
    assert_close(q_out, q_ref, dtype, what=f"{what} q")
    assert_close(k_out, k_ref, dtype, what=f"{what} k")
    assert_close(q.grad, dq, dtype, what=f"{what} dq")
    assert_close(k.grad, dk, dtype, what=f"{what} dk")

"""The rope reference against transformers' apply_rotary_pos_emb (Llama, Phi-3 partial)."""

import pytest
import torch
from _helpers import assert_close as _assert_close
from _helpers import draw as _draw
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

from sloth_core.ops.reference import rope


def _cos_sin(b, s, rotary_dim, max_pos=64):
    """Random positions through standard inverse frequencies, shaped [B, S, R]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.randint(0, max_pos, (b, s, 1)).float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _compare(hf_fn, q, k, cos, sin, what, position_ids=None, hf_cos=None, hf_sin=None, dim=1):
    """Forward and grads of q, k of ``rope`` against ``hf_fn`` on the same inputs."""
    q_ref, k_ref = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_hf, k_hf = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_snapshot, k_snapshot = q_ref.detach().clone(), k_ref.detach().clone()
    out_ref = rope(q_ref, k_ref, cos, sin, position_ids, unsqueeze_dim=dim)
    hf_cos = cos if hf_cos is None else hf_cos
    hf_sin = sin if hf_sin is None else hf_sin
    out_hf = hf_fn(q_hf, k_hf, hf_cos, hf_sin, unsqueeze_dim=dim)
    for name, a, e in zip("qk", out_ref, out_hf, strict=True):
        _assert_close(a, e, f"{what} {name}_embed")
    assert torch.equal(q_ref.detach(), q_snapshot) and torch.equal(k_ref.detach(), k_snapshot), (
        f"{what}: rope modified its inputs"
    )
    upstream = [torch.randn_like(t) for t in out_hf]
    grads_ref = torch.autograd.grad(out_ref, [q_ref, k_ref], upstream)
    grads_hf = torch.autograd.grad(out_hf, [q_hf, k_hf], upstream)
    for name, a, e in zip("qk", grads_ref, grads_hf, strict=True):
        _assert_close(a, e, f"{what} grad {name}")


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rope_matches_llama(unsqueeze_dim):
    seed, (b, hk, groups, s, half) = _draw((1, 3), (1, 3), (1, 3), (1, 19), (1, 24))
    hq, d = hk * groups, 2 * half
    if unsqueeze_dim == 1:
        q, k = torch.randn(b, hq, s, d), torch.randn(b, hk, s, d)
    else:
        q, k = torch.randn(b, s, hq, d), torch.randn(b, s, hk, d)
    cos, sin = _cos_sin(b, s, d)
    what = f"llama rope q={list(q.shape)} k={list(k.shape)} dim={unsqueeze_dim} seed={seed}"
    _compare(llama_rope, q, k, cos, sin, what, dim=unsqueeze_dim)


def _llama3_rotary(head_dim, max_pos=128):
    config = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    return LlamaRotaryEmbedding(config)


def test_rope_matches_llama_with_llama3_scaled_rotary_module():
    seed, (b, s, half) = _draw((1, 3), (1, 40), (2, 32))
    d = 2 * half
    rotary = _llama3_rotary(d)
    q, k = torch.randn(b, 4, s, d), torch.randn(b, 2, s, d)
    position_ids = torch.randint(0, 128, (b, s))
    cos, sin = rotary(q, position_ids)
    what = f"llama3 rotary q={list(q.shape)} seed={seed}"
    _compare(llama_rope, q, k, cos, sin, what)


def test_rope_packed_position_ids_index_tables():
    # Packed rows: positions restart at each sequence boundary inside a row.
    seed, (b, s, half) = _draw((1, 3), (4, 40), (2, 32))
    d = 2 * half
    rotary = _llama3_rotary(d)
    q, k = torch.randn(b, 3, s, d), torch.randn(b, 1, s, d)
    rows = []
    for _ in range(b):
        cut = int(torch.randint(1, s, ()).item())
        rows.append(torch.cat((torch.arange(cut), torch.arange(s - cut))))
    position_ids = torch.stack(rows)
    table_cos, table_sin = rotary(q, torch.arange(128)[None])
    hf_cos, hf_sin = rotary(q, position_ids)
    what = f"packed rope q={list(q.shape)} positions={position_ids.tolist()} seed={seed}"
    _compare(
        llama_rope, q, k, table_cos[0], table_sin[0], what,
        position_ids=position_ids, hf_cos=hf_cos, hf_sin=hf_sin,
    )  # fmt: skip


def test_rope_partial_rotary_matches_phi3():
    seed, (b, s, half, rot_half) = _draw((1, 3), (1, 19), (4, 32), (1, 4))
    d, rotary_dim = 2 * half, 2 * min(rot_half, half - 1)  # strictly partial
    q, k = torch.randn(b, 4, s, d), torch.randn(b, 2, s, d)
    cos, sin = _cos_sin(b, s, rotary_dim)
    what = f"phi3 partial rope q={list(q.shape)} R={rotary_dim} seed={seed}"
    _compare(phi3_rope, q, k, cos, sin, what)
    q_embed, _ = rope(q, k, cos, sin)
    assert torch.equal(q_embed[..., rotary_dim:], q[..., rotary_dim:]), f"{what}: pass-through"


def test_rope_rejects_gathered_cos_with_position_ids():
    q = torch.randn(1, 2, 4, 8)
    cos, sin = _cos_sin(1, 4, 8)
    with pytest.raises(ValueError, match="tables"):
        rope(q, q, cos, sin, torch.zeros(1, 4, dtype=torch.long))

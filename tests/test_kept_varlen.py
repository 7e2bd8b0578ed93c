"""The varlen kernels' attention (packed rows, shared-prompt segments) of an offloaded layer
keeps its output and log-sum-exp in the first pass, so the recompute runs no attention
forward; and flash attention's own GQA takes the grouped keys without copies where this
torch's ``varlen_attn`` has no ``enable_gqa``.

The real kernels run on CUDA in half precision only. On the CPU a reference with their
calling convention stands in (causal aligned to a cut's last key, the log-sum-exp on
request, grouped heads as they are), with a reference of their backward operator; the CUDA
case runs the real ones.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch

from sloth_core.checkpointing import enable_checkpointing, offloaded_checkpoint
from sloth_core.patches import attention, kept_attention
from sloth_core.testing import (
    assert_same_grads,
    repeated_step_grads,
    sloth_attention_lora_model,
)
from sloth_core.testing.seeds import fresh_seed
from sloth_core.testing.varied import config_variations

CUDA = torch.cuda.is_available()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def _cuts(cu_q, cu_k):
    return zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist(),
               strict=True)  # fmt: skip


def _reference(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=None, scale=None,
               return_aux=None):  # fmt: skip
    """``varlen_attn``'s contract: ``[T, H, D]`` cut at ``cu_q``/``cu_k``, causal aligned
    to a cut's last key, grouped key heads taken as they are; ``(out, lse [T, H])`` when
    ``return_aux.lse``."""
    assert window_size == (-1, 0)
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32)
    for a, b, c, d in _cuts(cu_q, cu_k):
        n, m = b - a, d - c
        assert 0 < n <= max_q and n <= m <= max_k
        qs = q[a:b].transpose(0, 1)
        ks, vs = (t[c:d].transpose(0, 1).repeat_interleave(groups, 0) for t in (k, v))
        scores = qs @ ks.transpose(1, 2) * (scale or q.shape[-1] ** -0.5)
        sees = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
        scores = scores.masked_fill(~sees, float("-inf"))
        out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1)
        lse[a:b] = scores.logsumexp(-1).transpose(0, 1).float()
    return (out, lse) if return_aux is not None and return_aux.lse else out


def _reference_backward(dout, q, k, v, out, lse, *, cu_seqlens, max_len, options):
    """The backward operator's contract: ``(dq, dk, dv)``, here by autograd through the
    reference (the real one reads ``out`` and ``lse`` instead of recomputing)."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        again = _reference(*inputs, *cu_seqlens, *max_len, **options)
        return torch.autograd.grad(again, inputs, dout)


@pytest.fixture
def counts(monkeypatch):
    """The reference kernels in place of the real ones; counts of their forwards (with
    the log-sum-exp: the kept path's first pass; without: the plain path) and backwards."""
    seen: collections.Counter[str] = collections.Counter()

    def kernel(*args, **kwargs):
        seen["kept forward" if kwargs.get("return_aux") is not None else "forward"] += 1
        return _reference(*args, **kwargs)

    def backward(*args, **kwargs):
        seen["kept backward"] += 1
        return _reference_backward(*args, **kwargs)

    monkeypatch.setattr(attention, "_varlen_attn", kernel)
    monkeypatch.setattr(attention, "_varlen_backward", backward)
    # The torch 2.11 signature: no enable_gqa (flash attention's own GQA, probed), lse asked.
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"window_size", "scale", "return_aux"})
    monkeypatch.setattr(attention, "_varlen_usable", lambda query, dropout: True)
    monkeypatch.setattr(kept_attention, "_broken", set())
    attention._native_gqa.cache_clear()
    attention._aligned_to_last_key.cache_clear()
    cpu = torch.device("cpu")  # the probes' own calls, before any count
    attention._native_gqa(cpu, torch.float32)
    attention._aligned_to_last_key(cpu, torch.float32)
    seen.clear()
    yield seen
    attention._native_gqa.cache_clear()
    attention._aligned_to_last_key.cache_clear()


def _model(arch: str, device: str = "cpu", dtype=torch.float32):
    return sloth_attention_lora_model(arch, TARGETS, seed=5, device=device, dtype=dtype)


def _packed_grads(arch, checkpoint, counts=None, **kwargs):
    model = _model(arch, **kwargs)
    if counts is not None:
        counts.clear()  # not the tiny model's own probe forward
    before = attention.ATTENTION_PATHS["varlen"]
    grads = repeated_step_grads(model, checkpoint, steps=2, packed=True, shape=(2, 13))
    layers = model.config.num_hidden_layers
    calls = attention.ATTENTION_PATHS["varlen"] - before
    assert calls == 2 * layers * (1 + (checkpoint is not None)), calls  # every call varlen
    return grads, layers


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: per-head q/k norms
def test_packed_rows_recompute_no_attention_forward(arch, counts):
    want, layers = _packed_grads(arch, None, counts)
    assert counts == {"forward": 2 * layers}, counts
    got, _ = _packed_grads(arch, offloaded_checkpoint, counts)
    # each step: one kernel forward per layer (the first pass, kept), none in the recompute
    assert counts == {"kept forward": 2 * layers, "kept backward": 2 * layers}, counts
    assert_same_grads(got, want)


def test_past_the_host_limit_the_recompute_runs_the_kernel(counts, monkeypatch):
    from sloth_core import checkpointing

    want, layers = _packed_grads("llama", None)
    monkeypatch.setattr(checkpointing, "_host_limit", 0)  # nothing fits
    got, _ = _packed_grads("llama", offloaded_checkpoint, counts)
    assert counts == {"kept forward": 2 * layers, "forward": 2 * layers}, counts
    assert_same_grads(got, want)


def test_a_failing_backward_turns_the_path_off_and_stays_correct(counts, monkeypatch):
    want, layers = _packed_grads("llama", None)

    def broken(*args, **kwargs):
        raise RuntimeError("no such operator here")

    monkeypatch.setattr(attention, "_varlen_backward", broken)
    with pytest.warns(UserWarning, match="varlen backward failed"):
        got, _ = _packed_grads("llama", offloaded_checkpoint, counts)
    assert_same_grads(got, want)
    assert kept_attention._broken == {"varlen"}
    # The last layer's backward runs first and fails: the other layers' recomputes in that
    # step, and both passes of every layer in the next, run the kernel as usual.
    assert counts["forward"] == (layers - 1) + 2 * layers, counts
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # turned off: no more tries, no warnings
        again, _ = _packed_grads("llama", offloaded_checkpoint)
    assert_same_grads(again, want)


def _pairs(seed: int, vocab: int):
    """Two preference pairs ``[2, 2, L]`` (prompt, chosen, rejected of odd lengths), labels
    on the completions only."""
    gen = torch.Generator().manual_seed(seed)
    spec, length = [(5, 4, 6), (3, 7, 2)], 12
    ids = torch.zeros(2, 2, length, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for b, (p, c, r) in enumerate(spec):
        prompt = torch.randint(3, vocab, (p,), generator=gen)
        for side, n in ((0, c), (1, r)):
            row = torch.cat([prompt, torch.randint(3, vocab, (n,), generator=gen)])
            ids[b, side, : len(row)], mask[b, side, : len(row)] = row, 1
            labels[b, side, p : len(row)] = row[p:]
    return ids, mask, labels


def _shared_grads(make_tiny_model, monkeypatch, checkpoint, seed):
    from sloth_core import FastLanguageModel
    from sloth_core.train.log_probs import pair_log_probs, shares_prompt

    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    varied = make_tiny_model("llama", **config_variations("llama"))  # every float off default
    model, _ = FastLanguageModel.from_pretrained(str(varied), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                             use_gradient_checkpointing=False)  # fmt: skip
    assert shares_prompt(model)
    if checkpoint is not None:
        enable_checkpointing(model, offload=True)
        for layer in model.get_base_model().model.layers:
            layer._gradient_checkpointing_func = checkpoint
    model.train()
    grads = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        scores = pair_log_probs(model, *_pairs(seed, model.config.vocab_size))
        weights = torch.tensor([1.0, -0.5, 0.25, 2.0]).view(scores.sums.shape)
        (scores.sums * weights).sum().backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    return grads, model.config.num_hidden_layers


def test_shared_prompt_segments_recompute_no_attention_forward(make_tiny_model, monkeypatch,
                                                               counts):  # fmt: skip
    """A preference pair's row (a later tail's keys gathered: the prefix again) through the
    kept path: the gradients of no checkpointing, one kernel forward a layer a step."""
    seed = fresh_seed()
    before = attention.ATTENTION_PATHS["shared_prompt"]
    want, layers = _shared_grads(make_tiny_model, monkeypatch, None, seed)
    assert attention.ATTENTION_PATHS["shared_prompt"] - before == 2 * layers
    counts.clear()
    got, _ = _shared_grads(make_tiny_model, monkeypatch, offloaded_checkpoint, seed)
    assert counts == {"kept forward": 2 * layers, "kept backward": 2 * layers}, counts
    assert_same_grads(got, want)


def test_split_shared_rows_recompute_no_attention_forward(make_tiny_model, monkeypatch, counts):
    """``SLOTH_SHARED_ATTENTION=split``: a pair's row as two whole causal sequences, each
    kept in the first pass (two per layer, in call order) and replayed in the recompute:
    the gradients of no checkpointing, and no varlen kernel at all."""
    monkeypatch.setenv("SLOTH_SHARED_ATTENTION", "split")
    seed = fresh_seed()
    before = collections.Counter(attention.ATTENTION_PATHS)
    want, layers = _shared_grads(make_tiny_model, monkeypatch, None, seed)
    assert attention.ATTENTION_PATHS["shared_split"] - before["shared_split"] == 2 * layers
    assert attention.ATTENTION_PATHS["kept"] == before["kept"]  # nothing kept unasked
    kept = attention.ATTENTION_PATHS["kept"]
    got, _ = _shared_grads(make_tiny_model, monkeypatch, offloaded_checkpoint, seed)
    # 2 steps x layers x (first pass + recompute) x (the first tails' call + the later's)
    assert attention.ATTENTION_PATHS["kept"] - kept == 2 * layers * 2 * 2
    assert not counts, counts
    assert_same_grads(got, want)


def test_grouped_keys_go_to_the_kernel_as_they_are_where_it_takes_them(counts, monkeypatch):
    """No ``enable_gqa`` in the signature: a kernel that takes fewer key heads gets them
    without copies; one that refuses them gets the heads repeated (the probe decides)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(9, h, 8, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    expected = _reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cu, cu, 5, 5,
                          window_size=(-1, 0), scale=0.3)  # fmt: skip
    heads_seen = []
    real = attention._varlen_attn

    def spy(q, k, v, *args, **kwargs):
        heads_seen.append(k.shape[1])
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention, "_varlen_attn", spy)
    out = attention._varlen_flat(q, k, v, (cu, cu), (5, 5), 0.3)
    torch.testing.assert_close(out, expected, msg=f"seed={seed}")
    assert attention._native_gqa(q.device, q.dtype) and heads_seen[-1] == 2

    def refuses(q, k, v, *args, **kwargs):
        if k.shape[1] != q.shape[1]:
            raise RuntimeError("number of heads in key/value must equal the query's")
        return spy(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention, "_varlen_attn", refuses)
    attention._native_gqa.cache_clear()
    out = attention._varlen_flat(q, k, v, (cu, cu), (5, 5), 0.3)
    torch.testing.assert_close(out, expected, msg=f"seed={seed}")
    assert not attention._native_gqa(q.device, q.dtype) and heads_seen[-1] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_bf16_packed_rows_keep_through_the_flash_kernel(monkeypatch):
    """The real kernels and backward operator: packed rows in bf16, the kept path taken
    (no warning, nothing turned off) and the gradients of no checkpointing."""
    monkeypatch.setenv(kept_attention.ENV, "1")  # off on CUDA unless asked
    if not attention._varlen_usable(torch.empty(1, device="cuda", dtype=torch.bfloat16), 0.0):
        pytest.skip("this torch has no varlen_attn")
    if not attention._keeps_varlen():
        pytest.skip("this torch's varlen_attn returns no log-sum-exp")
    kept_attention._broken.discard("varlen")
    options = dict(device="cuda", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        want, _ = _packed_grads("llama", None, **options)
        got, _ = _packed_grads("llama", offloaded_checkpoint, **options)
    assert "varlen" not in kept_attention._broken
    assert_same_grads(got, want, rtol=2e-2)

"""Preference pairs in one row, the prompt computed once (``sloth_core.patches.shared_prompt``).

The log-probabilities and their gradients must be those of the two rows scored apart, on
every attention path the row can take: SDPA with its mask (CPU), the sliding window and
the softcap (Mistral, Gemma 2: windows counted in positions, which restart for the second
tail), and the flash varlen kernels over gathered segments (CUDA; on the CPU a reference
with ``varlen_attn``'s calling convention stands in for them).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from sloth_core.patches import attention
from sloth_core.patches.shared_prompt import (
    FIRST,
    PADDING,
    SECOND,
    SHARED,
    SHARED_PROMPT_KWARG,
    pack_pairs,
)
from sloth_core.testing.seeds import fresh_seed
from sloth_core.train.log_probs import pair_log_probs, sequence_log_probs, shares_prompt

CUDA = torch.cuda.is_available()


def _pairs(spec, vocab: int, seed: int, *, pad: int = 0):
    """``[B, 2, L]`` right-padded pairs: per pair (prompt, chosen, rejected) lengths, random
    ids, labels on the completions only (as PreferenceBatches makes them)."""
    gen = torch.Generator().manual_seed(seed)
    length = max(p + max(c, r) for p, c, r in spec) + 2
    ids = torch.full((len(spec), 2, length), pad, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for b, (p, c, r) in enumerate(spec):
        prompt = torch.randint(3, vocab, (p,), generator=gen)
        for side, n in ((0, c), (1, r)):
            completion = torch.randint(3, vocab, (n,), generator=gen)
            row = torch.cat([prompt, completion])
            ids[b, side, : len(row)], mask[b, side, : len(row)] = row, 1
            labels[b, side, p : len(row)] = completion
    return ids, mask, labels


def test_a_pair_becomes_prefix_and_two_tails():
    ids, mask, labels = _pairs([(5, 3, 4), (1, 2, 2)], vocab=50, seed=fresh_seed(), pad=1)
    out_ids, out_mask, out_labels, rows = pack_pairs(ids, mask, labels)
    # Pair 0: the prompt's first 4 tokens once; each tail = last prompt token + completion.
    assert rows.shared == [4, 0] and rows.tails == [[4, 5], [3, 3]] and rows.length == 13
    assert out_ids[0, :8].tolist() == ids[0, 0, :8].tolist()
    assert out_ids[0, 8:13].tolist() == ids[0, 1, 4:9].tolist()
    assert rows.positions[0].tolist() == [*range(8), *range(4, 9)]
    assert rows.branch[0].tolist() == [SHARED] * 4 + [FIRST] * 4 + [SECOND] * 5
    # Pair 1: a one-token prompt shares nothing; both rows whole, then padding.
    assert out_ids[1, :6].tolist() == ids[1, 0, :3].tolist() + ids[1, 1, :3].tolist()
    assert rows.positions[1, :6].tolist() == [0, 1, 2, 0, 1, 2]
    assert rows.branch[1].tolist() == [FIRST] * 3 + [SECOND] * 3 + [PADDING] * 7
    assert out_mask.sum(-1).tolist() == [13, 6] and (out_labels[1, 6:] == -100).all()
    # Every label kept, and none predicted from the shared prefix.
    assert (out_labels != -100).sum() == (labels != -100).sum()
    target = rows.target_branch()
    shifted = F.pad(out_labels, (0, 1), value=-100)[:, 1:]
    assert set(target[shifted != -100].tolist()) <= {FIRST, SECOND}


def test_a_second_tail_never_sees_the_first():
    ids, mask, labels = _pairs([(4, 2, 3)], vocab=50, seed=fresh_seed())
    *_, rows = pack_pairs(ids, mask, labels)
    allowed = rows.mask[0, 0]
    second, first = rows.branch[0] == SECOND, rows.branch[0] == FIRST
    assert not allowed[second][:, first].any()
    assert allowed[second][:, rows.branch[0] == SHARED].all()
    assert torch.equal(allowed & ~allowed.tril(), torch.zeros_like(allowed))  # causal


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=None, scale=None,
                      enable_gqa=False, last_key_aligned=True):  # fmt: skip
    """``varlen_attn``'s contract (flash attention's): ``[Tq, H, D]`` queries and ``[Tk, H,
    D]`` keys cut at ``cu_q``/``cu_k``; ``window_size=(-1, 0)`` is causal aligned to a cut's
    last key: query ``i`` of ``n`` sees keys up to ``i + m - n`` of ``m``."""
    assert window_size == (-1, 0) and len(cu_q) == len(cu_k)
    assert int(cu_q[-1]) == q.shape[0] and int(cu_k[-1]) == k.shape[0] == v.shape[0]
    out = torch.empty_like(q)
    cuts = zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist(),
               strict=True)  # fmt: skip
    for a, b, c, d in cuts:
        n, m = b - a, d - c
        assert 0 < n <= max_q and n <= m <= max_k
        shift = m - n if last_key_aligned else 0
        sees = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + shift
        out[a:b] = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1),
            attn_mask=sees, scale=scale, enable_gqa=enable_gqa,
        ).transpose(0, 1)  # fmt: skip
    return out


def test_varlen_kernels_aligned_to_the_first_key_leave_shared_rows_to_the_mask(monkeypatch):
    """A ``varlen_attn`` whose causal mask starts at a cut's first key (not flash
    attention's convention) would let a tail's queries miss the prefix's last keys: the
    shared-prompt rows then go through SDPA with their mask, with a warning, and the
    outputs are the mask's."""

    first_key_aligned = functools.partial(_reference_varlen, last_key_aligned=False)
    monkeypatch.setattr(attention, "_varlen_attn", first_key_aligned)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"window_size", "scale", "enable_gqa"})
    monkeypatch.setattr(attention, "_varlen_usable", lambda query, dropout: True)
    ids, mask, labels = _pairs([(6, 5, 3), (3, 2, 2)], vocab=40, seed=fresh_seed())
    *_, rows = pack_pairs(ids, mask, labels)
    q, k, v = (torch.randn(2, h, rows.length, 8, dtype=torch.float64) for h in (4, 2, 2))
    before = attention.ATTENTION_PATHS["shared_prompt"]
    with pytest.warns(UserWarning, match="not aligned to the last key"):
        out, _ = attention.sloth_attention(torch.nn.Module(), q, k, v, None, scaling=0.3,
                                           **{SHARED_PROMPT_KWARG: rows})  # fmt: skip
    assert attention.ATTENTION_PATHS["shared_prompt"] == before
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=rows.mask, scale=0.3,
                                              enable_gqa=True).transpose(1, 2)  # fmt: skip
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("varlen", [False, True], ids=["sdpa-mask", "varlen-segments"])
def test_the_attention_of_a_shared_row_is_each_rows_own(monkeypatch, varlen):
    """Forward and backward of ``sloth_attention`` on packed pairs against SDPA on each
    row alone (GQA, odd lengths, a pair with nothing shared, padding)."""
    seed = fresh_seed()
    if varlen:
        monkeypatch.setattr(attention, "_varlen_attn", _reference_varlen)
        monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"window_size", "scale", "enable_gqa"})
        monkeypatch.setattr(attention, "_varlen_usable", lambda query, dropout: True)
    ids, mask, labels = _pairs([(6, 5, 3), (1, 4, 7), (3, 2, 2)], vocab=40, seed=seed)
    _, _, _, rows = pack_pairs(ids, mask, labels)
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim, batch, length = 4, 2, 8, 3, rows.length
    # One q/k/v vector per (pair, side, position in its own row): the packed tensors and
    # the rows' take the same ones, so the outputs must agree token by token.
    leaves = [torch.randn(batch, 2, h, ids.shape[-1], dim, generator=gen, dtype=torch.float64,
                          requires_grad=True) for h in (heads, kv_heads, kv_heads)]  # fmt: skip
    own = []
    for leaf in leaves:  # the rows' shared prefix holds the same vectors, as in a model
        tied = leaf.clone()
        for b in range(batch):
            tied[b, 1, :, : rows.shared[b]] = leaf[b, 0, :, : rows.shared[b]]
        own.append(tied)
    where = []  # packed (b, index) -> (side, row position)
    for b in range(batch):
        s = rows.shared[b]
        first, second = s + rows.tails[b][0], s + sum(rows.tails[b])
        where.append([(0, t) for t in range(first)]
                     + [(1, s + t - first) for t in range(first, second)]
                     + [(0, 0)] * (length - second))  # fmt: skip

    def packed(tensor):
        return torch.stack([torch.stack([tensor[b, side, :, t] for side, t in where[b]], 1)
                            for b in range(batch)])  # fmt: skip

    before = attention.ATTENTION_PATHS["shared_prompt"]
    out, _ = attention.sloth_attention(
        torch.nn.Module(), *(packed(t) for t in own), None, scaling=0.3,
        **{SHARED_PROMPT_KWARG: rows},
    )  # fmt: skip
    assert attention.ATTENTION_PATHS["shared_prompt"] == before + varlen
    expected = (
        F.scaled_dot_product_attention(
            *(t.flatten(0, 1) for t in own), is_causal=True, scale=0.3, enable_gqa=True
        )
        .unflatten(0, (batch, 2))
        .transpose(2, 3)
    )  # [B, 2, L, H, D]
    weights = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    valid = rows.branch != PADDING
    for b in range(batch):
        for t, (side, pos) in enumerate(where[b]):
            if valid[b, t]:
                torch.testing.assert_close(out[b, t], expected[b, side, pos], msg=f"seed={seed}")
    got = torch.autograd.grad(
        (out * weights * valid[..., None, None]).sum(), leaves, retain_graph=True
    )  # the rows' graph shares `own`
    unpacked = torch.zeros_like(expected)
    for b in range(batch):
        for t, (side, pos) in enumerate(where[b]):
            if valid[b, t]:
                unpacked[b, side, pos] = weights[b, t]
    want = torch.autograd.grad((expected * unpacked).sum(), leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, msg=f"seed={seed}")


def _devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA"))]


def _lora_model(make_tiny_model, monkeypatch, arch: str, device: str):
    """A patched tiny ``arch`` with LoRA (B not zero) in training mode: bf16 on CUDA (the
    Triton kernels), float32 on the CPU (the references: interpreted kernels are slow)."""
    from sloth_core import FastLanguageModel

    if device == "cpu":
        monkeypatch.setenv("SLOTH_KERNELS", "torch")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, _ = FastLanguageModel.from_pretrained(str(make_tiny_model(arch)), dtype=dtype,
                                                 device_map=device)  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    return model.train(), dtype


def _trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def _assert_grads_close(grads, grads_rows, atol: float, seed: int) -> None:
    """Every gradient within ``atol`` of the largest one of the rows apart."""
    scale = max(g.abs().max() for g in grads_rows.values())
    for name, g in grads.items():
        torch.testing.assert_close(g / scale, grads_rows[name] / scale, atol=atol, rtol=0,
                                   msg=f"{name} seed={seed}")  # fmt: skip


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "qwen3_moe"])
def test_shared_prompt_log_probs_parity_with_rows(make_tiny_model, monkeypatch, arch, device):
    """Patched models with LoRA, offloaded checkpointing on (the recompute takes the row's
    mask too): summed log-probs, counts and LoRA gradients of the packed pairs equal those
    of the rows scored apart. Mistral's 16-token window and Gemma 2's softcap and window
    are crossed (rows of up to 30 tokens); on CUDA in bf16 the varlen path serves the
    unwindowed layers."""
    seed = fresh_seed()
    model, dtype = _lora_model(make_tiny_model, monkeypatch, arch, device)
    assert shares_prompt(model)
    ids, mask, labels = _pairs([(14, 9, 16), (1, 5, 3), (20, 4, 6)],
                               vocab=model.config.vocab_size, seed=seed)  # fmt: skip
    ids, mask, labels = (t.to(device) for t in (ids, mask, labels))
    results = []
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        before = dict(attention.ATTENTION_PATHS)
        if share:
            out = pair_log_probs(model, ids, mask, labels)
        else:
            out = sequence_log_probs(model, *(t.flatten(0, 1) for t in (ids, mask, labels)))
        out.sums.sum().backward()
        grads = _trainable_grads(model)
        paths = {k: v - before.get(k, 0) for k, v in attention.ATTENTION_PATHS.items()}
        results.append((out.sums.detach().float(), out.counts, grads, paths))
    (sums, counts, grads, paths), (sums_rows, counts_rows, grads_rows, _) = results
    assert torch.equal(counts, counts_rows)
    # bf16: the two layouts round differently (sums of ~10-30 log-probs); a wrong mask or
    # position moves them by whole units and the gradients by their own size.
    tol = dict(atol=1.0, rtol=6e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sums, sums_rows, **tol, msg=f"seed={seed}")
    _assert_grads_close(grads, grads_rows, tol["rtol"], seed)
    if device == "cuda" and arch in ("llama", "qwen3_moe"):
        assert paths.get("shared_prompt"), paths


def _losses_both_ways(monkeypatch, module, name: str, config) -> dict[bool, list[float]]:
    """Train ``config(share)`` with ``share_prompt`` on, then off (torch ops), ``module.name``
    (the shared-row scorer) watched: it runs exactly when sharing. The logged losses of
    each run, by ``share``."""
    from sloth_core.train import train
    from sloth_core.train.metrics import read_metrics

    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    losses = {}
    for share in (True, False):
        calls.clear()
        result = train(config(share).validate(), show_progress=False)
        assert bool(calls) == share
        losses[share] = [r["loss"] for r in read_metrics(result.output_dir) if "loss" in r]
    return losses


@pytest.mark.parametrize("dtype", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not CUDA, reason="bf16 training (the flash varlen path) on CUDA only"))])  # fmt: skip
def test_dpo_shares_the_prompt_unless_told_not_to(make_tiny_model, tmp_path, monkeypatch, dtype):
    """``share_prompt`` (on by default): the DPO step scores policy and reference through
    the shared row, and its losses are those of the rows scored apart: to fp32 rounding in
    fp32; in bf16 (CUDA) the two layouts round differently and Adam carries that into the
    later steps (0.4% seen on an H100), while a wrong mask or position moves the loss by far
    more than 2%."""
    from sloth_core.testing.datasets import preference_dataset
    from sloth_core.train import TrainConfig, preference

    model_path = make_tiny_model("llama")

    def config(share: bool) -> TrainConfig:
        return TrainConfig(
            model_name=str(model_path), dataset=str(preference_dataset("pairs")),
            method="dpo", beta=0.3, max_seq_length=96, per_device_train_batch_size=2,
            max_steps=3, learning_rate=5e-3, gradient_checkpointing="on", seed=3,
            share_prompt=share, output_dir=str(tmp_path / f"out-{share}"), save_method="none",
            report_to="none", logging_steps=1, cpu_threads=1, dtype=dtype, bf16="off",
        )  # fmt: skip

    losses = _losses_both_ways(monkeypatch, preference, "pair_log_probs", config)
    assert len(losses[True]) == 3
    rel = 2e-2 if dtype == "bf16" else 1e-4
    assert losses[True] == pytest.approx(losses[False], rel=rel, abs=1e-6)


def _groups(prompts, completions, size, vocab, seed, *, pad: int = 0):
    """GRPO's rows: ``prompts`` (lengths) left-padded to one width, each repeated ``size``
    times, then completions (per row: real length, tokens after it padding as after a stop
    token), right-padded."""
    gen = torch.Generator().manual_seed(seed)
    width, span = max(prompts), max(completions) + 1
    rows = len(prompts) * size
    prompt_ids = torch.full((rows, width), pad, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for g, length in enumerate(prompts):
        tokens = torch.randint(3, vocab, (length,), generator=gen)
        prompt_ids[g * size : (g + 1) * size, width - length :] = tokens
        prompt_mask[g * size : (g + 1) * size, width - length :] = 1
    completion_ids = torch.randint(3, vocab, (rows, span), generator=gen)
    completion_mask = (torch.arange(span)[None] < torch.tensor(completions)[:, None]).long()
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    labels = torch.cat([torch.full_like(prompt_ids, -100),
                        torch.where(completion_mask.bool(), completion_ids, -100)], 1)  # fmt: skip
    return ids, mask, labels, width


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_grouped_token_log_probs_parity_with_rows(make_tiny_model, monkeypatch, arch, device):
    """GRPO's groups (left-padded prompts of different lengths, completions ending early):
    every completion token's log-prob, the mask and the LoRA gradients equal those of the
    rows scored apart, positions included (the prompts' left padding counts in them)."""
    from sloth_core.train.log_probs import grouped_token_log_probs, token_log_probs

    seed = fresh_seed()
    model, dtype = _lora_model(make_tiny_model, monkeypatch, arch, device)
    ids, mask, labels, width = _groups([9, 4], [6, 11, 1, 8, 3, 5], 3,
                                       vocab=model.config.vocab_size, seed=seed)  # fmt: skip
    ids, mask, labels = (t.to(device) for t in (ids, mask, labels))
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    results = []
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        if share:
            out = grouped_token_log_probs(model, ids, mask, labels, size=3, prompt_width=width,
                                          temperature=0.7)  # fmt: skip
        else:
            out = token_log_probs(model, ids, mask, labels, temperature=0.7)
        (out.values * weights).sum().backward()
        grads = _trainable_grads(model)
        results.append((out.values.detach().float(), out.mask, grads))
    (values, keep, grads), (values_rows, keep_rows, grads_rows) = results
    assert torch.equal(keep, keep_rows) and keep.sum() == (labels != -100).sum()
    tol = dict(atol=0.1, rtol=6e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, values_rows, **tol, msg=f"seed={seed}")
    _assert_grads_close(grads, grads_rows, tol["rtol"], seed)


def test_grpo_shares_the_prompt_unless_told_not_to(make_tiny_model, tmp_path, monkeypatch):
    """``share_prompt`` in GRPO: the policy's and the reference's (beta > 0) log-probs go
    through the shared rows, and the run logs the same losses as the rows apart."""
    from sloth_core.testing.datasets import prompt_dataset
    from sloth_core.train import TrainConfig, grpo

    base = make_tiny_model("llama")

    def config(share: bool) -> TrainConfig:
        return TrainConfig(
            model_name=str(base), dataset=str(prompt_dataset()), method="grpo",
            reward=["sloth_core.train.rewards:length_penalty"], beta=0.04, num_generations=4,
            per_device_train_batch_size=8, max_steps=2, max_completion_length=8, seed=1,
            max_seq_length=128,
            learning_rate=1e-3, share_prompt=share, output_dir=str(tmp_path / f"out-{share}"),
            save_method="none", report_to="none", logging_steps=1, cpu_threads=1,
            # fp32 on CUDA too: "auto" is bf16 there, whose two layouts round apart by more
            # than this test's fp32 tolerance (6% of a 2e-5 loss seen on an H100).
            dtype="fp32", bf16="off",
        )  # fmt: skip

    losses = _losses_both_ways(monkeypatch, grpo, "grouped_token_log_probs", config)
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-6)


def _path_against_mask(monkeypatch, rows, seed, path: str, enable) -> None:
    """``sloth_attention`` on ``rows`` through SDPA with the rows' mask, then with
    ``enable(patch)`` through the path counted as ``path``: outputs and gradients on every
    real token agree."""
    gen = torch.Generator().manual_seed(seed)
    shape = (len(rows.shared), rows.length)
    inputs = [torch.randn(shape[0], h, shape[1], 8, generator=gen, dtype=torch.float64,
                          requires_grad=True) for h in (4, 2, 2)]  # fmt: skip
    weights = torch.randn(shape[0], shape[1], 4, 8, generator=gen, dtype=torch.float64)
    real = (rows.branch != -1)[..., None, None]
    outs = []
    for on in (False, True):
        with monkeypatch.context() as patch:
            if on:
                enable(patch)
            before = attention.ATTENTION_PATHS[path]
            out, _ = attention.sloth_attention(torch.nn.Module(), *inputs, None, scaling=0.4,
                                               **{SHARED_PROMPT_KWARG: rows})  # fmt: skip
            assert attention.ATTENTION_PATHS[path] == before + on
            grads = torch.autograd.grad((out * weights * real).sum(), inputs)
            outs.append((out * real, grads))
    (masked, masked_grads), (other, other_grads) = outs
    torch.testing.assert_close(other, masked, msg=f"seed={seed}")
    for got, want in zip(other_grads, masked_grads, strict=True):
        torch.testing.assert_close(got, want, msg=f"seed={seed}")


def _segments_against_mask(monkeypatch, rows, seed):
    """The (reference) varlen segments against SDPA with the rows' mask."""

    def enable(patch):
        patch.setattr(attention, "_varlen_attn", _reference_varlen)
        patch.setattr(attention, "_VARLEN_PARAMS", {"window_size", "scale", "enable_gqa"})
        patch.setattr(attention, "_varlen_usable", lambda query, dropout: True)

    _path_against_mask(monkeypatch, rows, seed, "shared_prompt", enable)


def _split_against_mask(monkeypatch, rows, seed):
    """``SLOTH_SHARED_ATTENTION=split``: the rows as whole causal sequences (the later tails
    behind their prefix again) against SDPA with the rows' mask."""

    def enable(patch):
        patch.setenv("SLOTH_SHARED_ATTENTION", "split")
        patch.setattr(attention, "_varlen_usable", lambda query, dropout: True)

    _path_against_mask(monkeypatch, rows, seed, "shared_split", enable)


def test_shared_attention_mode_names_the_setting(monkeypatch):
    monkeypatch.setenv("SLOTH_SHARED_ATTENTION", "flash")
    with pytest.raises(ValueError, match="SLOTH_SHARED_ATTENTION='flash'"):
        attention.shared_attention_mode()


#: The shared rows' fast paths, each checked against SDPA with the rows' mask: the varlen
#: segments, and the whole causal sequences of ``SLOTH_SHARED_ATTENTION=split``.
AGAINST_MASK = pytest.mark.parametrize(
    "against_mask", [_segments_against_mask, _split_against_mask], ids=["varlen", "split"]
)


@AGAINST_MASK
def test_varlen_segments_equal_the_mask_on_random_pairs(monkeypatch, against_mask):
    """Random pairs, a padding example (no token) among them, some sharing a one-token
    prompt (nothing shared): the path and the mask agree on every real token."""
    seed = fresh_seed()
    rng = torch.Generator().manual_seed(seed)
    spec = [tuple(int(x) for x in torch.randint(1, 9, (3,), generator=rng)) for _ in range(4)]
    spec.insert(int(torch.randint(0, 5, (1,), generator=rng)), (0, 0, 0))
    ids, mask, labels = _pairs(spec, vocab=40, seed=seed)
    *_, rows = pack_pairs(ids, mask, labels)
    against_mask(monkeypatch, rows, seed)


@AGAINST_MASK
def test_varlen_segments_equal_the_mask_for_groups(monkeypatch, against_mask):
    """Groups of three tails, left-padded prompts: the varlen segments (the prefix's keys
    gathered again for each later tail), and the split's sequences (every later tail its
    own), give the masked SDPA's outputs and gradients on every real token."""
    from sloth_core.patches.shared_prompt import pack_groups

    seed = fresh_seed()
    ids, mask, labels, width = _groups([7, 2, 5], [4, 1, 6, 3, 3, 2, 5, 1, 4], 3, vocab=30,
                                       seed=seed)  # fmt: skip
    *_, rows = pack_groups(ids, mask, labels, 3, prompt_width=width)
    against_mask(monkeypatch, rows, seed)
    assert rows.shared[1] == 1 and rows.tails[1] == [4, 4, 3]  # prompt 2: last token + completion
    _, (gather, out_index, src_index) = rows.split
    assert gather.shape[0] == 6 and out_index.shape == src_index.shape  # two later tails a row


def test_a_batch_is_packed_once_for_the_policy_and_the_reference():
    """The policy's and the reference's forwards pack the same tensors: the second pack is
    the first's result (no second read-back to the host); a changed tensor, another mask
    or another grouping packs afresh, and inference-mode tensors are packed every time."""
    from sloth_core.patches.shared_prompt import pack_groups

    ids, mask, labels = _pairs([(4, 3, 5), (2, 6, 1)], vocab=30, seed=fresh_seed())
    first = pack_pairs(ids, mask, labels)
    assert pack_pairs(ids, mask, labels) is first
    assert pack_pairs(ids, mask.clone(), labels) is not first  # another mask tensor
    labels[0, 0, -1] = 7  # written in place: its version moves on
    again = pack_pairs(ids, mask, labels)
    assert again is not first and pack_pairs(ids, mask, labels) is again
    rows, row_mask, row_labels = ids.flatten(0, 1), mask.flatten(0, 1), labels.flatten(0, 1)
    by_two = pack_groups(rows, row_mask, row_labels, 2, prompt_width=4)
    assert pack_groups(rows, row_mask, row_labels, 2, prompt_width=4) is by_two
    assert pack_groups(rows, row_mask, row_labels, 4, prompt_width=4) is not by_two
    with torch.inference_mode():
        frozen = [t.clone() for t in (ids, mask, labels)]
        one, two = pack_pairs(*frozen), pack_pairs(*frozen)
    assert one is not two
    for a, b in zip(one[:3], first[:3], strict=True):
        assert a.shape == b.shape

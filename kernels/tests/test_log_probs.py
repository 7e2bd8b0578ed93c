"""Chunked token log-probs against the torch reference: values, per-token gradients, memory."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    DTYPES,
    FP32_FLOOR,
    HAS_CUDA,
    LOWP_FACTOR,
    assert_close,
    peak_bytes_above_inputs,
)
from sloth_kernels import cross_entropy as ce_module
from sloth_kernels import log_probs as log_probs_module
from sloth_kernels.log_probs import token_log_probs

from sloth_core.ops import reference
from sloth_core.testing.host_syncs import HostSyncs
from sloth_core.testing.rounding import assert_near_fp32
from sloth_core.testing.seeds import draw

IGNORE = -100
#: dbias's allowance: each entry sums one rounded d(logits) per token, and with per-token
#: gradients of either sign the sum cancels while the interpreter's rounding (a truncation,
#: biased toward zero: kernel_helpers.LOWP_FACTOR) does not; measured up to 4.2x torch's
#: own error over ~400 draws, against at most 3.1x for dhidden and 2.3x for dweight.
DBIAS_FACTOR = LOWP_FACTOR if HAS_CUDA else 2 * LOWP_FACTOR


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 256 columns, so CPU-sized vocabularies take several online-lse steps."""
    if not HAS_CUDA:
        monkeypatch.setattr(ce_module, "MAX_BLOCK", 256)


def _inputs(n_rows, hidden_size, vocab, dtype, device, *, bias=False, grads=(True, True, True)):
    hidden = torch.randn(n_rows, hidden_size, device=device)
    # Logits spread over several units: peaked and flat softmax rows both.
    weight = torch.randn(vocab, hidden_size, device=device) * 2 / hidden_size**0.5
    tensors = [hidden, weight, torch.randn(vocab, device=device) if bias else None]
    tensors = [
        None if t is None else t.to(dtype).requires_grad_(g)
        for t, g in zip(tensors, grads, strict=True)
    ]
    labels = torch.randint(0, vocab, (n_rows,), device=device)
    labels[torch.rand(n_rows, device=device) < 0.3] = IGNORE
    return (*tensors, labels)


def _run(fn, hidden, weight, bias, labels, upstream, **options):
    """Log-probs and the gradients asked for, on fresh leaves sharing the inputs' values."""
    leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad)
              for t in (hidden, weight, bias)]  # fmt: skip
    out = fn(leaves[0], leaves[1], labels, bias=leaves[2], **options)
    if out.requires_grad:
        out.backward(upstream)
    return out, [None if t is None or not t.requires_grad else t.grad for t in leaves]


def _check(inputs, dtype, what, **options):
    hidden, weight, bias, labels = inputs
    upstream = torch.randn(labels.shape, device=labels.device)  # DPO/KTO weight every token
    out, grads = _run(token_log_probs, *inputs, upstream, **options)
    ref, ref_grads = _run(reference.token_log_probs, *inputs, upstream, **options)
    fp32 = [None if t is None else t.detach().float().requires_grad_(t.requires_grad)
            for t in (hidden, weight, bias)]  # fmt: skip
    fp32_out, fp32_grads = _run(reference.token_log_probs, *fp32, labels, upstream, **options)
    assert out.dtype == torch.float32 and out.shape == labels.shape, what
    if HAS_CUDA and dtype != torch.float32:
        # On the GPU cuBLAS picks other kernels for a chunk's [chunk, H] x [H, V] than for
        # the reference's whole [N, H] x [H, V], so the bf16 logits round differently:
        # measured up to 0.055 apart on (4096, 4096, 32007) log-probs, where each is
        # within bf16's rounding of the fp32 ones. Judged as the gradients are.
        assert_near_fp32(out, fp32_out, ref, factor=LOWP_FACTOR, floor=FP32_FLOOR,
                         rows=False, what=f"{what} log-probs")  # fmt: skip
    else:  # the same matmul in the input dtype for both, then reduced in fp32
        assert_close(out, ref, torch.float32, what=f"{what} log-probs")
    assert bool((out[labels == IGNORE] == 0).all()), f"{what}: ignored tokens not 0"
    for name, got, want, base in zip(("dhidden", "dweight", "dbias"), grads, fp32_grads,
                                     ref_grads, strict=True):  # fmt: skip
        if want is None:
            assert got is None, f"{what} {name}: a gradient where none was asked for"
            continue
        # Against the reference in fp32 on the same rounded inputs, allowed LOWP_FACTOR
        # times the reference's own rounding in the input dtype, per tensor and per row
        # (dweight's vocabulary rows differ in size by orders of magnitude). Not per
        # element of dbias: with per-token gradients of either sign, an entry's sum over
        # the tokens can cancel to ~0, where any rounding is a large relative error.
        assert got.dtype == base.dtype, f"{what} {name}: {got.dtype}"
        factor = DBIAS_FACTOR if name == "dbias" else LOWP_FACTOR
        assert_near_fp32(got, want, base, factor=factor, floor=FP32_FLOOR,
                         rows=got.dim() > 1, what=f"{what} {name}")  # fmt: skip
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bias, softcap, temperature, chunk_size",
    [(False, None, 1.0, None), (True, None, 0.7, 5), (False, 20.0, 1.0, 8), (True, 10.0, 1.6, 7)],
)
def test_matches_reference(bias, softcap, temperature, chunk_size, dtype, device):
    seed, (n_rows, hidden_size, half_vocab) = draw((9, 30), (8, 24), (150, 300))
    shape = (n_rows, hidden_size, 2 * half_vocab + 1)  # odd V; chunks that do not divide N
    inputs = _inputs(*shape, dtype, device, bias=bias)
    what = f"NxHxV={shape} {dtype} bias={bias} softcap={softcap} T={temperature} seed={seed}"
    _check(inputs, dtype, what, softcap=softcap, temperature=temperature, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "grads", [(True, False, False), (False, True, True), (False, False, False)],
    ids=["frozen-weight", "frozen-hidden", "all-frozen"],
)  # fmt: skip
def test_which_gradients(grads, dtype, device):
    inputs = _inputs(17, 16, 301, dtype, device, bias=True, grads=grads)
    _check(inputs, dtype, f"{dtype} grads={grads}", softcap=15.0, chunk_size=6)


def test_ignored_chunks_all_ignored_and_leading_dims(device):
    hidden, weight, bias, labels = _inputs(2 * 11, 16, 257, torch.float32, device, bias=True)
    labels[:12] = IGNORE  # chunks of 6: the first two have no label at all
    hidden = hidden.detach().view(2, 11, 16).requires_grad_()
    out, (dhidden, _, _) = _check((hidden, weight, bias, labels.view(2, 11)), torch.float32,
                                  "ignored chunks, [2, 11, H]", chunk_size=6)  # fmt: skip
    assert dhidden.shape == (2, 11, 16)
    assert (dhidden.view(22, 16)[:12] == 0).all() and (dhidden.view(22, 16)[12:] != 0).any()

    labels.fill_(IGNORE)  # the whole batch: zeros and zero gradients, as the reference
    for chunk_size in (6, None):  # None: the default size of no counted row at all
        out, grads = _check((hidden, weight, bias, labels.view(2, 11)), torch.float32,
                            f"all ignored, chunk {chunk_size}", chunk_size=chunk_size)  # fmt: skip
        assert (out == 0).all() and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("given", [False, True], ids=["found", "counted given"])
def test_only_the_counted_rows_reach_the_head(device, monkeypatch, given):
    """Ignored tokens scattered through every chunk (DPO's prompts, a shared prefix):
    forward and backward run the head on the counted rows only, and the log-probs and
    gradients are the reference's; the rows found by the op (one host sync) or from the
    caller's ``counted`` (none)."""
    inputs = _inputs(30, 16, 257, torch.float32, device, bias=True)
    inputs[-1][::3] = IGNORE
    options = {"counted": int((inputs[-1] != IGNORE).sum())} if given else {}
    rows = []
    for name in ("_forward", "_backward"):
        real = getattr(log_probs_module, name)
        monkeypatch.setattr(log_probs_module, name,
                            lambda hidden, *a, real=real: rows.append(hidden.shape[0])
                            or real(hidden, *a))  # fmt: skip
    with HostSyncs(device) as seen:
        _check(inputs, torch.float32, "every third ignored", chunk_size=8, **options)
    counted = int((inputs[-1] != IGNORE).sum())
    assert rows == [counted, counted]
    kernel_syncs = [s for s in seen.syncs if "counted_rows" in s.where]
    assert bool(kernel_syncs) != given, kernel_syncs  # (on CUDA torch's check sees it too)


def test_no_grad_is_the_reference_model_path(device):
    hidden, weight, _, labels = _inputs(12, 16, 300, torch.float32, device)
    with torch.no_grad():
        out = token_log_probs(hidden, weight, labels, temperature=0.9, chunk_size=5)
    assert not out.requires_grad
    ref = reference.token_log_probs(hidden.detach(), weight.detach(), labels, temperature=0.9)
    assert_close(out, ref, torch.float32, what="no_grad log-probs")


def test_falls_back_to_reference_and_checks_arguments(device):
    hidden, weight, _, labels = _inputs(6, 8, 50, torch.float32, device)
    for bad in ({"temperature": 0.0}, {"softcap": 0.0}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            token_log_probs(hidden, weight, labels, **bad)
    with pytest.raises(ValueError):
        token_log_probs(hidden, weight, labels[:5])
    wide = hidden.detach().double(), weight.detach().double()
    assert_close(token_log_probs(*wide, labels), reference.token_log_probs(*wide, labels),
                 torch.float32, what="float64")  # fmt: skip


def test_registered_for_the_op():
    (entry,) = log_probs_module.REGISTRATIONS
    assert entry["op"] == "token_log_probs"
    assert entry["fn"] is token_log_probs and set(entry["dtypes"]) == set(DTYPES)


# -- on the GPU: LLM-sized shapes and the memory bound ------------------------------------

LLM = (8192, 4096, 128256)  # tokens, hidden size, vocabulary (Llama 3)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap, temperature", [(None, 1.0), (30.0, 0.7)])
def test_llm_sized_matches_reference(softcap, temperature, device):
    shape = (4096, 4096, 32000 + 7)
    inputs = _inputs(*shape, torch.bfloat16, device, bias=softcap is None)
    _check(inputs, torch.bfloat16, f"NxHxV={shape} bf16 softcap={softcap} T={temperature}",
           softcap=softcap, temperature=temperature)  # fmt: skip


@pytest.mark.gpu
def test_llm_sized_memory_bound(device):
    """Peak above the inputs at most 1/8 of the [N, V] fp32 logits (4.2 GB): ~525 MB,
    forward and backward, with a frozen lm_head (the LoRA case)."""
    hidden, weight, _, labels = _inputs(*LLM, torch.bfloat16, device, grads=(True, False, False))
    upstream = torch.randn(LLM[0], device=device)
    token_log_probs(hidden, weight, labels).backward(upstream)  # warm up cuBLAS, Triton
    hidden.grad = None
    peak = peak_bytes_above_inputs(
        lambda: token_log_probs(hidden, weight, labels).backward(upstream)
    )
    assert peak < 525e6, f"{LLM} bf16: {peak / 1e6:.0f} MB above the inputs"
    assert hidden.grad is not None and not hidden.grad.isnan().any()

"""Fused linear cross entropy against the torch reference: loss, gradients, memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import (
    DTYPES,
    FP32_FLOOR,
    HAS_CUDA,
    LOWP_FACTOR,
    assert_close,
    peak_bytes_above_inputs,
)
from sloth_kernels import cross_entropy as ce_module
from sloth_kernels import fused_linear_cross_entropy as flce_module
from sloth_kernels.fused_linear_cross_entropy import default_chunk_size, fused_linear_cross_entropy

from sloth_core.ops import reference
from sloth_core.testing.host_syncs import HostSyncs
from sloth_core.testing.rounding import assert_near_fp32


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 256 columns, so CPU-sized vocabularies take several online-lse steps."""
    if not HAS_CUDA:
        monkeypatch.setattr(ce_module, "MAX_BLOCK", 256)


def _inputs(n_rows, hidden_size, vocab, dtype, device, *, bias=False, grads=(True, True, True)):
    hidden = torch.randn(n_rows, hidden_size, device=device).to(dtype)
    # Scale so logits spread over several units: peaked and flat softmax rows both.
    weight = (torch.randn(vocab, hidden_size, device=device) * 2 / hidden_size**0.5).to(dtype)
    b = torch.randn(vocab, device=device).to(dtype) if bias else None
    tensors = (hidden, weight, b)
    for t, needs in zip(tensors, grads, strict=True):
        if t is not None:
            t.requires_grad_(needs)
    labels = torch.randint(0, vocab, (n_rows,), device=device)
    return hidden, weight, b, labels


def _grads(tensors):
    return [None if t is None or not t.requires_grad else t.grad for t in tensors]


def _run(fn, hidden, weight, bias, labels, grad_scale=1.0, **kwargs):
    """Loss and gradients of ``fn`` on fresh leaves that share the inputs' values."""
    leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in
              (hidden, weight, bias)]  # fmt: skip
    loss = fn(leaves[0], leaves[1], labels, bias=leaves[2], **kwargs)
    if loss.requires_grad:
        (loss * grad_scale).backward()
    return loss, _grads(leaves)


def _fp32(tensors):
    """fp32 copies of the (already rounded) inputs, asking for the same gradients."""
    return [None if t is None else t.detach().float().requires_grad_(t.requires_grad)
            for t in tensors]  # fmt: skip


def assert_grad_close(actual, expected, baseline, what, labels=None, scale=None):
    """``actual`` against ``expected``, the reference's gradient in fp32 on the same
    inputs, allowed ``LOWP_FACTOR`` times the error of ``baseline`` (the reference run in
    the input dtype: rounding alone) per tensor and per row. Rows: tokens of dhidden,
    vocabulary entries of dweight and dbias, which differ by orders of magnitude (entries
    no label names get only softmax mass); scaled by the largest, most would go unseen.
    dbias with ``labels`` and ``scale`` (the gradient of one logit, dloss / tokens): see
    :func:`_dbias_floor`."""
    if expected is None:
        assert actual is None, f"{what}: a gradient where none was asked for"
        return
    assert actual.dtype == baseline.dtype and actual.shape == expected.shape, what
    row_floor = None
    if expected.dim() == 1 and labels is not None:
        row_floor = _dbias_floor(expected, labels, scale)
    assert_near_fp32(actual, expected, baseline, factor=LOWP_FACTOR, floor=FP32_FLOOR,
                     row_floor=row_floor, what=what)  # fmt: skip


def _dbias_floor(expected, labels, scale):
    """fp32's own error per dbias entry, relative to it: an entry sums one d(logit) a
    token, ``p * scale`` of either sign, and a label's ``(p - 1) * scale`` terms cancel
    the others' in the sum. Summed in another order, its error is relative to the terms
    (at most ``|entry| + 2 * scale * times labelled``), not to the sum: FP32_FLOOR of that,
    relative to the entry."""
    valid = labels[labels >= 0]
    counts = torch.bincount(valid, minlength=expected.shape[0]).to(expected)
    entry = expected.detach().abs().clamp(min=torch.finfo(torch.float32).tiny)
    return FP32_FLOOR * (1 + 2 * abs(scale) * counts / entry)


def _check(hidden, weight, bias, labels, dtype, what, grad_scale=1.0, **kwargs):
    inputs = (hidden, weight, bias, labels, grad_scale)
    loss, grads = _run(fused_linear_cross_entropy, *inputs, **kwargs)
    ref_loss, ref_grads = _run(reference.fused_linear_cross_entropy, *inputs, **kwargs)
    fp32_loss, fp32_grads = ref_loss, ref_grads
    if dtype != torch.float32:
        fp32 = (*_fp32((hidden, weight, bias)), labels, grad_scale)
        fp32_loss, fp32_grads = _run(reference.fused_linear_cross_entropy, *fp32, **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0, what
    if dtype == torch.float32:
        assert_close(loss, ref_loss, torch.float32, what=f"{what} loss")
    else:
        # Both round the logits to the input dtype, but a GPU's GEMM rounds a chunk's
        # [chunk, H] x [H, V] otherwise than the whole product's: judged against fp32, the
        # loss within twice the reference's own rounding error (plus 1e-5 relative).
        own, err = (abs(x.item() - fp32_loss.item()) for x in (ref_loss, loss))
        bound = 2 * own + 1e-5 * abs(fp32_loss.item())
        assert err <= bound, f"{what} loss: {err:.3g} from fp32, reference's own {own:.3g}"
    names = ("dhidden", "dweight", "dbias")
    tokens = kwargs.get("num_items_in_batch") or (labels >= 0).sum()
    for name, got, want, base in zip(names, grads, fp32_grads, ref_grads, strict=True):
        # all ignored: no labelled term, any scale
        scale = grad_scale / max(float(tokens), 1.0)
        assert_grad_close(got, want, base, f"{what} {name}", labels, scale)
    return loss, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bias, softcap, chunk_size",
    [(False, None, None), (True, None, 10), (False, 5.0, 16), (True, 30.0, 7)],
)
def test_matches_reference(bias, softcap, chunk_size, dtype, device):
    shape = (37, 24, 1000 + 7)  # N, H, V; chunk sizes that do not divide N
    hidden, weight, b, labels = _inputs(*shape, dtype, device, bias=bias)
    labels[torch.randperm(shape[0], device=device)[:9]] = -100
    what = f"NxHxV={shape} {dtype} bias={bias} softcap={softcap} chunk={chunk_size}"
    _check(hidden, weight, b, labels, dtype, what, softcap=softcap, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_unfused_cross_entropy(dtype, device):
    """The contract itself: the loss of ``F.linear(h, w).float()`` as HF computes it."""
    shape = (29, 40, 515)
    hidden, weight, _, labels = _inputs(*shape, dtype, device, grads=(True, False, False))
    labels[:3] = -100
    loss, (dhidden, _, _) = _run(fused_linear_cross_entropy, hidden, weight, None, labels,
                                 softcap=20.0, chunk_size=8)  # fmt: skip

    def unfused(h, w):
        h = h.detach().requires_grad_()
        loss = reference.cross_entropy(F.linear(h, w.detach()), labels, softcap=20.0)
        loss.backward()
        return loss, h.grad

    ref, ref_dhidden = unfused(hidden, weight)
    _, fp32_dhidden = unfused(hidden.float(), weight.float())
    what = f"NxHxV={shape} {dtype}"
    assert_close(loss, ref, torch.float32, what=f"{what} loss")
    assert_grad_close(dhidden, fp32_dhidden, ref_dhidden, f"{what} dhidden")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "grads",
    [(True, False, False), (False, True, True), (False, False, False)],
    ids=["frozen-weight", "frozen-hidden", "all-frozen"],
)
def test_which_gradients(grads, dtype, device):
    shape = (21, 16, 300)
    hidden, weight, b, labels = _inputs(*shape, dtype, device, bias=True, grads=grads)
    labels[-4:] = -100
    _check(hidden, weight, b, labels, dtype, f"NxHxV={shape} {dtype} grads={grads}", chunk_size=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_check_fails_wrong_gradients(dtype, device):
    """The comparison itself: the kernel's gradients pass it; zero, 0.9-scaled and
    sign-flipped ones fail, and so do weight and bias gradients with the rows of every
    entry no label names zeroed (softmax mass alone, tiny next to the labels' rows)."""
    hidden, weight, b, labels = _inputs(21, 16, 300, dtype, device, bias=True)
    inputs = (hidden, weight, b, labels, 1.0)
    _, grads = _run(fused_linear_cross_entropy, *inputs, chunk_size=8)
    _, base = _run(reference.fused_linear_cross_entropy, *inputs, chunk_size=8)
    fp32 = (*_fp32((hidden, weight, b)), labels, 1.0)
    _, want = _run(reference.fused_linear_cross_entropy, *fp32, chunk_size=8)
    named = torch.zeros(300, dtype=torch.bool, device=device)
    named[labels] = True
    scale = 1 / labels.numel()  # mean over tokens, none ignored; dloss 1
    for name, got, expected, ref in zip(("dhidden", "dweight", "dbias"), grads, want, base,
                                        strict=True):  # fmt: skip
        assert_grad_close(got, expected, ref, f"the kernel's {name}", labels, scale)
        wrong = {"zero": got * 0, "0.9x": got * 0.9, "sign": -got}
        if name != "dhidden":
            wrong["labels' rows only"] = torch.where(named.view(-1, *[1] * (got.dim() - 1)), got, 0)
        for what, bad in wrong.items():
            with pytest.raises(AssertionError):
                assert_grad_close(bad, expected, ref, f"{name} {what}", labels, scale)


def test_no_grad_mode_computes_only_the_loss(device):
    hidden, weight, _, labels = _inputs(12, 16, 300, torch.float32, device)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=5)
    assert not loss.requires_grad and hidden.grad is None and weight.grad is None
    ref = reference.fused_linear_cross_entropy(hidden.detach(), weight.detach(), labels)
    assert_close(loss, ref, torch.float32, what="no_grad loss")


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_and_upstream_gradient(as_tensor, device):
    """Summed loss over num_items; backward scales the stored gradients by dloss."""
    shape = (26, 16, 400)
    hidden, weight, b, labels = _inputs(*shape, torch.float32, device, bias=True)
    labels[:5] = -100
    num_items = torch.tensor(40, device=device) if as_tensor else 40
    what = f"NxHxV={shape} num_items={num_items!r}"
    _check(hidden, weight, b, labels, torch.float32, what, grad_scale=2.5,
           num_items_in_batch=num_items, softcap=8.0, chunk_size=9)  # fmt: skip


def test_ignored_chunks_and_all_ignored(device):
    shape = (30, 16, 300)
    hidden, weight, b, labels = _inputs(*shape, torch.float32, device, bias=True)
    labels[:20] = -100  # chunks of 8: the first two have no label at all
    loss, (dhidden, _, _) = _check(hidden, weight, b, labels, torch.float32,
                                   f"NxHxV={shape} ignored chunks", chunk_size=8)  # fmt: skip
    assert (dhidden[:20] == 0).all() and (dhidden[20:] != 0).any()

    labels.fill_(-100)  # the whole batch: loss 0 and zero gradients, as the reference
    loss, grads = _check(hidden, weight, b, labels, torch.float32, "all ignored", chunk_size=8)
    assert loss.item() == 0.0 and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("given", [False, True], ids=["found", "counted given"])
def test_only_the_counted_rows_reach_the_head(device, monkeypatch, given):
    """Ignored tokens scattered through every chunk (a chat's prompts): the head's
    matmuls see the counted rows only, and loss and gradients are the reference's; found
    by the op (one host sync) or from the caller's ``counted`` (none)."""
    hidden, weight, b, labels = _inputs(30, 16, 300, torch.float32, device, bias=True)
    labels[::3] = -100
    options = {"counted": int((labels != -100).sum())} if given else {}
    rows = []
    real = flce_module._fused_forward

    def counting(hidden, *args):
        rows.append(hidden.shape[0])
        return real(hidden, *args)

    monkeypatch.setattr(flce_module, "_fused_forward", counting)
    with HostSyncs(device) as seen:
        _, (dhidden, _, _) = _check(hidden, weight, b, labels, torch.float32,
                                    "every third ignored", chunk_size=8, **options)  # fmt: skip
    assert rows == [int((labels != -100).sum())]
    assert (dhidden[::3] == 0).all()
    kernel_syncs = [s for s in seen.syncs if "counted_rows" in s.where]
    assert bool(kernel_syncs) != given, kernel_syncs  # (on CUDA torch's check sees it too)


@pytest.mark.parametrize("counted", ["all", "none"])
def test_a_given_count_of_all_or_none(device, counted):
    """``counted`` equal to every row gathers nothing; 0 leaves no row (loss 0)."""
    hidden, weight, b, labels = _inputs(13, 16, 200, torch.float32, device, bias=True)
    if counted == "none":
        labels[:] = -100
    number = int((labels != -100).sum())
    _check(hidden, weight, b, labels, torch.float32, f"{counted} counted", counted=number)


def test_leading_dims_are_flattened(device):
    hidden, weight, _, labels = _inputs(2 * 9, 16, 200, torch.float32, device)
    hidden = hidden.detach().view(2, 9, 16).requires_grad_()
    loss = fused_linear_cross_entropy(hidden, weight, labels.view(2, 9), chunk_size=4)
    loss.backward()
    ref = reference.fused_linear_cross_entropy(hidden.detach(), weight.detach(), labels)
    assert_close(loss, ref, torch.float32, what="[2, 9, H] hidden")
    assert hidden.grad.shape == (2, 9, 16)


def test_retained_graph_backward_twice(device):
    """Backward rescales out of place: a second backward gets the same gradients."""
    hidden, weight, _, labels = _inputs(10, 16, 200, torch.float32, device)
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    (loss * 3).backward(retain_graph=True)
    first = weight.grad.clone()
    weight.grad = None
    (loss * 3).backward()
    assert_close(weight.grad, first, torch.float32, what="second backward")


def test_nothing_of_size_n_by_v_is_saved(device):
    n_rows, hidden_size, vocab = 48, 16, 1000 + 7  # N * V > V * H: a saved [N, V] would show
    hidden, weight, b, labels = _inputs(
        n_rows, hidden_size, vocab, torch.float32, device, bias=True
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=b, chunk_size=20)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(n_rows, hidden_size), (vocab, hidden_size), (vocab,)]), shapes
    assert all(t.numel() < n_rows * vocab for t in saved), shapes
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None and b.grad is not None


def test_default_chunk_size():
    # 128256 x bf16: at most 256 MiB of logits, a multiple of 64 rows, even chunks.
    assert default_chunk_size(8192, 128256, 2) == 1024
    assert default_chunk_size(1100, 128256, 2) == 576  # two chunks, not 1024 + 76
    assert default_chunk_size(100, 128256, 2) == 100
    assert default_chunk_size(5, 10**12, 4) == 1  # one row already exceeds the budget
    for n_rows, vocab, size in [(8192, 32007, 2), (70000, 152064, 2), (4096, 256000, 4)]:
        rows = default_chunk_size(n_rows, vocab, size)
        assert rows * vocab * size <= flce_module.CHUNK_BYTES and rows % 64 == 0, (n_rows, vocab)


def test_falls_back_to_reference(device):
    hidden, weight, _, labels = _inputs(6, 8, 50, torch.float32, device)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(hidden, weight, labels[:5])
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    wide = hidden.detach().double(), weight.detach().double()
    assert_close(
        fused_linear_cross_entropy(*wide, labels),
        reference.fused_linear_cross_entropy(*wide, labels), torch.float32, what="float64",
    )  # fmt: skip


def test_registered_for_the_fused_op():
    (entry,) = flce_module.REGISTRATIONS
    assert entry["op"] == "fused_linear_cross_entropy"
    assert entry["fn"] is fused_linear_cross_entropy and set(entry["dtypes"]) == set(DTYPES)


# -- on the GPU: LLM-sized shapes and the memory bound ------------------------------------
# Speed against the eager ``F.cross_entropy(F.linear(h, w).float(), labels)`` is a
# benchmark's job, not a test's: ``sloth bench kernels --ops fused_linear_cross_entropy``
# times it against that baseline (``torch_unfused``) in the same run.

LLM = (8192, 4096, 128256)  # tokens, hidden size, vocabulary (Llama 3)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab, softcap, bias", [(32000 + 7, None, True), (128256, 30.0, False)])
def test_llm_sized_matches_reference(vocab, softcap, bias, device):
    shape = (4096, 4096, vocab)
    hidden, weight, b, labels = _inputs(*shape, torch.bfloat16, device, bias=bias)
    labels[:500] = -100
    _check(hidden, weight, b, labels, torch.bfloat16, f"NxHxV={shape} bf16 softcap={softcap}",
           softcap=softcap)  # fmt: skip


@pytest.mark.gpu
def test_llm_sized_memory_bound(device):
    """Peak above the inputs at most 1/8 of the [N, V] fp32 logits (4.2 GB): ~525 MB."""
    hidden, weight, _, labels = _inputs(*LLM, torch.bfloat16, device, grads=(True, False, False))
    fused_linear_cross_entropy(hidden, weight, labels).backward()  # warm up cuBLAS, Triton
    hidden.grad = None

    def step():
        fused_linear_cross_entropy(hidden, weight, labels).backward()

    peak = peak_bytes_above_inputs(step)
    assert peak < 525e6, f"{LLM} bf16: {peak / 1e6:.0f} MB above the inputs"
    assert hidden.grad is not None and not hidden.grad.isnan().any()

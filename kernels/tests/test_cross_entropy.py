"""Cross-entropy kernel against the torch reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, HAS_CUDA, assert_close
from sloth_kernels import cross_entropy as ce_module
from sloth_kernels.cross_entropy import cross_entropy

from sloth_core.ops import reference


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 256 columns, so CPU-sized vocabularies take several online-lse steps."""
    if not HAS_CUDA:
        monkeypatch.setattr(ce_module, "MAX_BLOCK", 256)


def _inputs(n_rows, vocab, dtype, device, n_ignored=0):
    # Scale 4: peaked and flat rows both, and the softcap's curved region.
    logits = (torch.randn(n_rows, vocab, device=device) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n_rows,), device=device)
    labels[torch.randperm(n_rows, device=device)[:n_ignored]] = -100
    return logits, labels


def _fp32_reference(logits, labels, grad=None, **kwargs):
    """The reference's loss and gradient in fp32, and the slack each row's label entry
    gets in ``assert_grad_close``."""
    # HF upcasts the logits to fp32 before the loss: the reference sees the same values.
    logits32 = logits.detach().float().requires_grad_()
    loss = reference.cross_entropy(logits32, labels, **kwargs)
    upstream = torch.ones_like(loss) if grad is None else grad
    loss.backward(upstream)
    # The scale from the same reduction on all-zero logits (uniform softmax, softcap's
    # derivative 1 at 0): the label entry is then (1/V - 1) * scale, no cancellation.
    zeros = torch.zeros_like(logits32).requires_grad_()
    reference.cross_entropy(zeros, labels, **kwargs).backward(upstream)
    rows = torch.arange(len(labels), device=labels.device)
    label_entry = zeros.grad[rows, labels.clamp(0, logits.shape[-1] - 1)]
    scale = label_entry.abs() / max(1 - 1 / logits.shape[-1], 1e-30)
    # p = exp(x - lse): its exponent is good to an ulp of the row's largest logit.
    reach = 1 + logits32.detach().abs().amax(-1)
    return loss, logits32.grad, 4 * torch.finfo(torch.float32).eps * reach * scale


#: Relative error allowed on each gradient entry against the fp32 reference on the same
#: (rounded) logits. Every entry but the label's is ``softmax * upstream``, computed in
#: fp32 without cancellation and rounded once to the output dtype, so it is within one
#: unit of that rounding of the fp32 value: half a unit on a GPU, a whole one under the
#: CPU interpreter (it truncates to bf16), measured 0.99; allowed 2 units (2 eps). fp32:
#: softcap's ``1 - tanh**2`` cancels for large logits, measured 2.5e-5 relative.
GRAD_RTOL = {
    torch.float32: 1e-4,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
}


def softcap_slack(logits, expected, softcap):
    """Per-entry slack for a soft-capped gradient: it carries ``1 - tanh(x / c)^2``, which
    for logits far past the cap is a difference of nearly equal numbers, exact only to a
    few fp32 ulps of 1 whoever computes ``tanh`` (the kernel's and torch's differ). So an
    entry may be off by ``4 eps / (1 - t^2)`` of itself on top of the relative tolerance."""
    t = torch.tanh(logits.detach().double() / softcap)
    factor = (1 - t * t).clamp(min=1e-300)
    return (4 * torch.finfo(torch.float32).eps * expected.double().abs() / factor).float()


def assert_grad_close(actual, expected, labels, dtype, what, label_slack, extra=None):
    """Every entry of ``actual`` within its own relative error of ``expected``, the fp32
    reference's gradient on the same logits: ``|a - e| <= rtol * |e|`` plus two steps of
    the dtype's subnormals (fp16 flushes entries below ~6e-8).

    Not relative to the largest entry: softmax gradients span orders of magnitude
    (``exp(x - lse) / N``), and scaled by the largest nearly all of them would sit below
    any tolerance, so zeros there would pass. The label entry, ``(p - 1) / N``, cancels
    when ``p`` is near 1, so it alone gets an absolute slack of fp32 rounding
    (``label_slack`` from ``_fp32_reference``): a few ulps of ``p`` times the row's scale
    (reduction and upstream gradient). Not of the largest entry: when every row is
    peaked, that is far below the scale, and a correct kernel failed (CI, seed
    3043508775).
    """
    assert actual.dtype == dtype and actual.shape == expected.shape, what
    assert not torch.isnan(actual).any(), f"{what}: NaN (an element left unwritten?)"
    a, e = actual.float(), expected.float()  # fp32 differences: exact enough for rtol 1e-4
    slack = 2 * torch.finfo(dtype).tiny * torch.finfo(dtype).eps + torch.zeros_like(e)
    counted = (labels >= 0) & (labels < e.shape[-1])
    rows = counted.nonzero().squeeze(1)
    slack[rows, labels[rows]] += label_slack[rows]
    if extra is not None:
        slack = slack + extra
    excess = (a - e).abs() - (GRAD_RTOL[dtype] * e.abs() + slack)
    worst = excess.argmax()
    row, col = divmod(int(worst), e.shape[-1])
    assert excess.flatten()[worst] <= 0, (
        f"{what}: entry [{row}, {col}] is {a[row, col].item():.6g}, fp32 reference "
        f"{e[row, col].item():.6g}: beyond {GRAD_RTOL[dtype]:.2g} relative"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(reduction, softcap, dtype, device, small_blocks):
    shape = (19, 1000 + 7)
    logits, labels = _inputs(*shape, dtype, device, n_ignored=4)
    loss = cross_entropy(logits, labels, softcap=softcap, reduction=reduction)
    grad = torch.rand_like(loss) + 0.5  # per-token upstream gradients for "none"
    loss.backward(grad)
    what = f"{shape} {dtype} softcap={softcap} {reduction}"
    ref_loss, ref_grad, label_slack = _fp32_reference(
        logits, labels, grad, softcap=softcap, reduction=reduction
    )
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape, what
    assert_close(loss, ref_loss, torch.float32, what=f"{what} loss")
    extra = None if softcap is None else softcap_slack(logits, ref_grad, softcap)
    assert_grad_close(logits.grad, ref_grad, labels, dtype, f"{what} dlogits", label_slack, extra)
    if reduction == "none":
        assert (loss[labels == -100] == 0).all(), what


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (1, 1), (3, 2), (40, 96)])
def test_odd_shapes(shape, dtype, device, small_blocks):
    logits, labels = _inputs(*shape, dtype, device)
    loss = cross_entropy(logits, labels)
    loss.backward()
    ref_loss, ref_grad, label_slack = _fp32_reference(logits, labels)
    what = f"{shape} {dtype}"
    assert_close(loss, ref_loss, torch.float32, what=f"{what} loss")
    if shape[1] > 1:  # one class: the gradient is exactly 0
        assert_grad_close(logits.grad, ref_grad, labels, dtype, f"{what} dlogits", label_slack)
    else:
        assert (logits.grad == 0).all(), what


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_check_fails_wrong_gradients(dtype, device, small_blocks):
    """The comparison itself: the kernel's gradient passes it; a zero, 0.9-scaled or
    sign-flipped one fails, and so does one with every entry below 2 % of the largest
    zeroed (99 % of them: a bf16 tolerance relative to the largest entry let that pass)."""
    logits, labels = _inputs(7, 300, dtype, device, n_ignored=2)
    cross_entropy(logits, labels).backward()
    _, ref_grad, label_slack = _fp32_reference(logits, labels)
    grad = logits.grad
    assert_grad_close(grad, ref_grad, labels, dtype, "the kernel's gradient", label_slack)
    small = ref_grad.abs() < 0.02 * ref_grad.abs().max()
    wrong = {"zero": grad * 0, "0.9x": grad * 0.9, "sign": -grad,
             "small entries zeroed": torch.where(small, 0, grad)}  # fmt: skip
    for name, bad in wrong.items():
        with pytest.raises(AssertionError):
            assert_grad_close(bad, ref_grad, labels, dtype, name, label_slack)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_num_items_in_batch(softcap, as_tensor, device, small_blocks):
    shape = (17, 515)
    logits, labels = _inputs(*shape, torch.float32, device, n_ignored=5)
    num_items = torch.tensor(23, device=device) if as_tensor else 23
    loss = cross_entropy(logits, labels, softcap=softcap, num_items_in_batch=num_items)
    loss.backward()
    ref_loss, ref_grad, label_slack = _fp32_reference(
        logits, labels, softcap=softcap, num_items_in_batch=num_items
    )
    what = f"{shape} softcap={softcap} num_items={num_items!r}"
    assert_close(loss, ref_loss, torch.float32, what=f"{what} loss")
    assert_grad_close(logits.grad, ref_grad, labels, torch.float32, f"{what} dlogits", label_slack)


def test_custom_ignore_index_and_all_ignored(device, small_blocks):
    logits, labels = _inputs(6, 300, torch.float32, device)
    labels[::2] = 7  # class 7 doubles as the ignore index
    loss = cross_entropy(logits, labels, ignore_index=7)
    loss.backward()
    ref_loss, ref_grad, label_slack = _fp32_reference(logits, labels, ignore_index=7)
    assert_close(loss, ref_loss, torch.float32, what="ignore_index=7 loss")
    assert_grad_close(
        logits.grad, ref_grad, labels, torch.float32, "ignore_index=7 dlogits", label_slack
    )
    assert (logits.grad[::2] == 0).all()

    # Every label ignored: the reference defines the mean as 0 with zero gradients.
    logits.grad = None
    labels.fill_(-100)
    loss = cross_entropy(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


def test_strided_rows(device, small_blocks):
    """A row-strided view (e.g. logits sliced out of a wider buffer) is read in place."""
    wide = torch.randn(9, 700, device=device) * 3
    logits = wide[:, :555].requires_grad_()
    labels = torch.randint(0, 555, (9,), device=device)
    loss = cross_entropy(logits, labels, softcap=10.0)
    loss.backward()
    ref_loss, ref_grad, label_slack = _fp32_reference(logits, labels, softcap=10.0)
    assert_close(loss, ref_loss, torch.float32, what="strided loss")
    assert_grad_close(logits.grad, ref_grad, labels, torch.float32, "strided dlogits", label_slack)


def test_saves_only_inputs_and_row_lse(device):
    """Backward recomputes the softmax: no new [N, V] tensor is kept, just lse [N] fp32."""
    logits, labels = _inputs(8, 333, torch.bfloat16, device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = cross_entropy(logits, labels)
    new = [t for t in saved if t.data_ptr() not in (logits.data_ptr(), labels.data_ptr())]
    # What is left: the lse, and the tiny tensors of torch's own mean (count, sum).
    assert all(t.numel() <= logits.shape[0] for t in new), [tuple(t.shape) for t in new]
    assert any(t.shape == (8,) and t.dtype == torch.float32 for t in new)
    loss.backward()
    assert logits.grad.shape == logits.shape


def test_falls_back_to_reference(device):
    logits, labels = _inputs(4, 50, torch.float32, device)
    with pytest.raises(ValueError):
        cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ValueError):
        cross_entropy(logits, labels, num_items_in_batch=3, reduction="none")
    wide = logits.detach().double()
    assert_close(
        cross_entropy(wide, labels), reference.cross_entropy(wide, labels), torch.float32,
        what="float64 falls back",
    )  # fmt: skip


def test_registered_for_the_cross_entropy_op():
    (entry,) = ce_module.REGISTRATIONS
    assert entry["op"] == "cross_entropy" and entry["fn"] is cross_entropy
    assert set(entry["dtypes"]) == set(DTYPES)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32000 + 7, 128256])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_llm_sized(vocab, softcap, device):
    shape = (8192, vocab)
    logits, labels = _inputs(*shape, torch.bfloat16, device, n_ignored=1000)
    loss = cross_entropy(logits, labels, softcap=softcap)
    loss.backward()
    ref_loss, ref_grad, label_slack = _fp32_reference(logits, labels, softcap=softcap)
    what = f"{shape} bf16 softcap={softcap}"
    assert_close(loss, ref_loss, torch.float32, scale=10, what=f"{what} loss")  # 8k-term sums
    assert_grad_close(logits.grad, ref_grad, labels, torch.bfloat16, f"{what} dlogits", label_slack)

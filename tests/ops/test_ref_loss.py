"""The loss references against torch / transformers' ForCausalLMLoss, and fused vs unfused."""

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close as _assert_close
from _helpers import draw as _draw
from transformers.loss.loss_utils import ForCausalLMLoss, fixed_cross_entropy

from sloth_core.ops.reference import cross_entropy, fused_linear_cross_entropy
from sloth_core.ops.reference.loss import CHUNK_BYTES, default_chunk_size
from sloth_core.testing.rounding import assert_near_fp32

IGNORE = -100


def _labels(n, vocab, ignore_fraction=0.3):
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < ignore_fraction] = IGNORE
    labels[0] = int(torch.randint(0, vocab, ()).item())  # at least one counted token
    return labels


def _grad(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(reduction):
    seed, (n, extra) = _draw((1, 5 * 123), (0, 40))
    vocab = 1000 + extra
    logits, labels = torch.randn(n, vocab) * 4, _labels(n, vocab)
    what = f"cross_entropy {reduction} logits={[n, vocab]} seed={seed}"

    def expected(x):
        return F.cross_entropy(x, labels, ignore_index=IGNORE, reduction=reduction)

    def actual(x):
        return cross_entropy(x, labels, reduction=reduction)

    upstream = torch.randn(n) if reduction == "none" else torch.ones(())
    _assert_close(actual(logits), expected(logits), f"{what} forward")
    _, (g_ref,) = _grad(lambda x: (actual(x) * upstream).sum(), logits)
    _, (g_hf,) = _grad(lambda x: (expected(x) * upstream).sum(), logits)
    _assert_close(g_ref, g_hf, f"{what} grad logits")
    if reduction == "none":
        assert bool((actual(logits)[labels == IGNORE] == 0).all()), f"{what}: ignored tokens"


def test_cross_entropy_matches_for_causal_lm_loss_with_num_items():
    # ForCausalLMLoss shifts; the reference takes aligned labels, so shift them here.
    seed, (b, s, extra) = _draw((1, 4), (2, 40), (0, 30))
    vocab = 1000 + extra
    logits = torch.randn(b, s, vocab, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (b, s))
    labels[torch.rand(b, s) < 0.3] = IGNORE
    # At least one counted token after the shift: with none, transformers' mean is 0/0 =
    # NaN where sloth's is 0 (test_cross_entropy_all_ignored_is_zero_not_nan).
    labels[0, 1] = int(torch.randint(0, vocab, ()).item())
    num_items = torch.tensor(int(torch.randint(1, b * s + 5, ()).item()))
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1)
    what = f"ForCausalLMLoss bf16 logits={[b, s, vocab]} num_items={num_items.item()} seed={seed}"
    for n_items in (num_items, None):
        out_hf, (g_hf,) = _grad(
            lambda x, n=n_items: ForCausalLMLoss(x, labels, vocab, num_items_in_batch=n), logits
        )
        out_ref, (g_ref,) = _grad(
            lambda x, n=n_items: cross_entropy(x.view(-1, vocab), shifted, num_items_in_batch=n),
            logits,
        )
        _assert_close(out_ref, out_hf, f"{what} n_items={n_items} forward")
        _assert_close(g_ref.float(), g_hf.float(), f"{what} n_items={n_items} grad")


def test_cross_entropy_num_items_and_softcap_match_fixed_cross_entropy():
    seed, (n, extra, cap) = _draw((1, 300), (0, 30), (5, 50))
    vocab, softcap = 1000 + extra, float(cap)
    logits, labels = torch.randn(n, vocab) * 30, _labels(n, vocab)
    num_items = int(torch.randint(1, 2 * n, ()).item())
    what = f"softcap={softcap} logits={[n, vocab]} num_items={num_items} seed={seed}"
    out_hf, (g_hf,) = _grad(
        lambda x: fixed_cross_entropy(softcap * torch.tanh(x / softcap), labels, num_items), logits
    )
    out_ref, (g_ref,) = _grad(
        lambda x: cross_entropy(x, labels, softcap=softcap, num_items_in_batch=num_items), logits
    )
    _assert_close(out_ref, out_hf, f"{what} forward")
    _assert_close(g_ref, g_hf, f"{what} grad")


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(7, 1007)
    labels = torch.full((7,), IGNORE)
    assert torch.isnan(F.cross_entropy(logits, labels)), "torch changed: revisit the docstring"
    loss, (grad,) = _grad(lambda x: cross_entropy(x, labels), logits)
    assert loss.item() == 0.0 and bool((grad == 0).all())


def _unfused(hidden, weight, bias, labels, **options):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return cross_entropy(logits, labels, **options)


def _compare_fused(n, hidden_size, vocab, labels, what, chunk_size, bias=False, **options):
    hidden = torch.randn(n, hidden_size)
    weight = torch.randn(vocab, hidden_size) / hidden_size**0.5
    inputs = [hidden, weight] + ([torch.randn(vocab)] if bias else [])

    def fused(h, w, *b):
        return fused_linear_cross_entropy(
            h, w, labels, bias=b[0] if b else None, chunk_size=chunk_size, **options
        )

    def unfused(h, w, *b):
        return _unfused(h, w, b[0] if b else None, labels, **options)

    out_ref, grads_ref = _grad(unfused, *inputs)
    out_fused, grads_fused = _grad(fused, *inputs)
    _assert_close(out_fused, out_ref, f"{what} loss")
    names = ("hidden", "weight", "bias")[: len(inputs)]  # a bias only where one was given
    for name, a, e in zip(names, grads_fused, grads_ref, strict=True):
        _assert_close(a, e, f"{what} grad {name}")
    return out_fused


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"softcap": 30.0},
        {"num_items_in_batch": "random"},
        {"bias": True},
        {"softcap": 15.0, "num_items_in_batch": "random", "bias": True},
    ],
    ids=["plain", "softcap", "num_items", "bias", "all"],
)
def test_fused_linear_cross_entropy_matches_unfused(options):
    seed, (n, hidden_size, extra, chunk) = _draw((2, 5 * 23), (4, 40), (0, 20), (1, 40))
    vocab = 1000 + extra
    options = dict(options)
    if options.get("num_items_in_batch") == "random":
        options["num_items_in_batch"] = torch.tensor(int(torch.randint(1, 2 * n, ()).item()))
    labels = _labels(n, vocab)
    chunk_size = chunk if n % chunk else chunk + 1  # a short last chunk
    what = f"fused N={n} H={hidden_size} V={vocab} chunk={chunk_size} {options} seed={seed}"
    _compare_fused(n, hidden_size, vocab, labels, what, chunk_size, **options)


def test_fused_linear_cross_entropy_skips_all_ignored_chunks():
    seed, (chunks, chunk_size, hidden_size) = _draw((3, 6), (2, 9), (4, 24))
    n, vocab = chunks * chunk_size - 1, 1007
    labels = _labels(n, vocab)
    labels[:chunk_size] = IGNORE  # the whole first chunk
    labels[2 * chunk_size : 3 * chunk_size] = IGNORE  # and the third
    labels[-1] = 3
    what = f"fused ignored chunks N={n} chunk={chunk_size} H={hidden_size} seed={seed}"
    _compare_fused(n, hidden_size, vocab, labels, what, chunk_size, bias=True, softcap=20.0)


def test_fused_linear_cross_entropy_all_ignored_batch_is_zero():
    n, hidden_size, vocab = 9, 8, 1007
    labels = torch.full((n,), IGNORE)
    loss = _compare_fused(n, hidden_size, vocab, labels, "fused all ignored", 4, bias=True)
    assert loss.item() == 0.0


def test_fused_linear_cross_entropy_default_chunk_and_leading_dims():
    seed, (b, s, hidden_size) = _draw((1, 3), (2, 17), (4, 24))
    vocab = 1007
    hidden = torch.randn(b, s, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s))
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    expected = _unfused(hidden.view(-1, hidden_size), weight, None, labels.view(-1))
    _assert_close(loss, expected, f"default chunk x={[b, s, hidden_size]} seed={seed}")
    assert 1 <= default_chunk_size(vocab) * vocab * 4 <= CHUNK_BYTES
    assert default_chunk_size(128_256) * 128_256 * 4 <= CHUNK_BYTES
    assert default_chunk_size(10**12) == 1


def test_fused_linear_cross_entropy_only_grads_that_are_needed():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(1007, 8)  # frozen lm_head: no [V, H] gradient is computed
    labels = torch.randint(0, 1007, (10,))
    fused_linear_cross_entropy(hidden, weight, labels, chunk_size=3).backward()
    assert hidden.grad is not None and weight.grad is None


def test_fused_linear_cross_entropy_saves_nothing_of_size_n_by_v():
    seed, (n, hidden_size) = _draw((40, 80), (4, 12))
    vocab = 1007
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    bias = torch.randn(vocab, requires_grad=True)
    labels = _labels(n, vocab)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=16)
    loss.backward()
    what = f"N={n} H={hidden_size} V={vocab} seed={seed}: saved {saved}"
    assert saved, f"{what}: the hook saw nothing; the check would be vacuous"
    largest = max(torch.Size(shape).numel() for shape in saved)
    assert largest < n * vocab, what
    allowed = {(n, hidden_size), (vocab, hidden_size), (vocab,)}  # the three gradients
    assert set(saved) <= allowed, what


#: bf16 gradients of the fused reference may be this many times as far from an fp32 run
#: as the unfused bf16 path's: both round d(logits) to bf16 before the matmuls, the fused
#: one also each chunk's weight gradient (measured up to 1.75x over 300 draws).
BF16_FACTOR = 2.5


def _bf16_fused_and_unfused(n, hidden_size, vocab=1007):
    """The fused reference's loss and gradients in bf16, the unfused path's in bf16 (the
    baseline) and in fp32 on the same bf16-rounded values (the truth)."""
    hidden = torch.randn(n, hidden_size, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).bfloat16().requires_grad_()
    labels = _labels(n, vocab)
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=7)
    expected = _unfused(hidden, weight, None, labels)
    grads = torch.autograd.grad(loss, [hidden, weight])
    grads_bf16 = torch.autograd.grad(expected, [hidden, weight])
    fp32 = [t.detach().float().requires_grad_() for t in (hidden, weight)]
    grads_fp32 = torch.autograd.grad(_unfused(*fp32, None, labels), fp32)
    return (loss, expected), grads, grads_bf16, grads_fp32


def _assert_bf16_grads(grads, grads_bf16, grads_fp32, what):
    for name, a, base, e in zip(("hidden", "weight"), grads, grads_bf16, grads_fp32, strict=True):
        assert a.dtype == torch.bfloat16, f"{what} grad {name}: {a.dtype}"
        assert_near_fp32(a, e, base, factor=BF16_FACTOR, floor=1e-5, what=f"{what} grad {name}")


def test_fused_linear_cross_entropy_bf16_keeps_dtypes():
    seed, (n, hidden_size) = _draw((5, 40), (8, 32))
    (loss, expected), grads, grads_bf16, grads_fp32 = _bf16_fused_and_unfused(n, hidden_size)
    what = f"bf16 N={n} H={hidden_size} seed={seed}"
    assert loss.dtype == torch.float32, what
    _assert_close(loss, expected, what, tol=1e-3)  # same bf16 logits, fp32 loss
    _assert_bf16_grads(grads, grads_bf16, grads_fp32, what)


def test_bf16_gradient_check_fails_wrong_gradients():
    """The bf16 comparison itself: zero, 0.9-scaled and sign-flipped gradients fail it
    (an absolute 2e-2 let zeros pass: max |dhidden| is ~0.014)."""
    seed, (n, hidden_size) = _draw((5, 40), (8, 32))
    _, grads, grads_bf16, grads_fp32 = _bf16_fused_and_unfused(n, hidden_size)
    _assert_bf16_grads(grads, grads_bf16, grads_fp32, f"seed={seed}")
    for i in range(2):
        for factor in (0.0, 0.9, -1.0):
            wrong = list(grads)
            wrong[i] = grads[i] * factor
            with pytest.raises(AssertionError):
                _assert_bf16_grads(wrong, grads_bf16, grads_fp32, f"x{factor} seed={seed}")

"""The chunked token log-prob reference against the unfused computation, and its memory."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_close as _assert_close
from _helpers import draw as _draw
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sloth_core.ops.reference import token_log_probs
from sloth_core.testing.rounding import assert_near_fp32

IGNORE = -100
#: fp32 error allowed against the unfused computation: the same operations on the same
#: values, only the matmul split into row chunks and the log-softmax as ``z - lse``.
TOL = 1e-6
#: Except dhidden: each element is a V-long fp32 dot product, which BLAS sums in an order
#: that depends on the matmul's row count (a chunk's against all N; a matrix-vector path
#: under 4 rows). Each path is ~4e-7 from float64, so two right answers differ by up to
#: 1.1e-6 (measured over 300 draws at chunks >= 4; 1.3e-6 at 1 to 3 rows).
TOL_HIDDEN = 2e-6
TOLS = {"hidden": TOL_HIDDEN, "weight": TOL, "bias": TOL}


def unfused_log_probs(hidden, weight, labels, bias=None, softcap=None, temperature=1.0):
    """The contract, spelled the way the preference losses compute it without the op."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != IGNORE
    targets = torch.where(valid, labels, 0).unsqueeze(-1)
    log_probs = torch.log_softmax(logits / temperature, -1).gather(-1, targets).squeeze(-1)
    return torch.where(valid, log_probs, 0.0)


def _labels(n, vocab, ignore_fraction=0.3):
    labels = torch.randint(0, vocab, (n,))
    labels[torch.rand(n) < ignore_fraction] = IGNORE
    labels[0] = int(torch.randint(0, vocab, ()).item())  # at least one counted token
    return labels


def _inputs(n, hidden_size, vocab, dtype=torch.float32, bias=False):
    hidden = torch.randn(n, hidden_size)
    # Logits spread over several units: peaked and flat softmax rows both.
    weight = torch.randn(vocab, hidden_size) * 2 / hidden_size**0.5
    tensors = [hidden, weight] + ([torch.randn(vocab)] if bias else [])
    return [t.to(dtype).requires_grad_() for t in tensors]


def _run(fn, inputs, labels, upstream, **options):
    """Output and the gradients of every input for a per-token upstream gradient."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    bias = leaves[2] if len(leaves) == 3 else None
    out = fn(leaves[0], leaves[1], labels, bias=bias, **options)
    return out, torch.autograd.grad(out, leaves, upstream)


@pytest.mark.parametrize(
    "options",
    [{}, {"softcap": 30.0}, {"temperature": "random"}, {"bias": True},
     {"softcap": 7.0, "temperature": "random", "bias": True}],
    ids=["plain", "softcap", "temperature", "bias", "all"],
)  # fmt: skip
def test_matches_unfused_fp32(options):
    seed, (n, hidden_size, extra, chunk) = _draw((2, 5 * 23), (4, 40), (0, 20), (1, 40))
    vocab = 1001 + 2 * extra  # odd
    options = dict(options)
    bias = options.pop("bias", False)
    if options.get("temperature") == "random":
        options["temperature"] = float(torch.empty(()).uniform_(0.3, 2.5))
    chunk_size = chunk if n % chunk else chunk + 1  # a short last chunk
    labels, upstream = _labels(n, vocab), torch.randn(n)
    inputs = _inputs(n, hidden_size, vocab, bias=bias)
    what = f"N={n} H={hidden_size} V={vocab} chunk={chunk_size} bias={bias} {options} seed={seed}"

    out, grads = _run(token_log_probs, inputs, labels, upstream, chunk_size=chunk_size, **options)
    ref, ref_grads = _run(unfused_log_probs, inputs, labels, upstream, **options)
    _assert_close(out, ref, f"{what} log-probs", tol=TOL)
    assert bool((out[labels == IGNORE] == 0).all()), f"{what}: ignored tokens not exactly 0"
    for name, a, e in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
        _assert_close(a, e, f"{what} grad {name}", tol=TOLS[name])
    assert bool((grads[0][labels == IGNORE] == 0).all()), f"{what}: ignored rows' dhidden"


def test_ignored_chunks_all_ignored_and_leading_dims():
    seed, (b, s, hidden_size) = _draw((2, 3), (9, 17), (4, 24))
    vocab = 503
    labels = _labels(b * s, vocab)
    labels[:8] = IGNORE  # two whole chunks: skipped, yet 0 with zero gradients
    hidden, weight, bias = _inputs(b * s, hidden_size, vocab, bias=True)
    upstream = torch.randn(b, s)
    what = f"[{b}, {s}, {hidden_size}] V={vocab} seed={seed}"

    def op(h, w, lab, bias):
        return token_log_probs(h.view(b, s, -1), w, lab.view(b, s), bias=bias, chunk_size=4)

    out, grads = _run(op, (hidden, weight, bias), labels, upstream)
    assert out.shape == (b, s) and out.dtype == torch.float32, what
    ref, ref_grads = _run(unfused_log_probs, (hidden, weight, bias), labels, upstream.view(-1))
    _assert_close(out.view(-1), ref, what, tol=TOL)
    for name, a, e in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=False):
        _assert_close(a.view(e.shape), e, f"{what} grad {name}", tol=TOLS[name])
    assert bool((grads[0].view(b * s, -1)[:8] == 0).all()), what

    labels.fill_(IGNORE)
    out, grads = _run(token_log_probs, (hidden, weight, bias), labels, upstream.view(-1))
    assert bool((out == 0).all()) and all(bool((g == 0).all()) for g in grads), what


def test_only_needed_gradients_and_no_grad():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(1007, 8)  # frozen lm_head: no [V, H] gradient is computed
    labels = torch.randint(0, 1007, (10,))
    token_log_probs(hidden, weight, labels, chunk_size=3).sum().backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():  # a reference model's log-probs
        out = token_log_probs(hidden, weight, labels, chunk_size=3)
    _assert_close(out, unfused_log_probs(hidden, weight, labels).detach(), "no_grad", tol=TOL)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 0.0}, {"softcap": -1.0}, {"chunk_size": 0}, {"labels": torch.zeros(4)}],
    ids=["temperature", "softcap", "chunk", "labels"],
)
def test_invalid_arguments(kwargs):
    kwargs = {"labels": torch.zeros(5, dtype=torch.long), **kwargs}
    with pytest.raises(ValueError):
        token_log_probs(torch.randn(5, 8), torch.randn(11, 8), **kwargs)


#: bf16 log-probs and gradients of the op may be this many times as far from an fp32 run
#: as the unfused bf16 path's. Forward: both take the same bf16 logits (the matmul split
#: into row chunks) and reduce in fp32, so ~1x. Backward: both round d(logits) to bf16
#: before the matmuls; the op also rounds each chunk's weight-gradient matmul to bf16
#: before summing in fp32, one extra rounding per chunk (the fused cross entropy's
#: reference, built the same way, measured up to 1.75x over 300 draws).
BF16_FACTOR = 2.5


def test_bf16_within_rounding_of_fp32():
    """Also the bf16 comparison itself: zero, 0.9-scaled and sign-flipped results fail it."""
    seed, (n, hidden_size, extra) = _draw((5, 40), (8, 32), (0, 20))
    vocab = 1001 + 2 * extra
    inputs = _inputs(n, hidden_size, vocab, dtype=torch.bfloat16, bias=True)
    labels, upstream = _labels(n, vocab), torch.randn(n)
    out, grads = _run(token_log_probs, inputs, labels, upstream, softcap=20.0, chunk_size=7)
    base = _run(unfused_log_probs, inputs, labels, upstream, softcap=20.0)
    fp32 = [t.detach().float() for t in inputs]
    truth = _run(unfused_log_probs, fp32, labels, upstream, softcap=20.0)
    what = f"bf16 N={n} H={hidden_size} V={vocab} seed={seed}"
    assert out.dtype == torch.float32 and [g.dtype for g in grads] == [torch.bfloat16] * 3, what
    names = ("log-probs", "grad hidden", "grad weight", "grad bias")
    for name, a, b, e in zip(
        names, (out, *grads), (base[0], *base[1]), (truth[0], *truth[1]), strict=True
    ):
        near = dict(factor=BF16_FACTOR, floor=1e-5, rows=a.dim() > 1, what=f"{what} {name}")
        assert_near_fp32(a, e, b, **near)
        for factor in (0.0, 0.9, -1.0):
            with pytest.raises(AssertionError):
                assert_near_fp32(a * factor, e, b, **near)


class _PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage allocated inside the mode and still alive, and their peak.

    Every op's outputs are seen; a storage none of the op's inputs shares is a new
    allocation, counted until Python's weak reference to it dies (torch keeps one Python
    object per storage while it lives). Storages from before the mode count as 0.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}  # fmt: skip
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._seen:
                continue
            self._seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def _peak_bytes(fn):
    with _PeakMemory() as memory:
        fn()
    return memory.peak


def test_peak_memory_under_an_eighth_of_the_logits():
    """Forward and backward together peak under 1/8 of the [N, V] fp32 logits; the same
    measure sees the unfused path's logits (so it is not blind)."""
    seed, (n, hidden_size) = _draw((2000, 2100), (8, 16))
    vocab, chunk_size = 1001, 32
    hidden, weight, bias = _inputs(n, hidden_size, vocab, bias=True)
    labels, upstream = _labels(n, vocab), torch.randn(n)
    logits_bytes = n * vocab * 4

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        peak = _peak_bytes(lambda: _run(token_log_probs, (hidden, weight, bias), labels, upstream,
                                        chunk_size=chunk_size))  # fmt: skip
    unfused = _peak_bytes(lambda: _run(unfused_log_probs, (hidden, weight, bias), labels, upstream))
    what = f"N={n} H={hidden_size} V={vocab} chunk={chunk_size} seed={seed}"
    assert unfused >= logits_bytes, f"{what}: the measure missed the unfused logits ({unfused})"
    assert peak < logits_bytes / 8, f"{what}: peak {peak} B, logits {logits_bytes} B"
    assert all(torch.Size(s).numel() < n * vocab for s in saved), f"{what}: saved {saved}"
    print(f"{what}: peak/logits = {peak / logits_bytes:.4f}, unfused {unfused / logits_bytes:.2f}")

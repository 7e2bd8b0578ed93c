"""The gated activation with the adapters' thin products added in the kernel
(:mod:`sloth_kernels.gated_lora`) against torch: the sums rounded to the dtype, then the
activation, forward and backward, on odd shapes, ranks that are not powers of two, and a
projection without an adapter."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, FP32_FLOOR, HAS_CUDA, LOWP_FACTOR
from sloth_kernels.gated_lora import (
    TILE_ENV,
    Addend,
    Addends,
    gated_lora_backward_inplace,
    gated_lora_forward,
    serves,
)

from sloth_core.ops import reference
from sloth_core.testing.rounding import assert_near_fp32

#: Three roundings in series (the sum, the activation, the product): the CPU interpreter's
#: truncations, biased alike, add up past the factor one rounding gets there (3.3x to
#: 4.1x torch's error in bf16 on 1,800 elements); on a GPU they round as torch does.
FACTOR = LOWP_FACTOR if HAS_CUDA else 6.0
ACTS = {
    "swiglu": reference.swiglu,
    "geglu": lambda g, u: reference.geglu(g, u, "none"),
    "geglu_tanh": lambda g, u: reference.geglu(g, u, "tanh"),
}


def _case(rows, inter, ranks, dtype, device):
    """Base products, the stacked x A^T (a spare column at each end: the slices must be
    honoured), and an Addend per rank (None: no adapter)."""
    gate = (torch.randn(rows, inter, device=device) * 2).to(dtype)
    up = torch.randn(rows, inter, device=device).to(dtype)
    total = sum(r for r in ranks if r) + 2
    xa = torch.randn(rows, total, device=device).to(dtype)
    addends, start = [], 1
    for rank, scaling in zip(ranks, (0.75, 2.0), strict=True):
        if not rank:
            addends.append(None)
            continue
        b = (torch.randn(inter, rank, device=device) * 0.5).to(dtype)
        addends.append(Addend(start, rank, b, scaling))
        start += rank
    return gate, up, Addends(xa, *addends)


def _sums(gate, up, addends, low: bool):
    """Gate's and up's sums with their adapters: as the unfused path makes them (``addmm_``
    in the dtype, ``low``) or in float32, unrounded."""
    out = []
    for base, addend in ((gate, addends.gate), (up, addends.up)):
        if addend is None:
            out.append(base.clone() if low else base.float())
            continue
        xa = addends.xa[:, addend.start : addend.start + addend.rank]
        if low:
            out.append(torch.addmm(base, xa, addend.b.t(), alpha=addend.scaling))
        else:
            out.append(base.float() + addend.scaling * (xa.float() @ addend.b.float().t()))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize(
    ("rows", "inter", "ranks"),
    [(37, 257, (4, 20)), (64, 128, (16, None)), (9, 200, (None, 8)), (70, 130, (128, 1))],
)
@pytest.mark.parametrize("tile", ["32,128,4,1", "32,128,4,0"], ids=["dot", "outer"])
def test_forward_and_backward_match_torch(rows, inter, ranks, activation, dtype, tile, device,
                                          monkeypatch):  # fmt: skip
    """Judged against float32 autograd on the same inputs, within a few times the
    error of torch's own path in the dtype (the sums by ``addmm``, then the reference
    activation): the sums are rounded to the dtype in between, as there."""
    monkeypatch.setenv(TILE_ENV, tile)  # the thin product through tl.dot, or outer products
    gate, up, addends = _case(rows, inter, ranks, dtype, device)
    act = ACTS[activation]
    what = f"{activation} {rows}x{inter} ranks {ranks} {dtype} tile {tile}"
    results = {}
    for low in (True, False):
        g, u = (t.requires_grad_() for t in _sums(gate, up, addends, low))
        out = act(g, u)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(rows))
        out.backward(grad.to(device=device, dtype=out.dtype))
        results[low] = (out.detach(), g.grad, u.grad)
    out = gated_lora_forward(gate, up, addends, activation)
    assert out.shape == gate.shape and out.dtype == dtype
    up_before = up.clone()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(rows))
    d_gate, d_up = gated_lora_backward_inplace(
        grad.to(device=device, dtype=dtype), gate, up, addends, activation
    )
    assert d_gate.data_ptr() == gate.data_ptr() and d_up.data_ptr() == up.data_ptr()
    assert not torch.equal(up, up_before)  # written over
    for name, actual, baseline, expected in zip(
        ("out", "d_gate", "d_up"), (out, d_gate, d_up), results[True], results[False],
        strict=True,
    ):  # fmt: skip
        assert_near_fp32(actual, expected, baseline, factor=FACTOR, floor=FP32_FLOOR,
                         what=f"{what} {name}")  # fmt: skip


def test_rows_of_the_products_take_the_same_rows_of_x_a(device):
    """A chunk of rows (the MLP's backward recomputes ``h`` so) gives those rows of the
    whole, bitwise."""
    gate, up, addends = _case(50, 96, (12, 4), torch.bfloat16, device)
    whole = gated_lora_forward(gate, up, addends)
    part = gated_lora_forward(gate[17:41], up[17:41], addends.rows(17, 41))
    assert torch.equal(part, whole[17:41])


def test_bad_input_is_refused_with_what_is_wrong(device, monkeypatch):
    gate, up, addends = _case(8, 32, (4, 4), torch.float32, device)
    with pytest.raises(ValueError, match="activation must be one of"):
        gated_lora_forward(gate, up, addends, "relu")
    with pytest.raises(ValueError, match="gate and up must be alike"):
        gated_lora_forward(gate, up[:, :16].contiguous(), addends)
    with pytest.raises(ValueError, match="contiguous"):
        gated_lora_forward(gate.t().contiguous().t(), up, addends)
    wide = Addends(addends.xa, Addend(7, 4, addends.gate.b, 1.0), None)
    with pytest.raises(ValueError, match="past x A"):
        gated_lora_forward(gate, up, wide)
    with pytest.raises(ValueError, match="does not match"):
        gated_lora_backward_inplace(gate[:4], gate, up, addends)
    assert serves(1) and serves(128) and not serves(0) and not serves(129)
    for tile in ("32,128", "32,100,4,1", "8,128,4,1", "32,128,3,0"):
        monkeypatch.setenv(TILE_ENV, tile)
        with pytest.raises(ValueError, match=TILE_ENV):
            gated_lora_forward(gate, up, addends)

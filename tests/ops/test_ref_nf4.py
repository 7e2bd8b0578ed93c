"""The NF4/FP4 dequantize reference against bitsandbytes' own quantize/dequantize on the CPU."""

import pytest
import torch
from _helpers import draw as _draw

from sloth_core.ops.reference import dequantize_nf4

BF = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bnb's pure-torch dequantize is wrapped in torch.compile, which recompiles for every
    # fresh shape (seconds each on 2 cores); eager runs the same ops.
    with torch.compiler.set_stance("force_eager"):
        yield


def _quantize(weight, nested, blocksize=64, quant_type="nf4"):
    return BF.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
    )


def _odd_shape():
    # An odd last dim: bnb 0.50's CPU dequantize then takes its pure-torch path, whose
    # flat-block layout matches CUDA's. (Its C kernel, used for even last dims, disagrees
    # with the quantizer for some row lengths: see test_dequantize_within_nf4_error_bound.)
    seed, (rows, half) = _draw((1, 140), (1, 100))
    return seed, (rows, 2 * half + 1)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_matches_bitsandbytes(quant_type, compress_statistics, blocksize):
    seed, shape = _odd_shape()
    weight = torch.randn(shape) * float(torch.rand(()) * 3 + 0.1)
    packed, state = _quantize(weight, compress_statistics, blocksize, quant_type)
    expected = BF.dequantize_4bit(packed, state)
    actual = dequantize_nf4(packed, state)
    blocks = -(-weight.numel() // blocksize)
    what = f"{quant_type} nested={compress_statistics} shape={shape} bs={blocksize}"
    what += f" blocks={blocks} seed={seed}"
    assert actual.shape == expected.shape == weight.shape and actual.dtype == torch.float32, what
    assert torch.equal(actual, expected), f"{what}: max err {(actual - expected).abs().max():.3g}"


def test_dequantize_nested_spans_several_second_level_blocks():
    # More than 256 absmax values: state2 has several blocks, the last one short.
    seed, (rows,) = _draw((70, 130))
    weight = torch.randn(rows, 257)
    packed, state = _quantize(weight, nested=True)
    what = f"shape={[rows, 257]} absmax={state.absmax.numel()} seed={seed}"
    assert state.nested and state.absmax.numel() > 256, what
    assert torch.equal(dequantize_nf4(packed, state), BF.dequantize_4bit(packed, state)), what


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_half_precision_and_dtype_override(dtype):
    seed, shape = _odd_shape()
    weight = torch.randn(shape, dtype=dtype)
    packed, state = _quantize(weight, nested=True)
    what = f"{dtype} shape={shape} seed={seed}"
    expected = BF.dequantize_4bit(packed, state)
    actual = dequantize_nf4(packed, state)
    assert actual.dtype == dtype and torch.equal(actual, expected), what
    as_fp32 = dequantize_nf4(packed, state, dtype=torch.float32)
    assert as_fp32.dtype == torch.float32 and torch.equal(as_fp32.to(dtype), expected), what


def test_dequantize_reads_non_uint8_quant_storage():
    seed, shape = _odd_shape()
    shape = (shape[0] * 4, shape[1])  # bf16 storage: four codes per element, none left over
    weight = torch.randn(shape)
    packed, state = BF.quantize_4bit(weight, quant_type="nf4", quant_storage=torch.bfloat16)
    what = f"quant_storage=bf16 shape={shape} seed={seed}"
    assert packed.dtype == torch.bfloat16, what
    assert torch.equal(dequantize_nf4(packed, state), BF.dequantize_4bit(packed, state)), what


def test_dequantize_within_nf4_error_bound():
    # Any shape, even last dims included: each value lands within half the widest gap
    # between neighbouring NF4 codes, times its block's absmax, of the original.
    seed, (rows, cols) = _draw((1, 60), (1, 200))
    weight = torch.randn(rows, cols)
    packed, state = _quantize(weight, nested=False)
    actual = dequantize_nf4(packed, state)
    flat = torch.nn.functional.pad(weight.reshape(-1), (0, (-weight.numel()) % 64)).view(-1, 64)
    half_gap = float(BF.get_4bit_type("nf4", device="cpu").diff().max()) / 2
    bound = (flat.abs().amax(1, keepdim=True) * half_gap).expand(-1, 64)
    bound = bound.reshape(-1)[: weight.numel()].view_as(weight)
    err = (actual - weight).abs()
    what = f"shape={[rows, cols]} seed={seed} worst excess {(err - bound).max():.3g}"
    assert bool((err <= bound + 1e-6).all()), what

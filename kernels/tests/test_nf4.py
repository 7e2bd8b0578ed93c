"""The Triton NF4 dequantisation against bitsandbytes' own quantizer and dequantizer."""

from __future__ import annotations

import copy

import pytest
import torch
from kernel_helpers import DEVICE
from sloth_kernels import nf4
from sloth_kernels.nf4 import REGISTRATIONS, dequantize_nf4

from sloth_core.ops import reference
from sloth_core.testing.seeds import draw as _draw  # the test's recorded seed, random sizes

bnb_functional = pytest.importorskip("bitsandbytes.functional")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bnb's CPU fallback paths are wrapped in torch.compile: compiling per shape is slow.
    with torch.compiler.set_stance("force_eager"):
        yield


def _on_device(state):
    """A copy of a ``QuantState`` with its tensors where the kernel runs."""
    moved = copy.deepcopy(state)
    moved.to(DEVICE)  # in place
    return moved


def _quantize(shape, dtype, blocksize, compress, storage=torch.uint8):
    """``(packed, state)`` on DEVICE and bnb's CPU dequantisation in fp32."""
    weight = torch.randn(shape, dtype=dtype) * 0.05
    packed, state = bnb_functional.quantize_4bit(
        weight,
        blocksize=blocksize,
        compress_statistics=compress,
        quant_type="nf4",
        quant_storage=storage,
    )
    fp32_state = copy.copy(state)
    fp32_state.dtype = torch.float32
    expected = bnb_functional.dequantize_4bit(packed, fp32_state).reshape(shape)
    return packed.to(DEVICE), _on_device(state), expected


def _expected_in(expected_fp32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bnb's value cast to ``dtype``; what Triton's interpreter writes for bf16.

    On a GPU the kernel rounds fp32 -> bf16 to nearest even, exactly as bitsandbytes and
    torch do. Triton's CPU interpreter truncates instead (its bf16 cast drops the low 16
    bits), so there the expected bf16 value is the truncated one: still an exact match.
    """
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        bits = expected_fp32.contiguous().view(torch.int32) & ~0xFFFF
        return bits.view(torch.float32).to(torch.bfloat16)
    return expected_fp32.to(dtype)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_bitsandbytes_exactly(dtype, compress, monkeypatch):
    # Few bytes per program: many programs, the last one partial, and blocks that do not
    # fill the grid; odd row lengths leave the last block short and the last byte half used.
    # (Odd rows also keep bnb 0.50's CPU dequantize on its pure-torch path: its C kernel
    # disagrees with its own quantizer for some even row lengths, e.g. [3, 48].)
    monkeypatch.setattr(nf4, "BYTES_PER_PROGRAM", 64)
    seed, (rows, half_cols, pick) = _draw((1, 9), (3, 60), (0, 2))
    blocksize = (32, 64, 128)[pick]
    shape = (rows, 2 * half_cols + 1)
    packed, state, expected = _quantize(shape, torch.float32, blocksize, compress)
    what = f"shape={shape} blocksize={blocksize} nested={compress} out={dtype} seed={seed}"
    actual = dequantize_nf4(packed, state, dtype=dtype)
    assert actual.shape == shape and actual.dtype == dtype, what
    assert torch.equal(actual.cpu(), _expected_in(expected, dtype)), (
        f"{what}: differs from bitsandbytes"
    )
    # The fp32 output is bit-exact against the torch reference too.
    if dtype == torch.float32:
        assert torch.equal(actual, reference.dequantize_nf4(packed, state, dtype=dtype)), what


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_output_dtype_is_the_quant_state_dtype(dtype, compress):
    # The weight's own dtype as quant_state.dtype, a 1-D shape of odd length, one program.
    seed, (n,) = _draw((1, 700))
    n = 2 * n + 1
    packed, state, expected = _quantize((n,), dtype, 64, compress)
    actual = dequantize_nf4(packed, state)
    what = f"shape=({n},) dtype={dtype} nested={compress} seed={seed}"
    assert actual.dtype == dtype and actual.shape == (n,), what
    assert torch.equal(actual.cpu(), _expected_in(expected, dtype)), what


def test_code_table_in_registers_gives_the_same_bits(monkeypatch):
    monkeypatch.setattr(nf4, "BYTES_PER_PROGRAM", 128)
    seed, (rows, half_cols) = _draw((2, 8), (2, 45))
    cols = 2 * half_cols + 1  # odd row length: see test_matches_bitsandbytes_exactly
    packed, state, expected = _quantize((rows, cols), torch.float32, 64, True)
    from_table = dequantize_nf4(packed, state)
    monkeypatch.setattr(nf4, "CODE_IN_REGISTERS", True)
    from_registers = dequantize_nf4(packed, state)
    what = f"shape={(rows, cols)} seed={seed}"
    assert torch.equal(from_table.cpu(), expected), what
    assert torch.equal(from_registers, from_table), what


def test_reads_non_uint8_quant_storage():
    # A bf16 quant_storage needs a multiple of 4 values; odd rows as everywhere (above).
    seed, (rows, cols) = _draw((1, 3), (4, 70))
    shape = (4 * rows, 2 * cols + 1)
    packed, state, expected = _quantize(shape, torch.float16, 128, False, storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    actual = dequantize_nf4(packed, state)
    assert torch.equal(actual.cpu(), expected.half()), f"shape={shape} seed={seed}"


def test_large_blocksize_one_block_per_program():
    # blocksize 4096: a program holds a single 2048-byte block (and a short last one).
    packed, state, expected = _quantize((3, 3001), torch.float32, 4096, True)
    assert torch.equal(dequantize_nf4(packed, state).cpu(), expected)


def test_fp4_and_unsupported_outputs_use_the_reference():
    weight = torch.randn(5, 33)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="fp4")
    actual = dequantize_nf4(packed, state)
    assert torch.equal(actual, reference.dequantize_nf4(packed, state))
    assert torch.equal(actual, bnb_functional.dequantize_4bit(packed, state))


def test_registration():
    (entry,) = REGISTRATIONS
    assert entry["op"] == "dequantize_nf4" and entry["fn"] is dequantize_nf4
    # Dispatch is on the packed weight: uint8 and other quant_storage dtypes alike.
    assert entry["dtypes"] is None


# -- on the GPU ----------------------------------------------------------------------------
# Speed against bitsandbytes' own ``dequantize_4bit`` is a benchmark's job, not a test's:
# ``sloth bench kernels --ops dequantize_nf4`` times both in the same run.


@pytest.mark.gpu
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double_quant"])
def test_gpu_8b_mlp_weight_exact(compress, monkeypatch):
    weight = torch.randn(4096, 14336, dtype=torch.bfloat16, device="cuda") * 0.02
    packed, state = bnb_functional.quantize_4bit(
        weight, compress_statistics=compress, quant_type="nf4"
    )
    expected = bnb_functional.dequantize_4bit(packed, state)
    actual = dequantize_nf4(packed, state)
    assert torch.equal(actual, expected), "bf16 output differs from bitsandbytes' CUDA kernel"
    fp32_state = copy.copy(state)
    fp32_state.dtype = torch.float32
    expected32 = bnb_functional.dequantize_4bit(packed, fp32_state)
    assert torch.equal(dequantize_nf4(packed, state, dtype=torch.float32), expected32), (
        "fp32 output"
    )

    monkeypatch.setattr(nf4, "CODE_IN_REGISTERS", not nf4.CODE_IN_REGISTERS)
    assert torch.equal(dequantize_nf4(packed, state), expected), "the other code lookup"

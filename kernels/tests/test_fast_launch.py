"""sloth_kernels.fast_launch: the compiled handle of a specialization serves the launches
that would specialize the same, every argument in signature order; anything Triton
specializes on differently compiles anew; a handle that refuses its arguments sends
every launch back to the JIT path. Against a stand-in for a JITFunction (the CPU
interpreter compiles nothing); the real kernels' tests run with SLOTH_FAST_LAUNCH=1 on
a GPU."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from sloth_kernels import fast_launch


@dataclass
class _Param:
    name: str
    default: object = None
    has_default: bool = False
    is_constexpr: bool = False


@dataclass
class _Compiled:
    launches: list = field(default_factory=list)
    refuse: bool = False

    def __getitem__(self, grid):
        def run(*args):
            if self.refuse:
                raise TypeError("function takes exactly 4 arguments")
            self.launches.append((grid, args))

        return run


class _Kernel:
    """``kernel(x_ptr, n, scale, BLOCK: constexpr, FLAG: constexpr = False)``."""

    def __init__(self) -> None:
        self.params = [_Param("x_ptr"), _Param("n"), _Param("scale"),
                       _Param("BLOCK", is_constexpr=True),
                       _Param("FLAG", False, True, is_constexpr=True)]  # fmt: skip
        self.jit_calls: list = []
        self.compiled: list[_Compiled] = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            compiled = _Compiled()
            self.compiled.append(compiled)
            return compiled

        return run


@pytest.fixture
def on(monkeypatch):
    monkeypatch.setenv(fast_launch.ENV, "1")
    monkeypatch.setattr(fast_launch, "interpreting", lambda: False)
    monkeypatch.setattr(fast_launch, "_refused", False)
    monkeypatch.setattr(fast_launch, "_compiled", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_off_by_default_every_launch_is_the_jit_path(monkeypatch):
    monkeypatch.delenv(fast_launch.ENV, raising=False)
    kernel, x = _Kernel(), torch.zeros(64)
    for _ in range(3):
        fast_launch.launch(kernel, (4,), x, 64, 0.5, BLOCK=32, num_warps=4)
    assert len(kernel.jit_calls) == 3


def test_one_specialization_compiles_once_and_launches_its_handle(on):
    kernel, x = _Kernel(), torch.zeros(64)
    fast_launch.launch(kernel, (4,), x, 64, 0.5, BLOCK=32, num_warps=4)
    fast_launch.launch(kernel, (5,), x, 80, 0.25, BLOCK=32, num_warps=4)  # same classes
    assert len(kernel.jit_calls) == 1
    # every argument in signature order, the default of FLAG filled in, no option
    assert kernel.compiled[0].launches == [((5, 1, 1), (x, 80, 0.25, 32, False))]


@pytest.mark.parametrize(
    "change",
    ["unaligned", "dtype", "n not a multiple of 16", "n is 1", "n past int32", "constexpr",
     "option", "another option"],
)  # fmt: skip
def test_anything_triton_specializes_on_compiles_anew(on, change):
    kernel, x = _Kernel(), torch.zeros(64)
    fast_launch.launch(kernel, (4,), x, 64, 0.5, BLOCK=32, num_warps=4)
    args, kwargs = [x, 64, 0.5], {"BLOCK": 32, "num_warps": 4}
    if change == "unaligned":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = x.to(torch.float16)
    elif change == "n not a multiple of 16":
        args[1] = 65
    elif change == "n is 1":
        args[1] = 1
    elif change == "n past int32":
        args[1] = 2**31 + 16
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "option":
        kwargs["num_warps"] = 8
    else:  # one this module has never heard of
        kwargs["launch_pdl"] = True
    fast_launch.launch(kernel, (4,), *args, **kwargs)
    assert len(kernel.jit_calls) == 2
    assert kernel.compiled[0].launches == []


def test_a_handle_that_refuses_its_arguments_sends_every_launch_to_the_jit_path(on):
    kernel, x = _Kernel(), torch.zeros(64)
    fast_launch.launch(kernel, (4,), x, 64, 0.5, BLOCK=32)
    kernel.compiled[0].refuse = True
    fast_launch.launch(kernel, (4,), x, 64, 0.5, BLOCK=32)  # refused, then launched by the JIT
    assert len(kernel.jit_calls) == 2 and not fast_launch.enabled()
    fast_launch.launch(kernel, (4,), x, 64, 0.5, BLOCK=32)
    assert len(kernel.jit_calls) == 3


def test_a_missing_argument_is_left_to_the_jit_path_to_report(on):
    kernel, x = _Kernel(), torch.zeros(64)
    for _ in range(2):
        fast_launch.launch(kernel, (4,), x, 64, 0.5)  # no BLOCK: Triton's error, not ours
    assert len(kernel.jit_calls) == 2

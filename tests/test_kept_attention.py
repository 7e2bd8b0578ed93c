"""The attention of an offloaded layer keeps its output and log-sum-exp in the first pass,
so its recompute runs no attention forward: gradients as without checkpointing, on varied
configs (GQA, q/k norms), and every way out of the path (a mask, plain checkpointing, a
kernel that fails) still correct."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.nn.functional as F

from sloth_core.checkpointing import (
    device_checkpoint,
    keep_for_backward,
    offloaded_checkpoint,
)
from sloth_core.memory_plan import (
    LayerMode,
    MemoryPlan,
    apply_plan,
    held_bytes_after_forward,
    measure_layer_costs,
)
from sloth_core.patches import kept_attention
from sloth_core.testing import (
    assert_same_grads,
    repeated_step_grads,
    sloth_attention_lora_model,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def _model(arch: str, device: str = "cpu", dtype=torch.float32):
    return sloth_attention_lora_model(arch, TARGETS, seed=4, device=device, dtype=dtype)


def _grads(arch, checkpoint, *, steps=2, padded=False, device="cpu", dtype=torch.float32,
           counts=None):  # fmt: skip
    model = _model(arch, device, dtype)
    if counts is not None:
        counts.clear()  # not the tiny model's own probe forward
    grads = repeated_step_grads(model, checkpoint, steps=steps, padded=padded, device=device)
    return grads, model.config.num_hidden_layers


@pytest.fixture
def calls(monkeypatch):
    """Counts of the kept path's kernel forwards and backwards, and of SDPA's calls."""
    counts: collections.Counter[str] = collections.Counter()

    def spy(kernel):
        def forward(*args):
            counts["forward"] += 1
            return kernel.forward(*args)

        def backward(*args):
            counts["backward"] += 1
            return kernel.backward(*args)

        return kernel_type(kernel.name, forward, backward)

    kernel_type = type(kept_attention._CPU)
    monkeypatch.setattr(kept_attention, "_CPU", spy(kept_attention._CPU))
    cuda = {choice: spy(k) for choice, k in kept_attention._CUDA.items()}
    monkeypatch.setattr(kept_attention, "_CUDA", cuda)
    monkeypatch.setattr(kept_attention, "_broken", set())
    sdpa = F.scaled_dot_product_attention

    def counted_sdpa(*args, **kwargs):
        counts["sdpa"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted_sdpa)
    return counts


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: per-head q/k norms
def test_the_recompute_runs_no_attention_forward(arch, calls):
    want, layers = _grads(arch, None, counts=calls)
    assert calls == {"sdpa": 2 * layers}, calls
    got, _ = _grads(arch, offloaded_checkpoint, counts=calls)
    # each step: one kernel forward per layer (the first pass), none in the recompute
    assert calls == {"forward": 2 * layers, "backward": 2 * layers}, calls
    assert_same_grads(got, want)


def test_plain_checkpointing_and_masks_keep_nothing(calls):
    want, layers = _grads("llama", None)
    got, _ = _grads("llama", device_checkpoint, counts=calls)  # inputs on the device: none kept
    assert calls == {"sdpa": 4 * layers}, calls
    assert_same_grads(got, want)
    want, _ = _grads("llama", None, padded=True)
    got, _ = _grads("llama", offloaded_checkpoint, padded=True, counts=calls)  # a mask: SDPA
    assert calls == {"sdpa": 4 * layers}, calls
    assert_same_grads(got, want)


def test_past_the_host_limit_the_recompute_computes_the_attention(calls, monkeypatch):
    from sloth_core import checkpointing

    want, layers = _grads("llama", None)
    monkeypatch.setattr(checkpointing, "_host_limit", 0)  # nothing fits
    got, _ = _grads("llama", offloaded_checkpoint, counts=calls)
    # each step: the first pass's kernel forwards, kept nowhere; SDPA in the recompute
    assert calls == {"forward": 2 * layers, "sdpa": 2 * layers}, calls
    assert_same_grads(got, want)


@pytest.mark.parametrize("fails", ["forward", "backward"])
def test_a_failing_kernel_turns_the_path_off_and_stays_correct(fails, calls, monkeypatch):
    want, _ = _grads("llama", None)
    kernel = kept_attention._CPU
    what = "kernel" if fails == "forward" else "backward"

    def broken(*args):
        raise RuntimeError("no such kernel here")

    pair = (broken, kernel.backward) if fails == "forward" else (kernel.forward, broken)
    monkeypatch.setattr(kept_attention, "_CPU", type(kernel)(kernel.name, *pair))
    with pytest.warns(UserWarning, match=f"kept attention: the flash \\(CPU\\) {what}"):
        got, _ = _grads("llama", offloaded_checkpoint)
    assert_same_grads(got, want)
    assert kept_attention._broken == {kernel.name}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # turned off: no more tries, no more warnings
        again, _ = _grads("llama", offloaded_checkpoint, steps=1)
    assert_same_grads(again, want[:1])


def test_a_kept_tensor_written_in_place_is_an_error():
    weight = torch.nn.Linear(4, 4)

    def layer(x):
        h = weight(x)
        keep_for_backward("h", (h,))
        return h.mul_(2)  # written after it was kept: its copy may be stale

    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="kept for backward in place"):
        offloaded_checkpoint(layer, x)


def test_the_memory_plan_counts_what_the_first_pass_keeps():
    model = _model("llama").get_base_model()
    config = model.config
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    costs = measure_layer_costs(model, ids)
    head_dim = config.head_dim
    for cost in costs:  # the output [tokens, heads x head_dim], the fp32 lse [heads] a token
        assert cost.kept_host_bytes_per_token == config.num_attention_heads * head_dim * 4
        assert cost.kept_device_bytes_per_token == config.num_attention_heads * 4
    off, keep = LayerMode.OFFLOAD, LayerMode.KEEP
    all_keep = MemoryPlan((keep, keep), costs, ids.numel(), 0, 0)
    for modes in [(off, keep), (off, off)]:
        plan = MemoryPlan(modes, costs, ids.numel(), 0, 0)
        fresh = _model("llama").get_base_model()
        kept_bytes = held_bytes_after_forward(fresh, ids)
        apply_plan(fresh, plan)
        held = held_bytes_after_forward(fresh, ids)
        # On the CPU the "host" copies are in the same memory as the rest.
        predicted = all_keep.held_after_forward_bytes - (
            plan.held_after_forward_bytes + plan.host_bytes
        )
        assert (kept_bytes - held) / predicted == pytest.approx(1.0, abs=0.10), modes
    assert plan.host_bytes == sum(
        (c.input_bytes_per_token + c.kept_host_bytes_per_token) * ids.numel() for c in costs
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_keeps_through_a_fused_kernel(calls, monkeypatch):
    monkeypatch.setenv(kept_attention.ENV, "1")  # off on CUDA unless asked (see the module)
    want, layers = _grads("llama", None, device="cuda", dtype=torch.bfloat16)
    got, _ = _grads("llama", offloaded_checkpoint, device="cuda", dtype=torch.bfloat16,
                    counts=calls)  # fmt: skip
    assert calls["forward"] == calls["backward"] == 2 * layers and not calls["sdpa"], calls
    assert not kept_attention._broken
    assert_same_grads(got, want, rtol=2e-2)  # the same kernel both ways; bf16 recompute order


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (8, 8)])
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("relaid", [False, True])
def test_the_kernel_at_a_real_head_size_matches_sdpa(heads, kv_heads, transposed, relaid):
    """The kept path's kernel on llama's head size (128), where SDPA picks cuDNN on Hopper
    and flash elsewhere, with and without GQA, on ``[B, S, H, D]`` projections seen as
    ``[B, H, S, D]`` (as the attention layers make them) or contiguous: its forward and
    its backward, called as the recompute calls it, against SDPA's own autograd in
    float32. The tiny models' head size (16) would not reach the kernel a real model
    runs. On the CPU the flash kernel, in float32. ``relaid``: the backward gets the
    same values in the other layout, as a recompute may lay q, k and v out (cuDNN's
    backward, handed them so, returned dq and dk 70% off on an H100: the path lays them
    out as the forward had them)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch, length, dim = 2, 192, 128
    scale = dim**-0.5
    generator = torch.Generator(device=device).manual_seed(11)

    def made(n_heads: int) -> torch.Tensor:
        shape = (batch, length, n_heads, dim) if transposed else (batch, n_heads, length, dim)
        t = torch.randn(shape, device=device, dtype=dtype, generator=generator)
        return t.transpose(1, 2) if transposed else t

    q, k, v = made(heads), made(kv_heads), made(kv_heads)
    kernel = kept_attention._kernel(q, k, v, True, scale)
    assert kernel is not None, "SDPA picks no kernel with a log-sum-exp here"
    out, lse, extra = kernel.forward(q, k, v, True, scale)
    dout = torch.randn(out.shape, device=device, dtype=dtype, generator=generator)
    back = [t.transpose(1, 2).contiguous().transpose(1, 2) if t.is_contiguous()
            else t.contiguous() for t in (q, k, v)] if relaid else [q, k, v]  # fmt: skip
    back = [t.detach().requires_grad_() for t in back]
    # Through the path's own backward, as the recompute runs it: given the first pass's
    # layouts, it hands the kernel q, k and v laid out as its forward had them.
    got = kept_attention._Replay.apply(
        *back, out, lse, kernel.name,
        lambda *a: kernel.backward(*a, extra, True, scale), None,
        tuple(t.stride() for t in (q, k, v)),
    )  # fmt: skip
    got.backward(dout)
    dq, dk, dv = (t.grad for t in back)

    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*exact, is_causal=True, scale=scale,
                                          enable_gqa=heads != kv_heads)  # fmt: skip
    want.backward(dout.float())
    # bf16 inputs, outputs and gradients: a few 2**-8 of relative error at the most.
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    errors = {
        "out": _rel(out, want), "dq": _rel(dq, exact[0].grad), "dk": _rel(dk, exact[1].grad),
        "dv": _rel(dv, exact[2].grad),
    }  # fmt: skip
    assert all(e < tol for e in errors.values()), (kernel.name, errors)
    assert dk.shape == k.shape and dv.shape == v.shape


def test_the_kept_backward_is_right_after_sdpas_own():
    """torch caches cuDNN's backward graph by q, k and v's layouts alone, not by the
    output's gradient's. SDPA's own backward runs first here, as in a layer that kept
    nothing (its output's gradient laid out as the output, ``[B, S, H, D]`` in memory),
    then the kept path's on inputs laid out the same, its gradient handed over
    contiguous (``[B, H, S, D]``): both must match SDPA in float32. Made contiguous all
    the way to the kernel, the second gradient would reuse the first one's graph (session
    24: a whole model's LoRA gradients at cosine 0.32). A length of its own, so that no
    other test's graph is in the cache. On the CPU the flash kernel, in float32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch, length, heads, kv_heads, dim = 2, 160, 32, 8, 128
    scale = dim**-0.5
    generator = torch.Generator(device=device).manual_seed(12)

    def made(n_heads: int) -> torch.Tensor:  # [B, S, H, D] projections seen as [B, H, S, D]
        t = torch.randn(batch, length, n_heads, dim, device=device, dtype=dtype,
                        generator=generator)  # fmt: skip
        return t.transpose(1, 2)

    q, k, v = made(heads), made(kv_heads), made(kv_heads)
    dout = made(heads)  # as SDPA's own backward gets it from the layer's transpose
    own = [t.detach().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*own, is_causal=True, scale=scale,
                                   enable_gqa=True).backward(dout)  # fmt: skip
    kernel = kept_attention._kernel(q, k, v, True, scale)
    assert kernel is not None, "SDPA picks no kernel with a log-sum-exp here"
    out, lse, extra = kernel.forward(q, k, v, True, scale)
    kept = [t.detach().requires_grad_() for t in (q, k, v)]
    kept_attention._Replay.apply(
        *kept, out, lse, kernel.name, lambda *a: kernel.backward(*a, extra, True, scale),
        None, tuple(t.stride() for t in (q, k, v)),
    ).backward(dout.contiguous())  # fmt: skip

    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*exact, is_causal=True, scale=scale,
                                   enable_gqa=True).backward(dout.float())  # fmt: skip
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    errors = {f"{who} d{name}": _rel(t.grad, e.grad)
              for who, inputs in (("sdpa", own), ("kept", kept))
              for name, t, e in zip("qkv", inputs, exact, strict=True)}  # fmt: skip
    assert all(e < tol for e in errors.values()), (kernel.name, errors)


def test_the_path_runs_on_the_cpu_and_on_a_gpu_only_when_asked(monkeypatch):
    """Unset, the kept path is the CPU's only: on CUDA it buys nothing measurable
    (session 25, where its gradients were shown right); 1 and 0 set it anywhere, and
    anything else is refused by name."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv(kept_attention.ENV, raising=False)
    assert kept_attention.enabled(cpu) and not kept_attention.enabled(cuda)
    monkeypatch.setenv(kept_attention.ENV, "1")
    assert kept_attention.enabled(cpu) and kept_attention.enabled(cuda)
    monkeypatch.setenv(kept_attention.ENV, "0")
    assert not kept_attention.enabled(cpu) and not kept_attention.enabled(cuda)
    monkeypatch.setenv(kept_attention.ENV, "yes")
    with pytest.raises(ValueError, match="SLOTH_KEPT_ATTENTION='yes'"):
        kept_attention.enabled(cpu)


def test_switched_off_the_recompute_computes_the_attention(calls, monkeypatch):
    """``SLOTH_KEPT_ATTENTION=0``: the offloaded layers keep nothing and their recompute
    runs SDPA, with the gradients of no checkpointing."""
    monkeypatch.setenv(kept_attention.ENV, "0")
    want, _ = _grads("llama", None)
    got, _ = _grads("llama", offloaded_checkpoint, counts=calls)
    assert calls["forward"] == calls["backward"] == 0 and calls["sdpa"], calls
    assert_same_grads(got, want)


def test_the_backward_gets_q_k_v_as_the_first_pass_laid_them_out():
    """Whatever layout the recompute brings q, k and v in, the kernel's backward gets them
    as its forward had them, and the output's gradient laid out as the output: cuDNN's
    backward on an H100 returned dq and dk 70% off otherwise (session 23), and torch
    caches its graph by q, k and v's layouts alone, so a gradient laid out otherwise than
    SDPA's own calls have it reuses a graph built for theirs (session 24). The CPU's flash
    kernel does not mind, so a spy on the strides holds this here; the gradients stay the
    kernel's own."""
    generator = torch.Generator().manual_seed(5)
    first = [torch.randn(2, 24, heads, 32, generator=generator).transpose(1, 2)
             for heads in (4, 2, 2)]  # fmt: skip
    layouts = tuple(t.stride() for t in first)
    kernel = kept_attention._CPU
    out, lse, extra = kernel.forward(*first, True, 0.25)
    seen = []

    def backward(dout, q, k, v, out, lse):
        seen.append(tuple(t.stride() for t in (q, k, v, dout)))
        return kernel.backward(dout, q, k, v, out, lse, extra, True, 0.25)

    dout = torch.randn(out.shape, generator=generator)  # [B, H, S, D] in memory
    assert dout.stride() != out.stride()  # the output is [B, S, H, D] in memory
    grads = []
    for relaid in (False, True):
        inputs = [(t.contiguous() if relaid else t).detach().requires_grad_() for t in first]
        kept_attention._Replay.apply(*inputs, out, lse, "spy", backward, None,
                                     layouts).backward(dout)  # fmt: skip
        grads.append([t.grad for t in inputs])
    assert seen == [(*layouts, out.stride())] * 2
    assert tuple(first[0].contiguous().stride()) != layouts[0]  # the recompute's did differ
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want)

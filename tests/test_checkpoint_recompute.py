"""What a checkpointed layer's recompute skips: a gated MLP or a sparse MoE block whose
output only feeds the residual additions (Llama, Qwen3-MoE) is asked for no output value
from the second recompute on, one whose output a norm reads (Gemma 2's post-feedforward
norm) always is; either way the gradients are those of no checkpointing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sloth_core.checkpointing import device_checkpoint, enable_checkpointing
from sloth_core.ops import default_registry, reference
from sloth_core.patches import ArchitectureSpec, patch_architecture, patch_modeling
from sloth_core.testing import init_tiny_model
from sloth_core.testing.varied import varied_config

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: LoRA on every expert (PEFT's ``target_parameters``) beside the attention's.
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _classes(arch: str) -> dict:
    if arch == "llama":
        from transformers.models.llama import modeling_llama as m

        return {"mlp": m.LlamaMLP, "rms_norm": m.LlamaRMSNorm}
    from transformers.models.gemma2 import modeling_gemma2 as m

    return {"mlp": m.Gemma2MLP, "rms_norm": m.Gemma2RMSNorm, "gemma_norm": True}


def _spying_registry(calls: list[bool], device: str, op: str):
    """The references, with ``op`` (``lora_mlp`` or ``moe_experts``) recording each call's
    ``output`` hint and, where it is False, returning NaN values (gradients unchanged):
    what an implementation that skips the product may return, so any read of them would
    show in the gradients."""
    ops = default_registry()
    ref = getattr(reference, op)

    def spy(*args, output=True, **kwargs):
        calls.append(output)
        out = ref(*args, **kwargs)
        if output:
            return out
        return out + (torch.full_like(out, float("nan")) - out).detach()

    ops.register(op, spy, provider="spy", devices=(device,))
    return ops


def _patch(model, arch: str, ops) -> None:
    if arch == "qwen3_moe":  # the sparse blocks through the ops (the loss stays transformers')
        spec = ArchitectureSpec("qwen3_moe", "Qwen3Moe", "test", kinds=("rms_norm", "mlp", "moe"))
        patch_modeling(model, ops, plugin="test", architectures=[spec])
    else:
        patch_architecture(model, ops, plugin="test", model_types=arch, **_classes(arch))


def _grads_over_steps(arch: str, checkpoint, calls: list[bool], steps: int = 3, device="cpu",
                      between=None):  # fmt: skip
    """Each step's gradients; ``between(model)``, where given, runs between each step's
    forward and its backward."""
    # every flag of the config varied (attention and MLP biases), the head untied
    overrides = {"tie_word_embeddings": False}
    lora = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS)
    op = "lora_mlp"
    if arch == "qwen3_moe":  # every layer sparse, LoRA on the experts too
        overrides.update(mlp_only_layers=[], decoder_sparse_step=1)
        lora.update(target_modules=TARGETS[:3], target_parameters=EXPERTS)
        op = "moe_experts"
    config = varied_config(arch, **overrides)
    model = init_tiny_model(config, seed=4).to(device)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(**lora))
    _patch(model, arch, _spying_registry(calls, device, op))
    if checkpoint is not None:
        enable_checkpointing(model, offload=True)
        for layer in model.get_base_model().model.layers:
            layer._gradient_checkpointing_func = checkpoint
    model.train()
    generator = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(steps):  # the same batch each step, no optimizer: equal grads each time
        ids = torch.randint(0, config.vocab_size, (2, 11), generator=generator).to(device)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        if between is not None:
            between(model)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return grads


_CUDA = pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
])  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", _CUDA])  # CUDA: the copies on their own stream
@pytest.mark.parametrize("checkpoint", ["offloaded", "device"])
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_recompute_skips_the_mlp_output_from_the_second_on(arch, checkpoint, device):
    from sloth_core.checkpointing import offloaded_checkpoint

    function = offloaded_checkpoint if checkpoint == "offloaded" else device_checkpoint
    plain: list[bool] = []
    want = _grads_over_steps(arch, None, plain, device=device)
    assert plain and all(plain)
    calls: list[bool] = []
    got = _grads_over_steps(arch, function, calls, device=device)
    layers = varied_config(arch).num_hidden_layers
    # Per step: each layer's forward, then its recompute; the first recompute probes.
    assert calls[: 2 * layers] == [True] * 2 * layers
    assert calls[2 * layers :] == ([True] * layers + [False] * layers) * 2
    for step_want, step_got in zip(want, got, strict=True):
        assert step_got.keys() == step_want.keys()
        for name, grad in step_got.items():
            torch.testing.assert_close(grad, step_want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gemma2_post_feedforward_norm_keeps_the_mlp_output():
    from sloth_core.checkpointing import offloaded_checkpoint

    want = _grads_over_steps("gemma2", None, [])
    calls: list[bool] = []
    got = _grads_over_steps("gemma2", offloaded_checkpoint, calls, steps=2)
    assert calls and all(calls)  # the norm reads the value: never skipped
    for step_want, step_got in zip(want, got, strict=False):
        for name, grad in step_got.items():
            torch.testing.assert_close(grad, step_want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_offload_overlaps_only_layers_seen_not_to_write_their_input():
    # The copy to host runs beside the layer on a GPU; a layer is trusted with that once
    # its first call left its input unwritten. One that writes it later is an error.
    from functools import partial

    from sloth_core import checkpointing

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.in_place = False

        def forward(self, x):
            if self.in_place:
                x.mul_(2)
            return self.linear(x)

    for make in (
        lambda layer: partial(layer.__call__),
        lambda layer: partial(Layer.forward, layer),
    ):
        layer = Layer()
        function = make(layer)
        assert checkpointing._owner(function) is layer
        x = torch.randn(3, 4, requires_grad=True)
        checkpointing.offloaded_checkpoint(function, x * 1).sum().backward()
        assert checkpointing._keeps_input[layer] is True
        layer.in_place = True
        with pytest.raises(RuntimeError, match="wrote its input in place"):
            checkpointing.offloaded_checkpoint(function, x * 1)
        assert checkpointing._keeps_input[layer] is False
        checkpointing.offloaded_checkpoint(function, x * 1)  # waits for the copy now: no error
    assert checkpointing._owner(lambda t: t) is None


def test_value_free_downstream_reads_the_graph_between_a_tensor_and_the_outputs():
    from sloth_core.checkpointing import _value_free_downstream

    a = torch.randn(3, 4, requires_grad=True)
    residual = torch.randn(3, 4, requires_grad=True)
    t = a * 2  # the tensor whose value is in question
    assert _value_free_downstream(t, [residual + t])
    assert _value_free_downstream(t, [(residual + t).view(12) - 1])
    assert _value_free_downstream(t, [t])  # the output itself: only its gradient is used
    normed = torch.nn.functional.layer_norm(residual + t, (4,))
    assert not _value_free_downstream(t, [normed])  # the norm reads the sum's value
    assert not _value_free_downstream(t, [residual + t, t * t])  # one output reads it
    assert not _value_free_downstream(torch.randn(3), [residual])  # no node of its own


def test_a_kept_input_written_in_place_after_the_layer_is_an_error():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    hidden = x * 1
    out = device_checkpoint(layer.__call__, hidden)
    with torch.no_grad():
        hidden.add_(1)  # the recompute would read these values
    with pytest.raises(RuntimeError, match="modified in place after the layer ran"):
        out.sum().backward()


class _Recording(torch.nn.Module):
    """A layer that hands a tensor out beside its return value, as transformers records a
    router's logits: into ``self.recorded``, named with ``side_output`` (or not)."""

    def __init__(self, named: bool = True):
        super().__init__()
        self.router = torch.nn.Linear(4, 3)
        self.linear = torch.nn.Linear(4, 4)
        self.named, self.recorded = named, []

    def forward(self, x):
        from sloth_core.checkpointing import side_output

        logits = self.router(x)
        if self.named:
            side_output(logits)
        self.recorded.append(logits)
        return self.linear(x) * logits.softmax(-1)[..., :1]


@pytest.mark.parametrize("checkpoint", ["offloaded", "device"])
def test_a_side_output_passes_its_gradient_back_through_the_checkpoint(checkpoint):
    # The load-balancing loss reads recorded router logits: through a checkpoint, whose
    # first pass runs without gradients, they must still reach the router and the input.
    from sloth_core.checkpointing import offloaded_checkpoint

    function = offloaded_checkpoint if checkpoint == "offloaded" else device_checkpoint
    torch.manual_seed(0)
    layer = _Recording()
    x = torch.randn(5, 4)

    def grads(run):
        layer.zero_grad(set_to_none=True)
        layer.recorded.clear()
        inp = x.clone().requires_grad_()
        out = run(inp * 1)
        # the loss on the output and on what the layer recorded (its first pass's logits)
        (out.square().sum() + 0.5 * layer.recorded[0].logsumexp(-1).sum()).backward()
        return [inp.grad, *(p.grad for p in layer.parameters())]

    want = grads(layer)
    got = grads(lambda h: function(layer.__call__, h))
    assert layer.recorded[0].requires_grad  # the recorded tensor itself took the path
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, msg=f"grad {i}")
    # Unnamed, the recorded logits pass nothing back: the router's weight misses that part.
    layer.named = False
    unnamed = grads(lambda h: function(layer.__call__, h))
    assert not layer.recorded[0].requires_grad
    assert not torch.allclose(unnamed[1], want[1])


def test_a_recompute_naming_other_side_outputs_is_an_error():
    layer = _Recording()
    x = torch.randn(5, 4, requires_grad=True)
    out = device_checkpoint(layer.__call__, x * 1)
    layer.named = False  # the recompute names none
    with pytest.raises(RuntimeError, match="must name the same side_output"):
        (out.sum() + layer.recorded[0].sum()).backward()


def test_a_side_output_nothing_reads_costs_no_backward():
    # No load-balancing loss: the recorded logits take no gradient, and the recompute
    # runs no backward through them (None, not zeros, reaches the checkpoint's backward).
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.linear = torch.nn.Linear(4, 3), torch.nn.Linear(4, 4)

        def forward(self, x):
            from sloth_core.checkpointing import side_output

            side_output(self.router(x))  # recorded, read by nothing here
            return self.linear(x)

    layer = Layer()
    x = torch.randn(5, 4, requires_grad=True)
    device_checkpoint(layer.__call__, x * 1).square().sum().backward()
    assert layer.linear.weight.grad is not None and x.grad is not None
    assert layer.router.weight.grad is None


def _lifts(monkeypatch) -> list[str]:
    """The PEFT projections lifted (``LoRALinear.from_module`` on a LoRA wrapper), by name
    of the wrapper's class, in call order."""
    from sloth_core.ops import LoRALinear

    lifted: list[str] = []
    original = LoRALinear.from_module.__func__

    def counting(cls, module):
        if hasattr(module, "base_layer"):
            lifted.append(type(module).__name__)
        return original(cls, module)

    monkeypatch.setattr(LoRALinear, "from_module", classmethod(counting))
    return lifted


@pytest.mark.parametrize("checkpoint", ["offloaded", "device"])
def test_the_recompute_takes_the_first_passs_lifted_projections(checkpoint, monkeypatch):
    from sloth_core.checkpointing import layer_memo, offloaded_checkpoint

    function = offloaded_checkpoint if checkpoint == "offloaded" else device_checkpoint
    lifted = _lifts(monkeypatch)
    want = _grads_over_steps("llama", None, [], steps=2)
    plain = len(lifted)
    lifted.clear()
    got = _grads_over_steps("llama", function, [], steps=2)
    # Each projection lifted once a step, in the first pass, as without checkpointing:
    # the recompute walks no PEFT module again.
    assert plain and len(lifted) == plain
    assert layer_memo() is None  # outside a checkpointed layer
    for step_want, step_got in zip(want, got, strict=True):
        for name, grad in step_got.items():
            torch.testing.assert_close(grad, step_want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_recompute_runs_what_the_first_pass_ran_after_the_adapters_change():
    # The scaling changed between the forward and its backward: the recompute still uses
    # the first pass's, so the gradients are those of the graph the forward built (before
    # the layer memo, the recompute lifted the MLP's projections again, with the new one).
    from sloth_core.checkpointing import offloaded_checkpoint

    def triple_the_mlps_scaling(model):  # lifted by the patched MLP; PEFT runs the attention's
        for name, module in model.named_modules():
            scaling = getattr(module, "scaling", None)
            if ".mlp." in name and hasattr(module, "base_layer") and scaling:
                module.scaling = {k: 3 * v for k, v in scaling.items()}

    (want,) = _grads_over_steps("llama", offloaded_checkpoint, [], steps=1)
    (got,) = _grads_over_steps(
        "llama", offloaded_checkpoint, [], steps=1, between=triple_the_mlps_scaling
    )
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-5, atol=1e-6, msg=name)

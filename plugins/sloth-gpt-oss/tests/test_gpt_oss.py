"""sloth-gpt-oss against Hugging Face's gpt_oss (eager, the only attention it supports
besides flash/flex): logits, loss (the router's load-balancing loss included) and every
LoRA gradient, with LoRA on the experts (PEFT's ``target_parameters``) or on attention
only; packed rows, the varied config, sloth-kernels' kernels interpreted, the norms bit
for bit in bf16; the attention sinks of ``sloth_attention`` against gpt-oss's eager
attention (padded and packed rows, the sinks' gradient); MXFP4 checkpoints loaded
dequantized, or refused with QLoRA.

``tiny_config("gpt_oss")``: layer 0 sliding (window 16, crossed by the 24-token rows),
layer 1 full; 4 experts of width 32, top 2, SwiGLU clamped at 1.5.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from sloth_core.testing import init_tiny_model, installed_manager, tiny_config, varied_config
from sloth_core.testing.moe_checks import MOE_CHECKS, MoEArchitecture, run_moe_check

GPT_OSS = MoEArchitecture(
    "sloth-gpt-oss",
    "gpt_oss",
    patched={"rms_norm": 5, "attention": 2, "moe": 2, "causal_lm": 1},
    attention_paths=("sinks",),
    patched_modules=("model.layers.1.mlp", "model.layers.0.self_attn"),
    # With the tiny config's clamp at 1.5 the curves agree to 1e-7 for 21 steps, then a
    # pre-activation crosses the clamp's kink on one side only (1e-7 apart) and they
    # part by 2e-3: gpt-oss's real limit of 7 is used for the 30 steps.
    train_overrides={"swiglu_limit": 7.0},
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def manager():
    return installed_manager(GPT_OSS.plugin)


# Not "packed": gpt-oss's eager attention is no reference for packed rows (see
# test_packed_rows_match_each_sequence_alone).
@pytest.mark.parametrize("check", [*(c for c in MOE_CHECKS if c != "packed"), "trains_alike"])
def test_moe_check(manager, check):
    run_moe_check(manager, GPT_OSS, check)


def test_parity_varied(manager):
    """rms_norm_eps, the router-loss coefficient, swiglu_alpha/limit off their defaults
    (where the config has them: transformers 5.17's experts fix alpha 1.702, limit 7)."""
    config = varied_config("gpt_oss")
    defaults = type(config)()
    assert config.rms_norm_eps != defaults.rms_norm_eps and config.output_router_logits
    assert config.router_aux_loss_coef != defaults.router_aux_loss_coef
    GPT_OSS.parity(manager, config)


def test_norms_round_as_gpt_oss_in_bf16(manager):
    """The patched norms (``rms_norm``'s ``cast_after_weight``) equal GptOssRMSNorm bit for
    bit on bf16 hidden states with fp32 weights, as from_pretrained keeps them: bf16 out,
    rounded once (the Llama order would return fp32)."""
    config = tiny_config("gpt_oss")
    model = init_tiny_model(config).to(torch.bfloat16)
    norms = [m for m in model.modules() if type(m).__name__ == "GptOssRMSNorm"]
    for norm in norms:
        norm.float()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, config.hidden_size, generator=generator).to(torch.bfloat16)
    expected = [norm(x) for norm in norms]
    (report,) = manager.patch_layers(model=model)
    assert report.patched["rms_norm"] == len(norms) == 5
    for norm, want in zip(norms, expected, strict=True):
        got = norm(x)
        assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def test_packed_rows_match_each_sequence_alone(manager):
    """Packed rows against each sequence alone through the unpatched model: transformers'
    gpt-oss builds its masks without ``position_ids`` (this release), so its eager
    attention lets packed sequences see each other and is no reference for packed rows
    (the parity harness's ``packed=True`` refuses it). Logits and every LoRA gradient
    (experts included) of a random projection of the logits; a 24-token row whose second
    sequence crosses layer 0's window of 16."""
    from sloth_core.testing.parity import attach_lora, kernels_mode

    config = tiny_config("gpt_oss")
    generator = torch.Generator().manual_seed(3)
    lengths = [[5, 19], [24]]
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=generator)
    positions = torch.tensor([[*range(5), *range(19)], [*range(24)]])
    weights = torch.randn(2, 24, config.vocab_size, generator=generator)
    reference = attach_lora(init_tiny_model(config), r=4, seed=0)
    patched = attach_lora(init_tiny_model(config), r=4, seed=0)
    manager.patch_layers(model=patched)  # registers sloth_attention
    patched.set_attn_implementation("sloth_attention")
    with kernels_mode("torch"):
        logits = patched(input_ids=ids, position_ids=positions, use_cache=False).logits
        (logits * weights).sum().backward()
        alone = []
        for row, row_lengths in enumerate(lengths):
            start = 0
            for length in row_lengths:
                part = reference(input_ids=ids[row : row + 1, start : start + length]).logits
                (part * weights[row : row + 1, start : start + length]).sum().backward()
                alone.append(part[0])
                start += length
    torch.testing.assert_close(logits.flatten(0, 1), torch.cat(alone), atol=1e-4, rtol=1e-4)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert any("experts" in name for name in grads)
    for name, param in patched.named_parameters():
        if param.requires_grad:
            scale = grads[name].abs().max().clamp_min(1e-6)
            assert (param.grad - grads[name]).abs().max() / scale < 1e-3, name


def _eager_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, 0.0, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("rows", ["padded", "packed", "windowed"])
def test_sink_attention_matches_gpt_oss_eager(rows):
    """Forward and the gradients of q, k, v and the sinks, fp32, GQA, uneven length."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    from sloth_core.patches import PackedRows, sloth_attention

    generator = torch.Generator().manual_seed(len(rows))
    batch, heads, kv_heads, length, dim = 2, 4, 2, 13, 16

    def randn(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_()

    q, k, v = (
        randn(batch, heads, length, dim),
        randn(batch, kv_heads, length, dim),
        randn(batch, kv_heads, length, dim),
    )
    sinks = torch.nn.Parameter(2 * torch.randn(heads, generator=generator))
    module = types.SimpleNamespace(num_key_value_groups=2, training=False, sinks=sinks)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    kwargs: dict = {}
    if rows == "padded":  # left padding of 4 in row 0
        mask = causal[None, None].repeat(batch, 1, 1, 1)
        mask[0, :, :, :4] = False
        sloth_mask, eager_mask = mask, _eager_mask(mask)
    else:
        positions = torch.tensor([list(range(6)) + list(range(7)), list(range(length))])
        kwargs["position_ids"] = positions
        eager = PackedRows(positions).mask
        if rows == "windowed":
            index = torch.arange(length)
            eager = eager & ((index[:, None] - index[None, :]) < 4)
            kwargs["sliding_window"] = 4
        sloth_mask, eager_mask = None, _eager_mask(eager)
    reference, _ = eager_attention_forward(module, q, k, v, eager_mask, scaling=0.3)
    out, _ = sloth_attention(module, q, k, v, sloth_mask, scaling=0.3, s_aux=sinks, **kwargs)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    grad = torch.randn(reference.shape, generator=generator)
    wanted = torch.autograd.grad((reference * grad).sum(), (q, k, v, sinks))
    got = torch.autograd.grad((out * grad).sum(), (q, k, v, sinks))
    for name, a, b in zip("qkv", got[:3], wanted[:3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(got[3], wanted[3], atol=1e-5, rtol=1e-5)
    assert wanted[3].abs().max() > 1e-2  # the sinks matter


def _mxfp4_checkpoint(path):
    """A tiny gpt-oss checkpoint as OpenAI ships them: expert weights as MXFP4 blocks
    (two e2m1 values a byte, 32 a block) and e8m0 scales; random bytes, scales near 1."""
    from safetensors.torch import load_file, save_file

    model = init_tiny_model(tiny_config("gpt_oss"))
    model.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = tensors.pop(name).shape
        shape = (experts, outputs, inputs // 32)
        tensors[f"{name}_blocks"] = torch.randint(
            0, 256, (*shape, 16), generator=generator, dtype=torch.uint8
        )
        tensors[f"{name}_scales"] = torch.randint(
            125, 129, shape, generator=generator, dtype=torch.uint8
        )
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    not_converted = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "lm_head"]
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [*not_converted, "model.embed_tokens"],
    }
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def test_mxfp4_checkpoint_loads_dequantized_or_refuses_qlora(tmp_path):
    """Offline, on the CPU, without the ``kernels`` package's Hub kernels."""
    from sloth_gpt_oss import plugin
    from transformers import AutoConfig
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from sloth_core.types import ModelSpec

    tensors = _mxfp4_checkpoint(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    spec = ModelSpec(model_name=str(tmp_path), model_type="gpt_oss", config=config)
    spec.tokenizer = object()  # no tokenizer in this checkpoint; not what is tested
    model, _ = plugin.load_model(spec)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sloth_attention"
    name = "model.layers.0.mlp.experts.gate_up_proj"
    expected = convert_moe_packed_tensors(tensors[f"{name}_blocks"], tensors[f"{name}_scales"])
    torch.testing.assert_close(experts.gate_up_proj.float(), expected.float())
    assert experts.gate_up_proj.abs().max() > 0
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()

    qlora = ModelSpec(model_name=str(tmp_path), model_type="gpt_oss", config=config)
    qlora.quantization = "nf4"
    with pytest.raises(ValueError, match="MXFP4 checkpoint.*drop the quantization"):
        plugin.load_model(qlora)


def test_sink_attention_bf16_as_close_to_fp32_as_eager():
    """In bf16, output and q/k/v/sink gradients no further from the fp32 truth than twice
    gpt-oss's eager attention in bf16 (plus a floor)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    from sloth_core.patches import sloth_attention

    generator = torch.Generator().manual_seed(5)
    shapes = [(2, 4, 24, 16), (2, 2, 24, 16), (2, 2, 24, 16), (4,), (2, 24, 4, 16)]
    q, k, v, sinks, grad = (torch.randn(s, generator=generator) for s in shapes)
    causal = torch.ones(24, 24, dtype=torch.bool).tril()[None, None]

    def run(dtype, sloth):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, sinks)]
        module = types.SimpleNamespace(num_key_value_groups=2, training=False, sinks=leaves[3])
        if sloth:
            out, _ = sloth_attention(module, *leaves[:3], causal, scaling=0.25, s_aux=leaves[3])
        else:
            mask = _eager_mask(causal).to(dtype)
            out, _ = eager_attention_forward(module, *leaves[:3], mask, scaling=0.25)
        out.backward(grad.to(dtype))
        return [out.float()] + [t.grad.float() for t in leaves]

    truth = run(torch.float32, False)
    eager, sloth = run(torch.bfloat16, False), run(torch.bfloat16, True)
    for name, e, s, t in zip(["out", "q", "k", "v", "sinks"], eager, sloth, truth, strict=True):
        e_err, s_err = ((x - t).norm() / t.norm() for x in (e, s))
        assert s_err <= 2 * e_err + 1e-3, (name, s_err, e_err)

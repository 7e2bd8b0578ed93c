"""A mixture-of-experts model with its 3-D expert weights in FP8 (``quantization="fp8"``):
stored in e4m3 with row scales, computed by sloth's patched MoE block as their dequantized
values (against transformers' block on those values, on a config whose every float field
is off its default), trained with LoRA on the experts, merged back to dense weights, and
transformers' own experts forward refused by name."""

from __future__ import annotations

import pytest
import torch
from fp8_helpers import train_losses
from sloth_fp8.linear import FP8_MAX

from sloth_core import FastLanguageModel
from sloth_core.errors import SlothError
from sloth_core.ops.reference import ROW_SCALES
from sloth_core.plugins import using_plugin_manager
from sloth_core.sdk.merge import _parameter_delta, merged_state_dict
from sloth_core.testing import tiny_model
from sloth_core.testing.varied import config_variations

EXPERTS = ("gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def installed():
    from sloth_core.testing import installed_manager

    return installed_manager("sloth-fp8", "sloth-qwen")


def _experts(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, EXPERTS[0] + ROW_SCALES)}


def test_fp8_experts_compute_train_and_merge_as_their_dense_values(installed, tmp_path):
    from transformers import AutoModelForCausalLM

    varied = {k: v for k, v in config_variations("qwen3_moe").items() if "dropout" not in k}
    path = tiny_model("qwen3_moe", tmp_path / "model", **varied)
    with using_plugin_manager(installed):
        model, tokenizer = FastLanguageModel.from_pretrained(
            str(path), quantization="fp8", dtype=torch.float32
        )
        experts = _experts(model)
        config = model.config
        assert len(experts) == config.num_hidden_layers - len(config.mlp_only_layers)
        for module in experts.values():
            for name in EXPERTS:
                values, scales = getattr(module, name), getattr(module, name + ROW_SCALES)
                assert values.dtype == torch.float8_e4m3fn and not values.requires_grad
                assert scales.dtype == torch.float32
                assert scales.shape == values.shape[:2]  # [E, out]: one per output row
                # Each row's largest magnitude takes e4m3's largest value.
                peak = values.float().abs().amax(-1)
                assert torch.equal(peak, torch.full_like(peak, FP8_MAX))
        routers = [m.gate.weight for m in model.modules() if hasattr(m, "experts")]
        assert routers and all(w.dtype == torch.float32 for w in routers)

        # Nothing trained yet: the merge is the dequantized model, every scale folded in.
        dense = merged_state_dict(model)
        assert not [k for k in dense if k.endswith(ROW_SCALES)]
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        hf.load_state_dict(dense)  # strict: the plain model's keys, in its shapes
        assert all(v.dtype == torch.float32 for v in dense.values() if v.is_floating_point())

        # sloth's patched MoE block on the e4m3 weights against transformers' block on
        # their dequantized values: the same output.
        name = next(iter(experts)).rsplit(".", 1)[0]  # model.layers.N.mlp
        ours, theirs = model.get_submodule(name), hf.get_submodule(name)
        assert getattr(ours.forward, "__self__", None) is ours  # patched: bound per instance
        x = torch.randn(2, 7, config.hidden_size)
        want = theirs(x)
        got = ours(x)
        torch.testing.assert_close(got, want[0] if isinstance(want, tuple) else want,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        # Generation (the KV cache, a token at a time: few experts a step) as the dense
        # model generates.
        prompt = tokenizer(["The quick brown fox"], return_tensors="pt")
        with torch.no_grad():
            ours_ids = model.eval().generate(**prompt, max_new_tokens=6, do_sample=False)
            hf_ids = hf.eval().generate(**prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(ours_ids, hf_ids)
        model.train()

        # transformers' own experts forward would multiply the e4m3 values unscaled.
        experts_name, module = next(iter(experts.items()))
        with pytest.raises(SlothError, match=rf"{experts_name}: its expert weights are stored"):
            module(x[0], torch.zeros(7, 2, dtype=torch.long), torch.ones(7, 2))

        # LoRA on attention and every expert trains; the experts' values never move.
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_experts=True,
                                                 init_lora_weights=False)  # fmt: skip
        before = {n: getattr(m, p).clone() for n, m in experts.items() for p in EXPERTS[:1]}
        batch = tokenizer(["The quick brown fox jumps over the lazy dog."] * 2,
                          return_tensors="pt")  # fmt: skip
        trained = [p for p in model.parameters() if p.requires_grad]
        assert any(p.dim() == 2 and p.shape[0] % config.num_experts == 0 for p in trained)
        assert all(p.dtype == torch.float32 for p in trained)  # never the base's e4m3
        losses = train_losses(model, batch)
        assert losses[-1] < losses[0], losses
        for n, values in before.items():
            assert torch.equal(getattr(experts[n], EXPERTS[0]), values)

        merged = merged_state_dict(model)
    assert not [k for k in merged if k.endswith(ROW_SCALES) or "lora_" in k]
    wrappers = {n: m for n, m in model.named_modules() if getattr(m, "parameter_name", None)}
    wrapper = next(m for m in wrappers.values() if m.parameter_name == "down_proj")
    owner = wrapper.base_layer
    while hasattr(owner, "base_layer"):
        owner = owner.base_layer
    key = next(k for k, m in _experts(model.get_base_model()).items() if m is owner)
    key = ".".join(part for part in key.split(".") if part != "base_layer")  # as saved
    values, scales = owner.down_proj, owner.down_proj_row_scales
    want = values.float() * scales[..., None] + _parameter_delta(wrapper, "default")
    torch.testing.assert_close(merged[f"{key}.down_proj"], want)


def test_fp8_experts_in_a_block_no_plugin_patches_are_refused_at_load(tmp_path, monkeypatch):
    """Without the architecture's plugin the MoE blocks keep transformers' forward, which
    cannot compute e4m3 experts: the load says so, naming the block, rather than the first
    forward failing."""
    from sloth_core.plugins import SlothPluginManager

    monkeypatch.setenv("SLOTH_DISABLE_PLUGINS", "sloth-qwen")
    path = tiny_model("qwen3_moe", tmp_path / "model")
    with using_plugin_manager(SlothPluginManager(entry_points=True)):
        with pytest.raises(SlothError, match=r"model\.layers\.1\.mlp: its experts are stored"):
            FastLanguageModel.from_pretrained(str(path), quantization="fp8", dtype=torch.float32)
        # Without quantization it loads, the blocks in transformers' hands.
        FastLanguageModel.from_pretrained(str(path), dtype=torch.float32)

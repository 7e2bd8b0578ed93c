"""sloth-bnb's plans (nf4, fp4, int8), loading through ``FastLanguageModel`` on the CPU,
what ``sloth plugins list`` shows, and the errors of bad input."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from sloth_bnb import METHODS, bnb_config, plugin

from sloth_core import FastLanguageModel
from sloth_core.cli import main
from sloth_core.errors import PluginMissingError
from sloth_core.types import ModelSpec


def _spec(method, **fields):
    return ModelSpec(model_name="unused", quantization=method, **fields)


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_4bit_plans_double_quantize_and_compute_in_bf16(method):
    plan = plugin.quantize(spec=_spec(method))
    assert (plan.method, plan.provider) == (method, "sloth-bnb")
    config = plan.load_kwargs["quantization_config"]
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == method
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert plan.finalize is plugin.finalize


def test_int8_plan():
    plan = plugin.quantize(spec=_spec("int8"))
    config = plan.load_kwargs["quantization_config"]
    assert config.load_in_8bit and not config.load_in_4bit
    assert plan.finalize is None


def test_plan_options():
    # fp16 models (GPUs without bf16) compute in fp16.
    config = plugin.plan(_spec("nf4", dtype=torch.float16)).load_kwargs["quantization_config"]
    assert config.bnb_4bit_compute_dtype == torch.float16
    # BitsAndBytesConfig fields given to from_pretrained move into the config.
    spec = _spec("nf4", extra={"bnb_4bit_use_double_quant": False, "revision_note": 1,
                               "bnb_4bit_compute_dtype": "float32"})  # fmt: skip
    config = plugin.plan(spec).load_kwargs["quantization_config"]
    assert config.bnb_4bit_use_double_quant is False
    assert config.bnb_4bit_compute_dtype == torch.float32
    assert spec.extra == {"revision_note": 1}


def test_bad_input_fails_clearly(bnb_only, llama_dir):
    assert plugin.quantize(spec=_spec("gptq")) is None  # not ours: the core names the plugins
    with pytest.raises(ValueError, match="unknown quantization method 'nf3'.*nf4, fp4, int8"):
        bnb_config("nf3")
    with pytest.raises(ValueError, match="takes no option bnb_4bit_bogus"):
        plugin.plan(_spec("nf4", extra={"bnb_4bit_bogus": 1}))
    with pytest.raises(PluginMissingError, match=r"'nf3'.*installed plugins serve: fp4, int8, nf4"):
        FastLanguageModel.from_pretrained(str(llama_dir), quantization="nf3")


def test_plugins_list_shows_the_quantizers(capsys):
    assert main(["plugins", "list", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    record = records["sloth-bnb"]
    assert record["status"] == "active", record
    assert sorted(record["quantizers"]) == sorted(METHODS)
    assert {"quantize", "register_quantizers"} <= set(record["hooks"])


@pytest.mark.parametrize(("option", "layer"), [("load_in_4bit", bnb.nn.Linear4bit),
                                               ("load_in_8bit", bnb.nn.Linear8bitLt)])  # fmt: skip
def test_tiny_model_loads_quantized_on_the_cpu(bnb_only, llama_dir, option, layer):
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(llama_dir), max_seq_length=64, device_map="cpu", **{option: True}
    )
    assert model.sloth_spec.quantization_plan.provider == "sloth-bnb"
    projections = [m for n, m in model.named_modules() if n.endswith(("_proj",))]
    assert len(projections) == 2 * 7 and all(isinstance(m, layer) for m in projections)
    assert type(model.lm_head) is torch.nn.Linear  # the output head stays in 16/32-bit
    if option == "load_in_4bit":
        state = model.model.layers[0].mlp.down_proj.weight.quant_state
        assert state.quant_type == "nf4" and state.nested
    ids = tokenizer(["The quick brown fox."], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[:2] == ids.shape
    if option == "load_in_4bit":  # the known value: its dequantized weights in float32
        from sloth_core.testing.quantized import compute_in_float32, dequantized_twin

        compute_in_float32(model)
        # In training mode: the eval + no_grad forward above repacked the 4-bit weights for
        # bitsandbytes' fused inference kernel on CPUs with AVX512-BF16 (bf16 arithmetic);
        # a training-mode forward has sloth-bnb's guard put them back and dequantizes.
        model.train()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            expected = dequantized_twin(model)(input_ids=ids).logits
        torch.testing.assert_close(logits.float(), expected, atol=1e-4, rtol=1e-4)
    else:
        assert torch.isfinite(logits).all()

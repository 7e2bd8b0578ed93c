"""One test per hook spec (a meta-test keeps it so), each through the public call path."""

from __future__ import annotations

import inspect
import sys
import types

import torch

import sloth_core
from sloth_core import FastLanguageModel, hookimpl, hookspecs
from sloth_core.patching import is_patched, replace_forward, restorer
from sloth_core.types import ExportResult, PatchReport, QuantizationPlan


def _hook_names() -> list[str]:
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(f, "sloth_spec")]  # fmt: skip


def test_every_hook_spec_has_a_test_and_a_docstring():
    module = sys.modules[__name__]
    for name in _hook_names():
        assert hasattr(module, f"test_hook_{name}"), f"hook {name} has no test_hook_{name}"
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and ("Return ``None``" in doc or name.startswith("register_")), name


def test_hook_register_architectures(register_plugin, plugin_manager):
    plugin = types.SimpleNamespace(
        register_architectures=hookimpl(lambda register: register("toy", description="t"))
    )
    record = register_plugin(plugin, name="arch")
    assert record.architectures == ["toy"] and plugin_manager.architectures["toy"] == "arch"


def test_hook_register_kernels(register_plugin, plugin_manager):
    def fast_swiglu(gate, up):
        return torch.nn.functional.silu(gate) * up

    def register_kernels(register):
        register("swiglu", fast_swiglu, devices=("cpu",), dtypes=(torch.float32,), priority=3)

    register_plugin(types.SimpleNamespace(register_kernels=hookimpl(register_kernels)), "k")
    assert plugin_manager.ops.resolve("swiglu", "cpu", torch.float32).fn is fast_swiglu
    assert plugin_manager.ops.resolve("swiglu", "cpu", torch.float16).provider == "torch"


def test_hook_register_quantizers(register_plugin, plugin_manager):
    register_plugin(
        types.SimpleNamespace(register_quantizers=hookimpl(lambda register: register("q3"))), "q"
    )
    assert plugin_manager.quantizers == {"q3": "q"}


def test_hook_register_exporters(register_plugin, plugin_manager):
    register_plugin(
        types.SimpleNamespace(
            register_exporters=hookimpl(lambda register: register("fmt", aliases=("f",)))
        ),
        "e",
    )
    assert plugin_manager.exporters["fmt"] == "e" and plugin_manager.exporters["f"] == "e"


def test_hook_quantize(register_plugin, make_tiny_model):
    seen = {}

    class Quantizer:
        @hookimpl
        def register_quantizers(self, register):
            register("fake8")

        @hookimpl
        def quantize(self, spec):
            if spec.quantization != "fake8":
                return None
            seen["model_type"] = spec.model_type

            def finalize(model):
                model.fake8 = True
                return model

            # load_kwargs reach from_pretrained: the attention implementation shows it.
            return QuantizationPlan("fake8", load_kwargs={"attn_implementation": "eager"},
                                    finalize=finalize)  # fmt: skip

    register_plugin(Quantizer(), "quant")
    model, _ = FastLanguageModel.from_pretrained(
        str(make_tiny_model("llama")), quantization="fake8"
    )
    assert seen == {"model_type": "llama"} and model.fake8
    assert model.config._attn_implementation == "eager"
    assert model.sloth_spec.quantization_plan.method == "fake8"


def test_hook_load_model(register_plugin, make_tiny_model):
    class Loader:
        @hookimpl
        def load_model(self, spec):
            if spec.model_type != "qwen2":
                return None  # not ours: the next implementation tries
            from sloth_core.sdk import load_hf_model

            model, tokenizer = load_hf_model(spec)
            model.loaded_by = "qwen-plugin"
            return model, tokenizer

    register_plugin(Loader(), "qwen-loader")
    qwen, _ = FastLanguageModel.from_pretrained(str(make_tiny_model("qwen2")))
    llama, _ = FastLanguageModel.from_pretrained(str(make_tiny_model("llama")))
    assert qwen.loaded_by == "qwen-plugin" and not hasattr(llama, "loaded_by")


class NormPatcher:
    """An architecture plugin in miniature: llama's RMSNorms through the op registry."""

    @hookimpl
    def patch_layers(self, model, ops):
        if model.config.model_type != "llama":
            return None
        patched = []
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                forward = lambda x, m=module: ops.rms_norm(x, m.weight, m.variance_epsilon)  # noqa: E731
                if replace_forward(module, forward):
                    patched.append(module)
        return PatchReport("norms", "llama", {"rms_norm": len(patched)}, restorer(patched))


def test_hook_patch_layers(register_plugin, make_tiny_model):
    register_plugin(NormPatcher(), "norms")
    path = make_tiny_model("llama")
    model, tokenizer = FastLanguageModel.from_pretrained(str(path))
    layers = model.config.num_hidden_layers
    assert [r.patched for r in model.sloth_patches] == [{"rms_norm": 2 * layers + 1}]
    ids = tokenizer("patched or not, the same", return_tensors="pt").input_ids
    with torch.no_grad():
        patched = model(ids).logits
    peft_model = FastLanguageModel.get_peft_model(model, r=4)
    assert [r.total for r in peft_model.sloth_patches] == [0]  # idempotent: nothing new
    model.sloth_patches[0].undo()
    assert not any(is_patched(m) for m in model.modules())
    plain = type(model).from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, patched, atol=1e-6)


def test_hook_compute_loss(plugin_manager, register_plugin, make_tiny_model):
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(make_tiny_model("gemma2", final_logit_softcapping=5.0))
    )
    batch = tokenizer(["one two three four", "five six"], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    out = model(**batch, labels=labels, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    loss = plugin_manager.compute_loss(model=model, hidden_states=hidden, labels=labels)
    assert abs(loss.item() - out.loss.item()) <= 1e-5
    summed = plugin_manager.compute_loss(model=model, hidden_states=hidden, labels=labels,
                                         num_items_in_batch=7)  # fmt: skip
    counted = int((labels[:, 1:] != -100).sum())
    assert abs(summed.item() - out.loss.item() * counted / 7) <= 1e-5

    class Override:
        @hookimpl
        def compute_loss(self, model, hidden_states, labels):
            return hidden_states.sum() * 0

    register_plugin(Override(), "zero-loss")
    assert plugin_manager.compute_loss(model=model, hidden_states=hidden, labels=labels) == 0


def test_hook_export(register_plugin, make_tiny_model, tmp_path):
    class TextExporter:
        @hookimpl
        def register_exporters(self, register):
            register("text")

        @hookimpl
        def export(self, model, format, path, options):
            if format != "text":
                return None
            path.write_text(f"{model.config.model_type} {options['note']}")
            return ExportResult("text", path, [path])

    register_plugin(TextExporter(), "text")
    model, tokenizer = FastLanguageModel.from_pretrained(str(make_tiny_model("llama")))
    result = sloth_core.export(model, tokenizer, tmp_path / "m.txt", format="text", note="hi")
    assert result.files == [tmp_path / "m.txt"]
    assert (tmp_path / "m.txt").read_text() == "llama hi"

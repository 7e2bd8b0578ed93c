"""The model-source service (sloth_core.sources): one resolver and one loader for
``sloth export`` and ``sloth chat``/``generate``. A real ``sloth train`` run, one of its
checkpoints, a merged folder and a GGUF file each load through it, for export (the
model and tokenizer) and for generation (an engine), with the trained chat template and
the adapter patched again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sloth_core
from sloth_core.cli import main
from sloth_core.data import CHAT_TEMPLATES
from sloth_core.inference import SamplingOptions, open_engine
from sloth_core.patching import is_patched, unwrap_model
from sloth_core.sdk import llama_cpp
from sloth_core.sources import load_source, resolve_source
from sloth_core.testing.datasets import load_tiny_instructions
from sloth_core.testing.models import tiny_model

TEMPLATE = "chatml"
PROMPT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A LoRA run trained with the chatml template (checkpoints 1 and 2, final/), its
    merged export and an f32 GGUF of it."""
    root = tmp_path_factory.mktemp("sources")
    base = tiny_model("llama", root / "base")
    rows = load_tiny_instructions()[:16]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {
        "model-name": base, "dataset": root / "data.jsonl", "output-dir": root / "run",
        "max-seq-length": 64, "batch-size": 4, "max-steps": 2, "save-steps": 1,
        "learning-rate": 0.05, "chat-template": TEMPLATE, "gradient-checkpointing": "off",
        "report-to": "none",
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLOTH_KERNELS", "torch")  # the loop, not the kernels (interpreted)
        args = [a for k, v in options.items() for a in (f"--{k}", str(v))]
        assert main(["train", *args, "--quiet"]) == 0
        model, tokenizer = load_source(resolve_source(root / "run"))
        sloth_core.export(model, tokenizer, root / "merged", format="merged_16bit")
        sloth_core.export(model, tokenizer, root / "m.gguf", format="gguf", quantization="f32")
    return root


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    model.eval()
    with torch.no_grad():
        return model(ids).logits[0].float()


@pytest.mark.parametrize(
    ("where", "kind", "lora"),
    [("run", "adapter", True), ("run/checkpoint-1", "adapter", True),
     ("merged", "model", False), ("m.gguf", "gguf", False)],
)  # fmt: skip
def test_every_source_loads_for_export(workspace, where, kind, lora, monkeypatch):
    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    source = resolve_source(workspace / where)
    assert source.kind == kind
    # A run's adapters carry the name of the template they trained with; an export from
    # the run carries the template itself.
    assert source.trained_chat_template == (TEMPLATE if lora else "")
    model, tokenizer = load_source(source)
    assert tokenizer.chat_template == CHAT_TEMPLATES[TEMPLATE]
    # Patched (an adapter again after it is attached), its loss bound to the plugins that
    # patched it.
    (report,) = model.sloth_patches
    base = unwrap_model(model)
    assert report.plugin == "sloth-llama" and model.sloth_host is not None
    assert is_patched(base) and is_patched(base.model.layers[0].mlp)
    assert base.__dict__["_sloth_compute_loss"] == model.sloth_host.compute_loss
    assert hasattr(model, "peft_config") == lora
    final, final_tokenizer = load_source(resolve_source(workspace / "run"))
    expected = _logits(final, final_tokenizer)
    got = _logits(model, tokenizer)
    if where == "run/checkpoint-1":  # one step short of final/: a different model
        assert (got - expected).abs().max() > 1e-3
    else:
        assert (got - expected).abs().max() <= 1e-4


def test_every_source_generates_the_same_reply(workspace, monkeypatch):
    monkeypatch.setenv("SLOTH_KERNELS", "torch")
    options = SamplingOptions(max_new_tokens=6)
    replies = {}
    for where in ("run", "run/checkpoint-2", "merged", "m.gguf"):
        if where.endswith(".gguf") and not llama_cpp.available():
            continue
        engine = open_engine(workspace / where, device="cpu")
        assert engine.format.template == CHAT_TEMPLATES[TEMPLATE], where
        replies[where] = engine.reply(PROMPT, options)[1].ids
    assert len(set(map(tuple, replies.values()))) == 1, replies
    assert len(replies) >= 3


def test_a_full_fine_tune_checkpoint_is_its_base_plus_its_tensors(workspace, tmp_path):
    from safetensors.torch import save_file

    source = resolve_source(workspace / "base")
    model, _ = load_source(source)
    name, param = next((n, p) for n, p in model.named_parameters() if n.endswith("norm.weight"))
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    save_file({name: torch.full_like(param, 0.25)}, str(checkpoint / "trainable.safetensors"))
    state = {"step": 3, "config": {"model_name": str(workspace / "base")}}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    full = resolve_source(checkpoint)
    assert full.kind == "full" and full.base == str(workspace / "base")
    loaded, _ = load_source(full)
    assert bool((dict(loaded.named_parameters())[name] == 0.25).all())
    assert [p.resolve() for p in full.inputs()] == [checkpoint.resolve(), source.path.resolve()]

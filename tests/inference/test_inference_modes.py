"""``for_inference`` / ``for_training``: a train / generate / train loop takes exactly the
gradients of a loop that never generated (fp32, and 4-bit with sloth-bnb), and every
setting comes back as it was (checkpointing plain or offloaded, cache, padding, LoRA)."""

from __future__ import annotations

import pytest
import torch

from sloth_core import FastLanguageModel
from sloth_core.api import enable_checkpointing
from sloth_core.checkpointing import offloaded_checkpoint
from sloth_core.inference import SamplingOptions, checkpointing_mode, generate, stop_token_ids
from sloth_core.patching import is_patched, unwrap_model

IDS = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(0))
SAMPLING = SamplingOptions(
    max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.1, seed=0
)


def _lora_model(path, checkpointing=False, **load):
    model, tokenizer = FastLanguageModel.from_pretrained(str(path), max_seq_length=None, **load)
    model = FastLanguageModel.get_peft_model(
        model, r=4, lora_alpha=8, use_gradient_checkpointing=checkpointing is True
    )
    if checkpointing == "offload":  # get_peft_model offloads on GPUs only; ask for it here
        enable_checkpointing(model, offload=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would make every LoRA A gradient zero
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    tokenizer.padding_side = "right"
    return model, tokenizer


def _step(model, optimizer):
    """One SGD step on ``IDS``; the loss and the gradients it took."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    optimizer.step()
    return loss.item(), grads


def _optimizer(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)


def _settings(model, tokenizer):
    """Everything for_training must put back, as comparable values."""
    checkpointing = [
        (name, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func"))
        for name, m in model.named_modules() if hasattr(m, "gradient_checkpointing")
    ]  # fmt: skip
    return {
        "training": model.training,
        "checkpointing": checkpointing,
        "use_cache": unwrap_model(model).config.use_cache,
        "padding_side": tokenizer.padding_side,
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "patched": sorted(n for n, m in model.named_modules() if is_patched(m)),
    }


def _prompt(tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def _assert_same_step(reference, model):
    (ref_loss, ref_grads), (loss, grads) = reference, model
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name


@pytest.mark.parametrize("checkpointing", [False, True, "offload"])
def test_train_generate_train_takes_the_gradients_of_a_model_that_never_generated(
    llama_dir, checkpointing
):
    reference, _ = _lora_model(llama_dir, checkpointing)
    model, tokenizer = _lora_model(llama_dir, checkpointing)
    mode = {False: "off", True: "on", "offload": "offload"}[checkpointing]
    assert checkpointing_mode(model) == mode
    ref_opt, opt = _optimizer(reference), _optimizer(model)
    reference.train(), model.train()
    settings = _settings(model, tokenizer)
    assert settings["patched"], "no installed plugin patched the model"

    _assert_same_step(_step(reference, ref_opt), _step(model, opt))

    FastLanguageModel.for_inference(model, tokenizer)
    assert not model.training and checkpointing_mode(model) == "off"
    assert unwrap_model(model).config.use_cache is True and tokenizer.padding_side == "left"
    ids, stops = _prompt(tokenizer), stop_token_ids(tokenizer, model)
    greedy = generate(model, tokenizer, ids, SamplingOptions(max_new_tokens=10), stop_ids=[])
    sampled = generate(model, tokenizer, ids, SAMPLING, stop_ids=stops)
    assert len(greedy.ids) == 10 and 0 < len(sampled.ids) + (sampled.stop_id is not None)
    # Batched, left-padded prompts too (what the padding side is for): each row continues
    # as its prompt does alone.
    prompts = ["hello there", "a much longer prompt than that one"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)  # fmt: skip
    assert (batch["attention_mask"][0] == 0).any()
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=2)
        for row, prompt in enumerate(prompts):
            alone = model.generate(**tokenizer([prompt], return_tensors="pt"), max_new_tokens=4,
                                   do_sample=False, pad_token_id=2)  # fmt: skip
            assert batched[row, -4:].tolist() == alone[0, -4:].tolist(), prompt

    FastLanguageModel.for_training(model)
    assert _settings(model, tokenizer) == settings
    assert checkpointing_mode(model) == mode
    if checkpointing == "offload":
        layer = unwrap_model(model).model.layers[0]
        assert layer._gradient_checkpointing_func is offloaded_checkpoint

    _assert_same_step(_step(reference, ref_opt), _step(model, opt))


def test_for_inference_is_idempotent_and_for_training_alone_just_trains(llama_dir):
    model, tokenizer = _lora_model(llama_dir, True)
    model.train()
    settings = _settings(model, tokenizer)
    FastLanguageModel.for_inference(model, tokenizer)
    FastLanguageModel.for_inference(model, tokenizer)  # the second call must not save "off"
    assert FastLanguageModel.for_training(model) is model
    assert _settings(model, tokenizer) == settings
    model.eval()
    FastLanguageModel.for_training(model, tokenizer)  # never in inference mode: train mode only
    assert _settings(model, tokenizer) == settings


def test_for_training_retrains_parameters_frozen_meanwhile(llama_dir):
    model, tokenizer = _lora_model(llama_dir)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    FastLanguageModel.for_inference(model, tokenizer)
    model.requires_grad_(False)
    FastLanguageModel.for_training(model)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable


# -- 4-bit: bitsandbytes repacks weights in CPU inference; sloth-bnb's guard undoes it ----


def _packed(model) -> int:
    import bitsandbytes as bnb

    return sum(
        bool(m.weight.quant_state.__dict__.get("packing_format_for_cpu"))
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


@pytest.fixture
def bnb_only(plugin_manager, register_plugin):
    """sloth-bnb alone: the model runs bitsandbytes' own ``Linear4bit.forward`` (which
    repacks in an inference pass) instead of sloth's LoRA ops (which never call it)."""
    plugin = pytest.importorskip("sloth_bnb.plugin")
    register_plugin(plugin, name=plugin.PLUGIN)
    return plugin_manager


@pytest.fixture
def repacking(monkeypatch):
    """Make bitsandbytes repack on a CPU without AVX512-BF16 too (its fused kernel stubbed:
    the generated ids do not matter, the restored weights do)."""
    import bitsandbytes.functional as bnb_functional

    if bnb_functional.has_avx512bf16():
        return lambda model: None

    def fused(A, B, out=None, state=None, **kwargs):  # noqa: N803 - bitsandbytes' names
        return torch.zeros(*A.shape[:-1], state.shape[0], dtype=A.dtype)

    monkeypatch.setattr(bnb_functional, "gemv_4bit", fused)

    def force(model):
        import bitsandbytes as bnb

        for layer in model.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                monkeypatch.setattr(layer, "support_avx512bf16_for_cpu", True)

    return force


@pytest.mark.parametrize("plugins", ["installed", "bnb_only"])
def test_4bit_train_generate_train_matches_and_repacked_weights_come_back(
    llama_dir, plugins, request, repacking
):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("sloth_bnb")
    if plugins == "bnb_only":
        request.getfixturevalue("bnb_only")
    load = {"load_in_4bit": True, "device_map": "cpu"}
    reference, _ = _lora_model(llama_dir, True, **load)
    model, tokenizer = _lora_model(llama_dir, True, **load)
    repacking(model)
    ref_opt, opt = _optimizer(reference), _optimizer(model)
    reference.train(), model.train()
    settings = _settings(model, tokenizer)
    assert bool(settings["patched"]) == (plugins == "installed")
    _assert_same_step(_step(reference, ref_opt), _step(model, opt))

    FastLanguageModel.for_inference(model, tokenizer)
    generate(model, tokenizer, _prompt(tokenizer), SamplingOptions(max_new_tokens=6), stop_ids=[])
    if plugins == "bnb_only":
        assert _packed(model) == 14, "bitsandbytes did not repack: the trap is not exercised"
    FastLanguageModel.for_training(model, tokenizer)
    assert _settings(model, tokenizer) == settings

    _assert_same_step(_step(reference, ref_opt), _step(model, opt))
    assert _packed(model) == 0
